"""PPO on the shortest-path task (maxlm/posttrain/graph.py): the walker of configs/graph_tiny.py (runs/graph) is
rewarded by a program -- distance-to-goal / walk length for valid walks that reach the goal, else 0 -- so the
optimal policy's mean reward is exactly 1. No reward model: the critic starts from the policy's trunk.
"""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "graph_tiny.py"))
    p = c.ppo
    p.policy = "runs/graph"
    p.reward_fn = "shortest_path"
    p.reward_model = ""
    p.reward_domain = ""
    p.critic_init = "policy"
    p.graph_nodes = 21
    p.graph_seed = 0
    p.iterations = 100
    p.rollout_batch = 64
    p.max_new_tokens = 10  # walks of at most 11 nodes
    p.epochs = 4
    p.init_kl_coef = 0.05
    p.target_kl = 2.0
    p.eval_every = 10
    c.data.batch_size = 16
    c.optim.schedule = "constant"
    c.optim.peak_lr = 1e-4
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    # Adam's second moment over ~1000 updates (PyTorch's and TRL's default), not pretraining's 0.95: with a
    # short memory a run of tiny gradients -- the stop token after the goal sits at probability ~1 -- is
    # rescaled into full-size steps, and one update took that token from log-prob -0.8 to -9 (every walk
    # then ran past the goal: fraction of optimal 0.60 -> 0.19). With 0.999: 0.997 (seed 0), 0.943 (seed 1).
    c.optim.b2 = 0.999
    c.checkpoint.every_steps = 400  # optimizer updates: 25 iterations of 16 (4 minibatches x 4 epochs)
    return c
