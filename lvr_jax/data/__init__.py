"""Data: video decoding + SigLIP preprocessing (`video`), chat/reasoning prompts (`prompts`),
JSONL records and their validation (`records`), the grain pipeline (`dataset`), the synthetic
long-video set (`synthetic`).

Submodules are imported explicitly (`from lvr_jax.data import dataset`): `dataset` pulls in grain,
the others only numpy / PyAV / decord, which keeps the decoding worker processes light.
"""
