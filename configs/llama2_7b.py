"""Llama-2-7B shapes (Touvron et al. 2023): 32 layers, D=4096, 32 heads (MHA), F=11008, 4k context."""

from maxlm.config import default_config


def get_config():
    c = default_config()
    c.model.vocab_size = 32000
    c.model.num_layers = 32
    c.model.d_model = 4096
    c.model.num_heads = 32
    c.model.num_kv_heads = 32
    c.model.mlp_dim = 11008
    c.model.max_seq_len = 4096
    c.model.norm_eps = 1e-5
    c.model.rope_theta = 10000.0
    c.model.remat_policy = "full"
    c.data.seq_len = 4096
    c.data.batch_size = 1024  # 4M tokens per step, as in the Llama 2 paper
    c.optim.peak_lr = 3e-4
    c.optim.warmup_steps = 2000
    c.optim.end_lr_ratio = 0.1
    c.train.num_steps = 500_000
    c.train.log_every = 10
    c.checkpoint.every_steps = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
