"""GRPO on the tiny SFT model (runs/sft) on the built-in sort task, rewarded by the task's exact-match checker
(RL with a verifiable reward: no reward model). CPU, minutes.

The RL settings shared with PPO come from configs/ppo_tiny.py (64 replies per iteration, 16 tokens, 4 epochs of
minibatches of 16, Adam b2 0.999, the held-out evaluation); here 8 prompts x 8 replies, DeepSeekMath's GRPO
(group-normalised advantages, per-sequence token means, clip 0.2, k3 KL to the reference with weight 0.04).
Measured (experiments/grpo_demo.sh, 2 CPU cores shared with other runs, 2026-12-05): held-out exact match
0.454 -> 0.566 / 0.596 / 0.654 / 0.672 / 0.666 / 0.698 at iterations 50 .. 300, KL 1.93, 1048 s.
"""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_tiny.py"))
    p = c.ppo
    p.reward_fn = "checker"
    p.reward_model = ""
    p.reward_domain = ""
    p.critic_init = "policy"  # unused: no critic
    p.iterations = 300
    p.rollout_batch = 64
    g = c.grpo
    g.group_size = 8
    g.advantage = "grpo"
    g.loss_agg = "seq_mean_token_mean"
    g.kl_coef = 0.04
    return c
