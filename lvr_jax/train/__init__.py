"""Training: state (`state`), the loop (`loop`), the SFT and GRPO stages (`sft`, `grpo`), orbax
checkpoints (`checkpoint`), metrics, the config readers (`settings`) and the memory planner."""
