"""The life cycle from each open-weight family's Hugging Face folder (issue 22: Qwen3, Llama 3, Qwen2.5,
Mistral, Gemma 3): SFT (full and LoRA) with the
model's own chat template -> reward model -> PPO -> evaluation -> export, on tiny random-initialised models
built here with a byte-level BPE `tokenizer.json` and a chat template in the family's style. The oracles are
transformers: the exported folder loads with the Auto classes and reproduces the PPO actor's logits and
`apply_chat_template`'s ids.

One family runs in the default suite (Qwen3: QK-norm, no BOS token, a template whose final turn differs); the
others are `slow` (`pytest -m slow tests/test_lifecycle.py`).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from maxlm import config as C
from maxlm import tokenizer as tokenizer_lib
from maxlm.data import chat, tasks
from maxlm.evaluation import harness
from maxlm.interop import hf, pretrained
from maxlm.model import decoder as model_lib
from maxlm.posttrain import ppo, reward, sft
from tests.helpers import HF_TOL, ROOT, build_hf, hf_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# family -> (HF class, template style, config kwargs)
FAMILIES = {
    "qwen3": ("Qwen3ForCausalLM", "qwen3", dict(head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True)),
    "llama3": ("LlamaForCausalLM", "llama3", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2ForCausalLM", "qwen3", {}),
    "mistral": ("MistralForCausalLM", "mistral", dict(sliding_window=48, head_dim=8)),
    "gemma3": ("Gemma3ForCausalLM", "gemma3", dict(head_dim=8, sliding_window=16, query_pre_attn_scalar=8,
                                                     layer_types=["sliding_attention", "full_attention"],
                                                     rope_local_base_freq=10000.0, tie_word_embeddings=True)),
}
FAST = {"qwen3"}


def _base(family: str, folders: dict, path) -> str:
    class_name, style, kwargs = FAMILIES[family]
    vocab = tokenizer_lib.load(folders[style]).vocab_size
    build_hf(class_name, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_key_value_heads=2,
             **kwargs).save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(folders[style], name), path / name)
    return str(path)


def _config(name: str, **overrides):
    return C.override(C.load_config_file(os.path.join(ROOT, "configs", name)), **{
        "sft.template": "hf", "sft.tasks": ("sort",), "sft.task_train_size": 16, "sft.task_eval_size": 4,
        "sft.eval_items": 0, "data.seq_len": 128, "data.batch_size": 4, "train.log_every": 1,
        "train.eval_every": 0, "optim.warmup_steps": 1, **overrides})


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_sft_lora_reward_ppo_evaluate_export(family, chat_folders, tmp_path):
    base = _base(family, chat_folders, tmp_path / "base")
    steps = {"train.num_steps": 2, "checkpoint.every_steps": 2}

    full, lora = str(tmp_path / "sft"), str(tmp_path / "lora")
    assert [r["step"] for r in sft.finetune(_config("sft_tiny.py", **{"sft.base": base, **steps}), full)] == [1, 2]
    assert [r["step"] for r in sft.finetune(_config("sft_tiny.py", **{
        "sft.base": base, "lora.rank": 4, **steps}), lora)] == [1, 2]

    rm = str(tmp_path / "rm")
    history = reward.train_reward(_config("reward_tiny.py", **{
        "reward.base": full, "reward.train_size": 8, "reward.eval_size": 4, "reward.policy_samples": 0,
        **steps}), rm)
    assert [r["step"] for r in history] == [1, 2] and all(np.isfinite(r["loss"]) for r in history)

    actor = str(tmp_path / "ppo")
    history = ppo.run_ppo(_config("ppo_tiny.py", **{
        "ppo.policy": lora, "ppo.reward_model": rm, "ppo.iterations": 1, "ppo.rollout_batch": 4, "ppo.epochs": 1,
        "ppo.max_new_tokens": 4, "ppo.eval_every": 100, "ppo.eval_items": 2, "checkpoint.every_steps": 1}), actor)
    assert history and all(np.isfinite(r["loss"]) for r in history if "loss" in r)

    config, params, _ = pretrained.load_workdir(actor)
    tok = tokenizer_lib.load(tokenizer_lib.run_tokenizer_path(config, actor))
    result = harness.task_accuracy(config, params, tok, "sort", n=2)
    assert result["n"] == 2 and 0.0 <= result["accuracy"] <= 1.0

    out = str(tmp_path / "export")
    hf.to_hf(config, params, out)
    tokenizer_lib.export(tokenizer_lib.run_tokenizer_path(config, actor), out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                                 dtype=torch.float32).eval()
    assert type(reloaded).__name__ == FAMILIES[family][0]
    messages = tasks.messages(tasks.make_items("sort", "eval", 1, seed=config.sft.task_seed)[0], with_answer=True)
    ids, _ = chat.render(chat.load_template("hf", tok.path), tok, messages)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    want = auto.apply_chat_template(messages, tokenize=True)
    assert ids.tolist() == list(want["input_ids"] if hasattr(want, "keys") else want)
    tokens = ids[None, :]
    got = np.asarray(model_lib.apply(config, params, tokens))
    assert float(np.max(np.abs(got - hf_logits(reloaded, tokens)))) <= HF_TOL
