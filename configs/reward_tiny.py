"""Reward model on the tiny SFT model (configs/sft_tiny.py, in runs/sft) with the built-in preference pairs
of the sort task: the correct answer beats a plausible mistake. CPU, a few minutes.

`--config.reward.domains="('correct','brief')"` adds the conflicting brevity preference; with
`--config.reward.conditional=False` the pairs carry no system prompt (the COOL RLHF baseline).
"""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_tiny.py"))
    c.reward.base = "runs/sft"
    c.reward.tasks = ("sort",)
    c.reward.domains = ("correct",)
    c.reward.train_size = 8000  # items: 8000 `correct` pairs (+ ~4000 `brief` with both domains)
    c.reward.eval_size = 200
    c.reward.policy_samples = 4  # + pairs from the base's own replies (the mistakes PPO will make)
    c.sft.eval_items = 0

    c.data.seq_len = 96  # one conversation per row: system prompt + prompt + reply fit in 80 tokens
    c.data.batch_size = 16  # pairs

    c.optim.peak_lr = 5e-4
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0

    c.train.num_steps = 2000  # ~2 epochs of the ~17k pairs
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.eval_batches = 13  # 208 held-out pairs (all of them: reward_eval.json at the end)

    c.checkpoint.every_steps = 1000
    return c
