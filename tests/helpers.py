"""Helpers shared by the test files: constants, data writers, configs and reference models.

A plain module (pytest fixtures live in conftest.py). A test file imports what it shares with other test
files from here and never from another test file (tests/test_layout.py checks that). Heavy optional
dependencies (torch, transformers, tensorflow_datasets) are imported inside the helpers that need them, so
importing this module costs no more than maxlm itself.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from maxlm import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository root (the working directory for `python -m maxlm...` subprocesses)."""

# ------------------------------------------------------------------------------------------ pretraining

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box and jump "
         "一 二 三 数据 模型 训练").split()
"""The vocabulary of `write_corpus` (English and Chinese words)."""


def write_corpus(path, n_docs=300, seed=0) -> None:
    """Write a small pretraining jsonl corpus to `path`: `n_docs` documents with learnable structure (each a
    counted walk through `WORDS`, so a tiny model's loss can fall well below ln(V)), then one malformed line
    (which the reader counts and skips)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            start = int(rng.integers(0, 50))
            words = [WORDS[(start + 3 * j) % len(WORDS)] for j in range(int(rng.integers(5, 40)))]
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(words) + "."}, ensure_ascii=False) + "\n")
        f.write("{not json\n")


def small_config(data_path, **extra):
    """A validated pretraining config for a tiny run on the jsonl corpus at `data_path`: a 2-layer, width-64
    float32 model, a 320-piece tokenizer, seq_len 64, batch 8, async checkpoints every 3 steps; `extra`
    overrides any key (dotted names, as `config.override` takes them)."""
    c = C.override(C.default_config(), **{
        "model.vocab_size": 320, "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 128, "model.max_seq_len": 64, "model.compute_dtype": "float32",
        "tokenizer.train_max_bytes": 200_000,
        "data.source": "jsonl", "data.path": str(data_path), "data.seq_len": 64, "data.batch_size": 8,
        "data.eval_fraction": 0.0,
        "optim.peak_lr": 3e-3, "optim.warmup_steps": 5, "train.log_every": 1, "train.eval_every": 0,
        "train.num_samples": 1, "train.sample_tokens": 8, "checkpoint.every_steps": 3, "checkpoint.async_save": True,
        **extra})
    return C.validate(c)


def tiny_model_config(vocab):
    """The default config with a 2-layer, width-32, float32 model (4 heads, 2 KV heads, MLP 64, max_seq_len 256)
    over a `vocab`-piece vocabulary (not validated: callers override further)."""
    return C.override(C.default_config(), **{
        "model.vocab_size": vocab, "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.max_seq_len": 256, "model.compute_dtype": "float32"})


def random_params(abstract, seed, std):
    """numpy arrays drawn from normal(0, std), one per leaf of `abstract` (a tree of shapes with dtypes, such as
    `model.abstract_params(config)`), leaf by leaf in tree order: random weights without compiling `model.init`
    (which costs seconds). `seed` is an int or a `np.random.Generator`, which is drawn from (and advanced)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.normal(0, std, a.shape).astype(a.dtype), abstract)


# ------------------------------------------------------------------------- Hugging Face reference models

HF_TOL = 1e-4
"""Largest absolute logit difference accepted between maxlm and transformers (float32 models from `build_hf`)."""
HF_VOCAB = 160
"""The vocabulary size of `build_hf`'s models."""
HF_BASE = dict(vocab_size=HF_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=160, max_position_embeddings=256, rms_norm_eps=1e-5)
"""The transformers config keys every `build_hf` model shares (its kwargs add to or override them)."""


def randomize_hf(model) -> None:
    """Re-initialise a transformers model in place with O(1)-logit weights: matrices ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), so that a wrong mapping cannot hide behind near-zero
    activations (draws from torch's global generator)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)


# Causal LMs whose config class is not "<name>Config" (Gemma3Config is the multimodal model's).
_HF_CONFIG_CLASSES = {"Gemma3ForCausalLM": "Gemma3TextConfig"}


def build_hf(class_name: str, seed: int = 0, **kwargs):
    """A small random transformers causal LM in eval mode: `class_name` (e.g. "LlamaForCausalLM",
    "Qwen2ForCausalLM") with `HF_BASE` updated by `kwargs`, eager attention, float32, weights from
    `randomize_hf` after `torch.manual_seed(seed)`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config_cls = getattr(transformers, _HF_CONFIG_CLASSES.get(class_name, class_name.replace("ForCausalLM", "Config")))
    config = config_cls(**{**HF_BASE, **kwargs}, attn_implementation="eager")
    model = getattr(transformers, class_name)(config)
    assert model.config._attn_implementation == "eager"
    randomize_hf(model)
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """A transformers model's float32 logits for an int array of token ids [batch, length], as numpy."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


# ------------------------------------------------------------------------------------------------- text

GOOD_EN = (
    "The river town woke slowly on market days. Farmers arrived before dawn with carts of apples, onions and "
    "late summer squash, and the baker opened his shutters as the first light reached the square.\n\n"
    "By nine o'clock the stalls were crowded. Children ran between the tables while their parents argued "
    "cheerfully about prices, and an old fiddler played tunes that nobody could quite name.\n\n"
    "When the church bell rang at noon, most of the traders began to pack away their goods, counting coins "
    "and promising to return the following week."
)
"""Clean English prose that passes every default quality rule (maxlm/curation/quality.py)."""


# ------------------------------------------------------------------------------------------------- tfds

def build_tiny_tfds(data_dir: str, texts: list[str]) -> None:
    """Prepare `maxlm_tiny_text` ({"text", "id"} records, one train split) under data_dir as array_record."""
    import tensorflow_datasets as tfds

    class MaxlmTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        # No source file to look for a checksums.tsv beside: that lookup would need importlib_resources
        # (an etils[epath] extra this environment lacks) because this module lives in the `tests` package.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "id": tfds.features.Scalar(np.int64)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, text in enumerate(texts):
                yield i, {"text": text, "id": i}

    tfds.disable_progress_bar()
    MaxlmTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
