"""InternLM2-7B shapes (Cai et al. 2024): Llama-2-7B's depth and width with GQA 32/8, F=14336, a fused
`wqkv` projection, a 92544-token vocabulary and rope theta 1e6; trained at 4k, extended to 32k."""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama2_7b.py"))
    c.model.vocab_size = 92544
    c.model.num_kv_heads = 8
    c.model.mlp_dim = 14336
    c.model.max_seq_len = 32768
    c.model.rope_theta = 1_000_000.0
    c.model.fused_qkv = True
    return c
