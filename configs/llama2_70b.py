"""Llama-2-70B shapes (Touvron et al. 2023): 80 layers, D=8192, 64 query heads on 8 kv heads (GQA), F=28672,
4k context, 4M tokens per step; the state sharded over every chip (ZeRO-3) with full remat."""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama2_7b.py"))
    c.model.num_layers = 80
    c.model.d_model = 8192
    c.model.num_heads = 64
    c.model.num_kv_heads = 8
    c.model.mlp_dim = 28672
    c.optim.peak_lr = 1.5e-4
    return c
