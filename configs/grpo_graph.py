"""GRPO on the shortest-path task (maxlm/posttrain/graph.py): the walker of configs/graph_tiny.py (runs/graph),
rewarded by the program (distance / walk length for valid walks that reach the goal, else 0; the optimum is
exactly 1). The RL settings shared with PPO are configs/ppo_graph.py's; 8 starts x 8 walks per iteration.
"""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_graph.py"))
    g = c.grpo
    g.group_size = 8
    g.advantage = "grpo"
    g.loss_agg = "seq_mean_token_mean"
    g.kl_coef = 0.04
    return c
