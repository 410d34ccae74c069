"""What a compiled program holds, read from XLA:CPU compiles (`train.memory_plan`,
`eval.bench_step`): per-device memory, output shapes, and the float32 copies of bf16 arrays that
only the CPU backend makes (`upcast_copies`)."""

from __future__ import annotations

import os


def memory(compiled) -> dict:
    """Per-device bytes of a compiled program: arguments, outputs, aliased (donated), temp."""
    m = compiled.memory_analysis()
    return dict(args=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
                alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes))


LICM = "while-loop-invariant-code-motion"


def cpu_compile(lowered, *disable: str):
    """`lowered.compile()` with these passes off: XLA:CPU's `all-reduce-promotion` (it aborts on
    the update's bf16 all-reduces; it only widens them), those XLA_FLAGS disables, `disable`."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    off = [p for f in flags if f.startswith("--xla_disable_hlo_passes=")
           for p in f.split("=", 1)[1].split(",")]
    passes = ",".join(dict.fromkeys([*off, "all-reduce-promotion", *disable]))
    return lowered.compile(compiler_options={"xla_disable_hlo_passes": passes})


def upcast_copies(lowered, temp: int) -> int:
    """Temp bytes of XLA:CPU's hoisted float32 copies of bf16 arrays (`memory_plan`'s docstring,
    `cpu_upcast`): `temp` less the temp of the same program compiled with loop-invariant code
    motion off; 0 when that is not lower."""
    return max(0, temp - memory(cpu_compile(lowered, LICM))["temp"])


def compiled_outputs(compiled):
    """Output ShapeDtypeStructs (with shardings) of a compiled function: the result part of an
    nnx.jit one, whose outputs are (args_state, kwargs_state, result), or (result, updates)
    with graph_updates=False."""
    if not hasattr(compiled, "compiled"):
        return compiled.out_info
    out = compiled.compiled.out_info
    return out[0] if type(compiled).__name__ == "SimpleCompiled" else out[2]
