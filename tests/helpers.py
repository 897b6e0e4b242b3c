"""Helpers shared by the test files: constants, data writers, configs and reference models.

A plain module (pytest fixtures live in conftest.py). A test file imports what it shares with other test
files from here and never from another test file (tests/test_layout.py checks that). Heavy optional
dependencies (torch, transformers, tensorflow_datasets) are imported inside the helpers that need them, so
importing this module costs no more than maxlm itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxlm import config as C
from maxlm.model import decoder as model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository root (the working directory for `python -m maxlm...` subprocesses)."""

# ------------------------------------------------------------------------------------------ pretraining

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box and jump "
         "一 二 三 数据 模型 训练").split()
"""The vocabulary of `write_corpus` (English and Chinese words)."""


def once_per_session(name: str, compute):
    """`compute()`'s JSON result, computed by the first pytest-xdist worker that asks and read by the others
    (a subprocess check that several parametrized tests share would otherwise run once per worker)."""
    import tempfile

    import filelock

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid{os.getpid()}")
    path = os.path.join(tempfile.gettempdir(), f"maxlm-tests-{run}-{name}.json")
    with filelock.FileLock(path + ".lock"):
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        result = compute()
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
        return result


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


# ----------------------------------------------------------------------------- Hugging Face tokenizers, chat

# The pre-tokenizer split of Llama 3's tokenizer.json (a published spec): contractions, letters with one
# leading non-letter, digits in threes, punctuation runs, newlines, and whitespace kept before a word.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Chat templates in the styles of four families' published formats (written here; `{% generation %}` marks
# what the model must produce, so transformers' assistant mask is an oracle for maxlm's, which ignores it).
CHAT_QWEN3 = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{% generation %}{% if loop.index0 > ns.last_user %}<think>

</think>

{% endif %}{{ m.content }}{% if m.tool_calls %}{% for call in m.tool_calls %}
<tool_call>
{{ call.function | tojson }}
</tool_call>{% endfor %}{% endif %}<|im_end|>{% endgeneration %}
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CHAT_LLAMA3 = """{{- bos_token }}
{%- if messages[0].role == 'system' %}{% set system = messages[0].content | trim %}{% set rest = messages[1:] %}
{%- else %}{% set system = '' %}{% set rest = messages %}{% endif %}
<|start_header_id|>system<|end_header_id|>

{% if tools %}Environment: ipython
{% for t in tools %}{{ t | tojson(indent=4) }}

{% endfor %}{% endif %}{{ system }}<|eot_id|>
{%- for m in rest %}
{%- if m.role == 'assistant' %}<|start_header_id|>assistant<|end_header_id|>

{% generation %}{% if m.tool_calls %}{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ m.content | trim }}{% endif %}<|eot_id|>{% endgeneration %}
{%- elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ m.content | trim }}<|eot_id|>
{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content | trim }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

CHAT_GEMMA3 = """{{ bos_token }}
{%- if messages[0].role == 'system' %}{% set prefix = messages[0].content + '\n\n' %}{% set rest = messages[1:] %}
{%- else %}{% set prefix = '' %}{% set rest = messages %}{% endif %}
{%- for m in rest %}
{%- set role = 'model' if m.role == 'assistant' else 'user' %}
<start_of_turn>{{ role }}
{% if m.role == 'assistant' %}{% generation %}{{ m.content | trim }}<end_of_turn>{% endgeneration %}
{% else %}{{ prefix if loop.first else '' }}{% if m.role == 'tool' %}Tool result: {% endif %}{{ m.content | trim }}<end_of_turn>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<start_of_turn>model
{% endif %}"""

CHAT_MISTRAL = """{{ bos_token }}
{%- set system = messages[0].content if messages[0].role == 'system' else '' %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m.role == 'user' %}[INST] {% if loop.index0 == ns.last_user and system %}{{ system }}

