"""Sampler benchmark: decode tokens/s vs transformers `generate()` on the same tiny Qwen2 weights
(torch CPU, same batch and lengths, measured in one run: `--repeats` rounds, each timing HF, the
shared prefix and the repeated prompts once, each timed call after a 0.5 s pause and the same call
untimed for at least `--warm_s`, medians reported), and the prefix cache bytes and
prefill FLOPs of a group of G samples with and without the shared prefix. Each sampler is also
timed for one new token (the prefill and the first token), so the table splits each call into
that and the decode loop's ms per step. Writes bench_sampler.md, bench_sampler.png and
bench_sampler.json (every round's seconds). Runs on one CPU device (the samplers use no mesh);
XLA_FLAGS=--xla_force_host_platform_device_count=N sets another count.
    python launch/bench_sampler.py --out=runs/bench_sampler [--prompts=4 --group=8 --new=64]
"""

import os

from lvr_jax import cli

os.environ.setdefault("JAX_PLATFORMS", "cpu")
cli.cpu_devices(1)   # no mesh: 7 more virtual devices would only add thread pools on the same cores

import functools  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from lvr_jax.eval import bench_sampler_report  # noqa: E402
from lvr_jax.eval.flops import prefill_flops  # noqa: E402
from lvr_jax.models.qwen2 import left_pad  # noqa: E402
from lvr_jax.rollout.sampler import Sampler  # noqa: E402
from lvr_jax.weights.hf import load_llm  # noqa: E402

flags.DEFINE_string("out", "runs/bench_sampler", "folder for bench_sampler.md / .json / .png")
flags.DEFINE_integer("prompts", 4, "prompts per batch")
flags.DEFINE_integer("group", 8, "G samples per prompt")
flags.DEFINE_integer("prompt_len", 256, "tokens per prompt")
flags.DEFINE_integer("new", 64, "new tokens per sample (>= 2: one for the first token, the rest decode)")
flags.DEFINE_integer("repeats", 5, "timed rounds (after one warm-up of each sampler)")
flags.DEFINE_float("warm_s", 0.25, "before each timed call, the same call untimed for at least this "
                   "long (at least once): every sampler gets the same warm time, not its own call's")


def tiny_torch_qwen2(folder: str, seed: int = 0):
    """A random tiny transformers Qwen2 (the tests' size), saved for our loader."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model


def time_hf(model, prompts: np.ndarray, new: int) -> float:
    import torch

    ids = torch.from_numpy(prompts)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
    dt = time.perf_counter() - t0
    assert out.shape[1] == prompts.shape[1] + new
    return dt


def time_ours(sampler: Sampler, prompts: np.ndarray, group: int, new: int) -> float:
    kw = dict(num_samples=group, max_new_tokens=new, temperature=0)
    t0 = time.perf_counter()
    toks, _, lens = sampler.generate(list(prompts), **kw)
    dt = time.perf_counter() - t0
    assert (lens == new).all()
    return dt


def prefill_cost(llm, prompts: np.ndarray):
    """(FLOPs of the prefill by formula (cost_analysis counts the layer scan's body once),
    prefix cache bytes) for these prompts."""
    x, mask = left_pad([llm.embed_tokens(jnp.asarray(p)) for p in prompts])
    graphdef, state = nnx.split(llm)
    fn = jax.jit(lambda s, x, m: nnx.merge(graphdef, s).prefill(x, m))
    flops = prefill_flops(llm.cfg, x.shape[0], x.shape[1], ("dense", 1))
    pre = jax.eval_shape(fn, state, x, mask)
    return flops, pre.k.size * pre.k.dtype.itemsize * 2


def main(_):
    args = flags.FLAGS
    for name, least in (("prompts", 1), ("group", 1), ("prompt_len", 1), ("new", 2), ("repeats", 1),
                        ("warm_s", 0)):
        if getattr(args, name) < least:
            raise app.UsageError(f"--{name} must be >= {least}, got {getattr(args, name)}")
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = tiny_torch_qwen2(tmp)
        llm, _ = load_llm(tmp)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, 512, (args.prompts, args.prompt_len))
    shared, repeated = Sampler(llm), Sampler(llm, share_prefix=False)
    repeats = np.repeat(prompts, args.group, axis=0)
    runs = {}
    for tag, new in (("", args.new), ("_first", 1)):   # the call; the prefill + 1st token alone
        runs.update({"hf" + tag: functools.partial(time_hf, hf_model, repeats, new), **{
            n + tag: functools.partial(time_ours, sampler, prompts, args.group, new)
            for n, sampler in (("shared", shared), ("repeated", repeated))}})
    for run in runs.values():
        run()                                          # warm-up: compiles, torch's first call
    seconds = {name: [] for name in runs}
    for _ in range(args.repeats):                      # interleaved: load drifts hit all three
        for name, run in runs.items():
            time.sleep(0.5)   # let the other runtime's worker threads stop spinning first
            warm_until = time.perf_counter() + args.warm_s
            run()             # then the same call untimed: each sampler timed warm, as in a loop
            while time.perf_counter() < warm_until:
                run()
            seconds[name].append(run())
    cost = {"shared": prefill_cost(llm, prompts), "repeated": prefill_cost(llm, repeats)}
    settings = {k: getattr(args, k) for k in ("prompts", "group", "prompt_len", "new", "repeats",
                                              "warm_s")}
    settings["cpu_devices"] = jax.device_count()
    print(bench_sampler_report.write(args.out, seconds, settings, cost,
                                     sys.modules["torch"].__version__))


if __name__ == "__main__":
    app.run(main)
