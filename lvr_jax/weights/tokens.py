"""Special tokens of VILA checkpoints (no jax import: the data workers use them)."""

VIDEO_TOKEN = "<vila/video>"
MEDIA_TOKENS = ("<image>", VIDEO_TOKEN)
