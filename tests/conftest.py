"""Test setup: 8 virtual CPU devices, set before jax is imported anywhere; shared fixtures."""
import os
import shutil
import tempfile

# LLVM at -O0: the suite is mostly compiling tiny programs; this halves its compile time and
# leaves the HLO passes (what the memory and collective tests read) as they are. Launch scripts the
# tests start inherit it; users' runs do not.
LLVM_O0 = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {LLVM_O0}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One persistent compilation cache for the whole run, shared by both xdist workers and the launch
# scripts the tests start: many tests compile the same tiny programs. max_size turns on jax's file
# lock around every read and write, so concurrent processes can share the folder.
# The first process (xdist's controller) names it; the workers inherit the name and the controller
# removes the folder at the end.
_OWNS_CACHE = "LVR_JAX_TESTS_JIT_CACHE" not in os.environ
JIT_CACHE = os.environ.setdefault("LVR_JAX_TESTS_JIT_CACHE",
                                  os.path.join(tempfile.gettempdir(), f"lvr_jax_tests_jit_{os.getpid()}"))
os.environ.update(JAX_COMPILATION_CACHE_DIR=JIT_CACHE, JAX_COMPILATION_CACHE_MAX_SIZE=str(4 << 30),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# rbg keys compile several times faster than threefry on CPU; tests only need determinism.
jax.config.update("jax_default_prng_impl", "unsafe_rbg")


def pytest_sessionfinish(session):
    """The process that named the run's compilation cache removes it."""
    if _OWNS_CACHE:
        shutil.rmtree(JIT_CACHE, ignore_errors=True)


def launch_env(cache=None, *, optimized: bool = False) -> dict:
    """The environment of a launch script a test runs: CPU, and the run's shared compilation cache
    (`JIT_CACHE`). `cache`: a folder of that test's own instead, caching every compile however
    short, so a rerun or a resumed run loads the programs of the run before; for tests that kill
    a process, whose half-written entries must not reach other tests. `optimized`: LLVM at its
    default level (`LLVM_O0` off), for runs whose time goes into many steps rather than
    compiles."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if optimized:
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != LLVM_O0)
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def perturb(model, seed: int, scale: float):
    """Add fresh noise to every Param in one compiled call (init leaves norms 1, biases 0)."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def noisy(state):
        leaves, tree = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                         for x, k in zip(leaves, keys)])

    return nnx.merge(graphdef, noisy(state))


@pytest.fixture(scope="session")
def vila_parts():
    """Tiny random torch parts of a VILA model (untied Qwen2 with GQA, SigLIP 7x7 grid)."""
    from tests import torch_reference as ref
    llm = ref.tiny_qwen2(seed=0)
    vision = ref.tiny_siglip(seed=1)
    proj = ref.torch_projector("mlp_downsample_2x2_fix", 32, 64, seed=2)
    return llm, vision, proj


@pytest.fixture(scope="session")
def vila_dir(tmp_path_factory, vila_parts):
    """A VILA-layout checkpoint folder written from `vila_parts`."""
    from tests import torch_reference as ref
    folder = tmp_path_factory.mktemp("ckpt") / "vila"
    ref.save_vila(folder, *vila_parts, "mlp_downsample_2x2_fix")
    return folder


def synthetic_run_inputs(root, *, num_train: int, num_val: int = 0):
    """A synthetic set of 16-frame 28 px clips in `root/data` and a random tiny VILA checkpoint
    (the demo's model) in `root/init` whose tokenizer knows the reasoning and prompt templates."""
    import json

    from configs import demo
    from lvr_jax.data.prompts import template_corpus
    from lvr_jax.data.synthetic import generate_dataset
    from lvr_jax.weights.tiny import make_random_checkpoint

    generate_dataset(root / "data", num_train=num_train, num_val=num_val, num_test=0,
                     num_frames=16, size=28)
    corpus = [json.loads(x)["reasoning"] for x in open(root / "data" / "train.jsonl")]
    make_random_checkpoint(demo.get_config().model, root / "init", corpus=corpus + template_corpus())
    return root
