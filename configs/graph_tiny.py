"""A tiny walker for the shortest-path RL task (maxlm/posttrain/graph.py, after trlX's random-walks benchmark):
pretrained on random walks through one fixed 21-node graph, it learns the legal moves but not the short
ones. `experiments/ppo_shortest_path.sh` writes the walks, trains this, then runs PPO (configs/ppo_graph.py).
"""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    c.model.vocab_size = 48  # 4 specials + 2 chat markers + the letters with and without a word boundary
    c.model.max_seq_len = 64
    c.tokenizer.byte_fallback = False  # the corpus is 26 letters and spaces
    c.data.source = "jsonl"
    c.data.path = "runs/walks.jsonl"  # python -m maxlm.graph --out=runs/walks.jsonl
    c.data.seq_len = 64
    c.data.batch_size = 32
    c.optim.peak_lr = 3e-3
    c.optim.warmup_steps = 30
    c.train.num_steps = 400
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.num_samples = 0
    c.checkpoint.every_steps = 200
    return c
