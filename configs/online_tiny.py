"""Online RLHF's judge (python -m maxlm.online) on the tiny models of experiments/rlhf_demo.sh: between PPO rounds,
4 replies of the current policy to each of 500 held-out sort prompts measure the round's reward model, and 4
replies to each of 1000 fresh train prompts, labelled by the checker, become the new comparisons (each one the
reward model got wrong written 4 times). CPU, a minute or two.
"""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_tiny.py"))
    o = c.online
    o.tasks = ("sort",)
    o.train_items = 1000
    o.eval_items = 500
    o.samples = 4
    o.hack_repeat = 4
    return c
