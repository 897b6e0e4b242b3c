"""SFT of the tiny base (configs/tiny.py, trained by the README's first command into runs/tiny) on the
built-in task suite: full fine-tuning by default, `--config.lora.rank=8` for LoRA. CPU, a few minutes.

Hyper-parameters follow common SFT practice scaled to a 1M-parameter model: a short warmup, cosine decay,
no weight decay, answer-only loss over packed rows of 128 tokens (3-4 conversations each).
"""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    c.sft.base = "runs/tiny"
    c.sft.template = "chatml"
    c.sft.tasks = ("format", "reverse", "sort", "add")
    c.sft.task_train_size = 2000
    c.sft.task_eval_size = 200
    c.sft.eval_items = 64

    c.data.seq_len = 128
    c.data.batch_size = 16

    c.optim.peak_lr = 1e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.0

    c.train.num_steps = 600
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.eval_batches = 4
    c.train.num_samples = 0

    c.checkpoint.every_steps = 200
    return c
