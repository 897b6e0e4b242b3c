"""A GPT-3-Small-class LLaMA-shaped model: 110M parameters with tied embeddings (134M untied), MHA, 2k context."""

from maxlm.config import default_config


def get_config():
    c = default_config()
    c.model.vocab_size = 32000
    c.model.num_layers = 12
    c.model.d_model = 768
    c.model.num_heads = 12
    c.model.num_kv_heads = 12
    c.model.mlp_dim = 2048
    c.model.max_seq_len = 2048
    c.model.tie_embeddings = True
    c.data.seq_len = 2048
    c.data.batch_size = 256  # 0.5M tokens per step
    c.optim.peak_lr = 6e-4
    c.optim.warmup_steps = 2000
    c.train.num_steps = 60_000
    c.train.log_every = 50
    c.checkpoint.every_steps = 2000
    return c
