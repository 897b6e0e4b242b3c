"""Context extension on CPU, InternLM2's recipe in miniature (`bash experiments/longctx_demo.sh W`).

configs/tiny.py trained at L = 128 tokens for 600 steps, then one short stage at 4L = 512 tokens: YaRN-scaled
RoPE (x4 from the 128 tokens the first stage used), the same 4096 tokens per step (8 rows of 512), its own
warmup and decay at a third of the peak lr, and long rows through the Pallas flash kernel (interpreted on
CPU) with 2-way sequence parallelism -- which needs two devices: on CPU run it with
XLA_FLAGS=--xla_force_host_platform_device_count=2 (the demo script sets it).

5% of documents are held out (tiny.py holds out 1%) so that the before/after perplexities average over more
than a couple of long held-out files; the first stage's last checkpoint is kept (`keep_period`) for them.
"""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    c.data.eval_fraction = 0.05
    c.train.num_samples = 0
    c.checkpoint.keep_period = c.train.num_steps
    c.train.stages = (
        "name=4x steps=100 data.seq_len=512 data.batch_size=8 model.rope_scaling=yarn model.rope_factor=4 "
        "optim.peak_lr=1e-3 optim.warmup_steps=10 train.eval_every=50 "
        "model.attention_impl=pallas mesh.sequence=2",
    )
    return c
