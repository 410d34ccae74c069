"""Training: checkpointing (orbax) and, later, the SFT / GRPO trainer loop."""
