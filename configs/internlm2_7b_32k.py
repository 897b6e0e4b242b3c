"""InternLM2-7B's context schedule (Cai et al. 2024): pretraining at 4k, then a stage at 32k.

The second stage resumes the 4k run's last checkpoint (`train.stages`, see `maxlm.config.stage_plan`) with
8x longer rows at the same 4M tokens per step, a larger rope base (adjusted base frequency, Xiong et al.
2023: theta 5e4 -> 1e6) and its own warmup and decay. Long rows go through the Pallas flash kernel with the
sequence split over 8 devices (`mesh.sequence`: queries stay local, keys/values are all-gathered), on top of
FSDP over the rest. Half of the stage's bytes come from long documents (InternLM2: "50% of the data of up to
32k"): `curated/long`, selected from the pretraining corpus with `python -m maxlm.curate --input=... \
--output=curated/long --config.stages=long,exact,near,perplexity --config.long.max_perplexity=...`
(maxlm/curation/long.py), mixed with the standard corpus `curated/all` by `maxlm.data.mixture.long_context`.
The folders and step counts are illustrative.
"""

import os
import shlex

from maxlm.config import load_config_file
from maxlm.data.mixture import long_context


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "internlm2_7b.py"))
    c.model.rope_theta = 50_000.0
    c.model.attention_impl = "pallas"
    c.data.seq_len = 4096
    c.data.batch_size = 1024
    c.train.num_steps = 500_000
    c.checkpoint.keep_period = c.train.num_steps  # keep the 4k model
    mixture = long_context("curated/long", "curated/all", long_share=0.5)
    c.train.stages = (
        "name=32k steps=10000 data.seq_len=32768 data.batch_size=128 model.rope_theta=1e6 "
        "mesh.sequence=8 optim.peak_lr=1e-4 optim.warmup_steps=200 data.source=mixture "
        f"data.mixture={shlex.quote(repr(mixture))}",
    )
    return c
