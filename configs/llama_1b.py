"""A ~1.2B-parameter LLaMA-shaped model (TinyLlama-1.1B widths: D=2048, 22 layers, GQA 32/4)."""

from maxlm.config import default_config


def get_config():
    c = default_config()
    c.model.vocab_size = 32000
    c.model.num_layers = 22
    c.model.d_model = 2048
    c.model.num_heads = 32
    c.model.num_kv_heads = 4
    c.model.mlp_dim = 5632
    c.model.max_seq_len = 2048
    c.model.norm_eps = 1e-5
    c.model.remat_policy = "dots_with_no_batch_dims"
    c.data.seq_len = 2048
    c.data.batch_size = 512  # 1M tokens per step
    c.optim.peak_lr = 4e-4
    c.optim.warmup_steps = 2000
    c.train.num_steps = 100_000
    c.train.log_every = 50
    c.checkpoint.every_steps = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
