"""PPO on the tiny SFT model (runs/sft) against the tiny reward model (runs/rm) on the built-in sort task.
CPU, minutes. The reward model and critic share the policy's architecture and tokenizer.

InstructGPT/trlX conventions: temperature-1 rollouts, a per-token KL penalty to the SFT policy with an
adaptive coefficient, GAE (gamma 1, lambda 0.95), whitened advantages, clipped policy and value losses,
several epochs over each rollout batch, a constant learning rate after a short warmup.
"""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_tiny.py"))
    p = c.ppo
    p.policy = "runs/sft"
    p.reward_model = "runs/rm"
    p.tasks = ("sort",)
    p.iterations = 200
    p.rollout_batch = 64
    p.max_new_tokens = 16
    p.epochs = 4
    p.init_kl_coef = 0.05
    p.target_kl = 1.0  # nats per response: the replies are ~10 tokens, not trlX's hundreds
    p.kl_horizon = 10000
    p.eval_every = 25
    p.eval_items = 200
    c.sft.eval_items = 0

    c.data.batch_size = 16  # rollouts per minibatch: 4 updates per epoch
    c.optim.schedule = "constant"
    c.optim.peak_lr = 1e-4
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    c.checkpoint.every_steps = 25  # iterations
    return c
