"""Session-wide fixtures: one small jsonl corpus and one tokenizer trained on it (training a tokenizer is
most of a tiny run's start-up, so tests that only need *a* tokenizer share this one), and a small
random-weight Hugging Face model using that tokenizer (a base for fine-tuning tests)."""

import os
import shutil
import subprocess
import sys

# With the `tpu` extra installed, JAX would look for a TPU in every test process (and its subprocesses); the
# suite runs on the CPU, and the `tpu` tests compile for TPU topologies without a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from maxlm import tokenizer  # noqa: E402
from tests.helpers import ROOT, small_config, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def shared_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared_data") / "corpus.jsonl"
    write_corpus(path)
    return path


@pytest.fixture(scope="session")
def shared_tok_path(shared_corpus, tmp_path_factory):
    """A 320-piece BPE model with the ChatML markers as user-defined symbols (`small_config`'s choices)."""
    folder = tmp_path_factory.mktemp("shared_tok")
    tokenizer.load_or_train(small_config(shared_corpus), str(folder))
    return str(folder / "tokenizer.model")


@pytest.fixture(scope="session")
def hf_base(shared_tok_path, tmp_path_factory):
    """A random-weight transformers Llama (2 layers, width 32) with the shared tokenizer beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf_base")
    vocab = tokenizer.load(shared_tok_path).vocab_size
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False))
    hf.save_pretrained(str(folder), safe_serialization=True)
    shutil.copy(shared_tok_path, folder / "tokenizer.model")
    return str(folder)


@pytest.fixture(scope="session")
def reward_run(hf_base, tmp_path_factory):
    """`python -m maxlm.reward` for 3 steps on `hf_base` with both built-in preference domains:
    (workdir, the finished process). The reward-model tests check it; PPO tests use it as their RM."""
    work = str(tmp_path_factory.mktemp("reward") / "rm")
    flags = [f"--config.reward.base={hf_base}", "--config.reward.domains=('correct','brief')",
             "--config.reward.train_size=16", "--config.reward.eval_size=8", "--config.data.batch_size=4",
             "--config.data.seq_len=192", "--config.train.num_steps=3", "--config.train.log_every=1",
             "--config.train.eval_every=3", "--config.train.eval_batches=2", "--config.checkpoint.every_steps=3",
             "--config.optim.warmup_steps=1"]
    done = subprocess.run([sys.executable, "-m", "maxlm.reward", "--config=configs/reward_tiny.py",
                           f"--workdir={work}", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return work, done


@pytest.fixture(scope="session")
def chat_folders(tmp_path_factory):
    """A Hugging Face tokenizer folder per chat-template style of `tests.helpers.CHAT_STYLES` (Qwen3, Llama 3,
    Gemma 3, Mistral): a small byte-level BPE with the style's markers and its Jinja chat template."""
    import json
    import random

    from tests.helpers import CHAT_STYLES, write_chat_tokenizer

    rng = random.Random(0)
    words = ["What is 2 + 3?", "北京今天天气怎么样？", "emoji 🙂👍 ok", "def f(x):\n    return x * 2\n",
             "Use <b>tags</b> & \"quotes\"", "naïve café", "Tabs\tand\u3000spaces", "42", "sort the letters"]
    lines = [" ".join(rng.choice(words) for _ in range(3)) for _ in range(600)]
    lines += [json.dumps({"name": "get_weather", "parameters": {"city": "上海"}}, ensure_ascii=False)] * 20
    return {style: write_chat_tokenizer(tmp_path_factory.mktemp(f"chat_{style}"), style, lines)
            for style in CHAT_STYLES}
