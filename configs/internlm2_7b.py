"""InternLM2-7B shapes (Cai et al. 2024): 32 layers, D=4096, GQA 32/8, F=14336, fused wqkv, 92544 vocab,
rope theta 1e6, trained at 4k then extended to 32k."""

from maxlm.config import default_config


def get_config():
    c = default_config()
    c.model.vocab_size = 92544
    c.model.num_layers = 32
    c.model.d_model = 4096
    c.model.num_heads = 32
    c.model.num_kv_heads = 8
    c.model.mlp_dim = 14336
    c.model.max_seq_len = 32768
    c.model.norm_eps = 1e-5
    c.model.rope_theta = 1_000_000.0
    c.model.fused_qkv = True
    c.model.remat_policy = "full"
    c.data.seq_len = 4096
    c.data.batch_size = 1024
    c.optim.peak_lr = 3e-4
    c.optim.warmup_steps = 2000
    c.train.num_steps = 500_000
    c.train.log_every = 10
    c.checkpoint.every_steps = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
