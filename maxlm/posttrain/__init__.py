"""Post-training: supervised fine-tuning, reward modelling, PPO and its environments."""
