"""Demo of the model stack on 8 virtual CPU devices, on built-in synthetic data.

Writes a random tiny VILA checkpoint, reloads it sharded over a (fsdp, tensor) mesh, encodes a
synthetic clip of moving squares, splices it into a chat prompt and prints the greedy next tokens
and the logits' agreement with an unsharded load. Usage:
    python launch/demo.py [--workdir=runs/demo] [--frames=8]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from lvr_jax.weights import hf
from lvr_jax.weights import tiny as tiny_ckpt
from sharding.mesh import make_mesh


def synthetic_clip(frames: int, size: int, seed: int = 0) -> np.ndarray:
    """A square moving left to right over noise, normalised like SigLIP ([-1, 1])."""
    rng = np.random.default_rng(seed)
    clip = rng.uniform(0, 0.2, (frames, size, size, 3))
    for t in range(frames):
        x = int(t * (size - 6) / max(frames - 1, 1))
        clip[t, size // 2 - 3: size // 2 + 3, x: x + 6, 0] = 1.0
    return (clip * 2 - 1).astype(np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--frames", type=int, default=8)
    args = ap.parse_args(argv)
    t0 = time.time()
    ckpt = os.path.join(args.workdir, "tiny_vila")
    config = tiny.get_config()
    tiny_ckpt.make_random_checkpoint(config.model, ckpt, overwrite=True)
    print(f"[demo] wrote a random tiny VILA checkpoint to {ckpt}")
    mesh = make_mesh({"data": 1, "fsdp": 4, "seq": 1, "tensor": 2})
    model, tok, cfg = hf.load_vlm(ckpt, mesh=mesh)
    ref_model, _, _ = hf.load_vlm(ckpt)
    print(f"[demo] loaded it on a mesh {dict(mesh.shape)} of {jax.device_count()} devices")
    clip = synthetic_clip(args.frames, cfg.vision.image_size)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "<vila/video>\nWhere does the red square go? "
                                     "A. left B. right C. up D. down"}],
        tokenize=False, add_generation_prompt=True)
    ids = jnp.asarray(tok.encode(prompt))

    @jax.jit
    def forward(m, frames, ids):
        embeds = m.embed_prompt(ids, m.encode_video(frames))
        return m(embeds[None], jnp.arange(embeds.shape[0])[None])[0]

    with jax.set_mesh(mesh):
        logits = forward(model, jnp.asarray(clip), ids)
    logits, want = np.asarray(logits), np.asarray(forward(ref_model, jnp.asarray(clip), ids))
    err = float(np.linalg.norm(logits - want) / np.linalg.norm(want))
    print(f"[demo] prompt: {len(ids)} tokens -> {logits.shape[0]} positions "
          f"({args.frames} frames x {cfg.tokens_per_frame} embeddings)")
    print(f"[demo] sharded vs unsharded logits: relative error {err:.2e}")
    nxt = tok.decode(np.argmax(logits[-1:], -1))
    print(f"[demo] greedy next token of the random model: {nxt!r}; done in {time.time() - t0:.1f}s")
    if not err < 1e-4:
        raise SystemExit(f"sharded forward disagrees with unsharded: {err}")


if __name__ == "__main__":
    main()
