"""The collectives of a compiled program, read from its optimized HLO text: what each moves.

`collectives(compiled.as_text())` lists every all-reduce, all-gather, reduce-scatter, all-to-all
and collective-permute (combined ones, whose result is a tuple, count each element) with its
element type, shape and bytes; `summary` counts the distinct ones. The memory planner writes
each phase's summary into its JSON, which shows which arrays cross devices: weights (FSDP
gathers, gradient reductions) or activations. On XLA:CPU bf16 values travel as float32.
"""

from __future__ import annotations

import dataclasses
import math
import re

OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_LINE = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(OPS) + r")(-start)?\(", re.M)
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * _BYTES[self.dtype]


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of an HLO module's text (`compiled.as_text()`), one entry per array it
    returns (async ops once, at their `-start`: an all-gather's or collective-permute's start
    returns its operands, then its results, then scalar contexts; only the results count). An
    element type this module does not know is an error, not a silent zero."""
    out = []
    for m in _LINE.finditer(hlo_text):
        arrays = _ARRAY.findall(m.group(1))
        if m.group(3) and m.group(2) in ("all-gather", "collective-permute"):
            arrays = [a for a in arrays if a[1]]            # drop the u32[] contexts
            arrays = arrays[len(arrays) // 2:]
        for dtype, dims in arrays:
            if dtype not in _BYTES:
                raise ValueError(f"unknown element type {dtype!r} in {m.group(0).strip()!r}")
            out.append(Collective(m.group(2), dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def summary(found: list[Collective]) -> list[dict]:
    """Distinct collectives, largest first: op, dtype, shape, bytes (of one), count."""
    counts: dict[Collective, int] = {}
    for c in found:
        counts[c] = counts.get(c, 0) + 1
    return [dict(op=c.op, dtype=c.dtype, shape=list(c.shape), bytes=c.bytes, count=n)
            for c, n in sorted(counts.items(), key=lambda kv: (-kv[0].bytes, kv[0].op))]