{% endif %}{{ m.content }}[/INST]
{%- elif m.role == 'tool' %}[TOOL_RESULTS] {{ m.content }}[/TOOL_RESULTS]
{%- elif m.role == 'assistant' %}{% generation %}{% if m.tool_calls %}[TOOL_CALLS] {{ m.tool_calls | map(attribute='function') | list | tojson }}{% else %} {{ m.content }}{% endif %}</s>{% endgeneration %}
{%- endif %}
{%- endfor %}"""

CHAT_STYLES = {  # name -> (template, bos, eos, special tokens)
    "qwen3": (CHAT_QWEN3, None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"]),
    "llama3": (CHAT_LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
               ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "gemma3": (CHAT_GEMMA3, "<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "mistral": (CHAT_MISTRAL, "<s>", "</s>", ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
                                           "[/TOOL_RESULTS]"]),
}
CHAT_STOPS = {"qwen3": "<|im_end|>", "llama3": "<|eot_id|>", "gemma3": "<end_of_turn>", "mistral": "</s>"}


def write_chat_tokenizer(folder, style: str, lines: list[str]) -> str:
    """`folder` as a Hugging Face tokenizer folder in `style` (a key of CHAT_STYLES): a byte-level BPE (600
    tokens, Llama 3's split) trained on `lines`, the style's markers as special added tokens, and a
    tokenizer_config.json with the chat template and the bos / eos tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    template, bos, eos, specials = CHAT_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": eos,
           "bos_token": bos, "clean_up_tokenization_spaces": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False)
    return str(folder)


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


# ------------------------------------------------------------------------- ragged RL batches (test_rl, test_critic_free)


def ragged_mask(lengths, t, dtype=np.float32):
    """[len(lengths), t]: row b is 1 on its first lengths[b] entries (a contiguous prefix), 0 after."""
    m = np.zeros((len(lengths), t), dtype)
    for b, n in enumerate(lengths):
        m[b, :n] = 1
    return m


def normal_f32(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def with_junk(x, mask, seed=99, junk=1e6):
    """x with every masked-out entry replaced by a large random value of either sign."""
    values = np.random.default_rng(seed).uniform(0.5 * junk, junk, size=x.shape) * np.sign(
        np.random.default_rng(seed + 1).normal(size=x.shape))
    return np.where(mask > 0, x, values).astype(np.float32)


# ------------------------------------------------------------------------------------------ reward models


def pair_margins_by_hand(config, params, pairs):
    """r_chosen - r_rejected of each rendered pair (chosen ids, rejected ids) of a reward model: the head applied
    by numpy to the hidden state of each sequence's last token, from one right-padded batch (causal: padding
    after a token never changes it)."""
    seqs = [s for pair in pairs for s in pair]
    tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    h = np.asarray(jax.jit(lambda p, x: model.hidden(config, p, x))(params["decoder"], tokens), np.float64)
    r = h[np.arange(len(seqs)), [len(s) - 1 for s in seqs]] @ np.asarray(params["head"], np.float64)
    return r[0::2] - r[1::2]


def parallel_results(group: tuple[str, ...]) -> dict[str, float]:
    """{spec: largest relative difference of three losses} from tests/parallel_steps_check.py (8 forced CPU
    devices against one; run once per session for the group)."""
    def run():
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel_steps_check.py"), *group],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = dict(re.findall(r"^RESULT (\S+) .* rel=(\S+)$", proc.stdout, re.M))
        assert sorted(found) == sorted(group), proc.stdout
        return {spec: float(rel) for spec, rel in found.items()}
    name = "-".join(group).replace(",", "_").replace("=", "_").replace("/", "_").replace("@", "_")
    return once_per_session("parallel-" + name, run)


def parallel_params(fast: list[str], slow: list[str]) -> list:
    """pytest parameters for `parallel_rel`: the fast specs, then the slow ones marked slow."""
    return [*fast, *(pytest.param(spec, marks=pytest.mark.slow) for spec in slow)]


def parallel_rel(spec: str, fast: list[str], slow: list[str]) -> float:
    """The relative loss difference of `spec`, run in one subprocess with the rest of its group."""
    return parallel_results(tuple(fast if spec in fast else slow))[spec]
