"""RL and SFT objectives: rule rewards, GRPO advantages / loss, CoT-SFT loss."""
