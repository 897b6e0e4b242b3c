"""A model's own chat template (`sft.template=hf`, maxlm/data/chat_hf.py) against transformers'
`apply_chat_template` -- the oracle -- on 24 multi-turn conversations with system and tool messages, in four
template styles written here after the published formats of Qwen3 (ChatML, tools, an empty thinking block on
the final turns), Llama 3 (headers, `ipython` tool results, trimmed content), Gemma 3 (the system prompt folded
into the first user turn, role `model`) and Mistral (`[INST]`, the system prompt moving to the last user turn, so
earlier prompts are not prefixes of the whole rendering). Every template marks what the model must produce with
`{% generation %}`, so transformers' `return_assistant_tokens_mask` is an independent oracle for maxlm's loss
mask, which never reads those tags (it renders prefixes)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from maxlm import tokenizer as tokenizer_lib
from maxlm.data import chat, chat_hf
from maxlm.data import sft as sft_data
from maxlm.errors import InputError
from tests.helpers import CHAT_STOPS, CHAT_STYLES

transformers = pytest.importorskip("transformers")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city (摄氏度).",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TEXTS = ["What is 2 + 3?", "  leading and trailing spaces  ", "北京今天天气怎么样？", "emoji 🙂👍 ok",
         "def f(x):\n    return x * 2\n", "Line one.\nLine two.\n\nLine four.", "Use <b>tags</b> & \"quotes\"",
         "naïve café — 'quotes'", "42", "Tabs\tand\u3000ideographic spaces"]


def _conversations(n: int = 24, seed: int = 0) -> list[tuple[list[dict], list | None]]:
    """Multi-turn conversations; every third has a system message, every other one calls a tool."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": rng.choice(["You are terse.", "你是一个有用的助手。"])}] if i % 3 else []
        tools = None
        for turn in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": rng.choice(TEXTS)})
            if i % 2 and turn == 0:
                tools = TOOLS
                city = rng.choice(["Paris", "上海"])
                messages += [
                    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                        "name": "get_weather", "arguments": {"city": city}}}]},
                    {"role": "tool", "content": json.dumps({"city": city, "temp": rng.randint(-5, 30)},
                                                           ensure_ascii=False)}]
            messages.append({"role": "assistant", "content": rng.choice(TEXTS)})
        out.append((messages, tools))
    return out


def _auto(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def _ids(result) -> list[int]:
    return list(result["input_ids"] if hasattr(result, "keys") else result)


@pytest.mark.parametrize("style", sorted(CHAT_STYLES))
def test_ids_and_mask_equal_apply_chat_template(style, chat_folders):
    auto = _auto(chat_folders[style])
    tok = tokenizer_lib.load(chat_folders[style])
    template = chat.load_template("hf", tok.path)
    assert isinstance(template, chat_hf.HFTemplate) and template.stop == CHAT_STOPS[style]
    trained_convs = 0
    for messages, tools in _conversations():
        chat.check_messages(template, messages)
        ids, weights = chat.render(template, tok, messages, tools=tools)
        want = auto.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
        assert ids.tolist() == _ids(want), (style, messages)
        assert weights.tolist() == [float(m) for m in want["assistant_masks"]], (style, messages)
        trained_convs += int(weights.any())
        for i, m in enumerate(messages):  # the prompt a sampler gets before each assistant turn
            if m["role"] == "assistant":
                prompt = auto.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True,
                                                  tokenize=True)
                assert chat.render_prompt(template, tok, messages[:i], tools=tools) == _ids(prompt)
    assert trained_convs == 24


def test_every_trained_token_is_assistant_text(chat_folders):
    """The mask read as text: exactly each assistant reply (after its generation prompt) and its end marker."""
    tok = tokenizer_lib.load(chat_folders["llama3"])
    template = chat.load_template("hf", tok.path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "  Hello there  "}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    ids, weights = chat.render(template, tok, messages)
    pieces = [tok.id_to_piece(int(i)) for i, w in zip(ids, weights) if w]
    assert "".join(pieces).replace("Ġ", " ") == "Hello there<|eot_id|>4<|eot_id|>"


def test_truncation_renders_again_and_keeps_system(chat_folders):
    tok = tokenizer_lib.load(chat_folders["qwen3"])
    template = chat.load_template("hf", tok.path)
    auto = _auto(chat_folders["qwen3"])
    messages = [{"role": "system", "content": "You are terse."}]
    for k in range(6):
        messages += [{"role": "user", "content": f"Question {k}: " + TEXTS[k]},
                     {"role": "assistant", "content": f"Answer {k}."}]
    full, _ = chat.render(template, tok, messages)
    ids, weights, dropped = chat.truncate_left(template, tok, messages, len(full) - 10)
    assert dropped >= 1
    kept = [messages[0]] + messages[1 + 2 * dropped:]
    assert ids.tolist() == _ids(auto.apply_chat_template(kept, tokenize=True))
    convs = sft_data.Conversations(template, tok, len(full) - 10)
    assert convs.add({"messages": messages}) and convs.truncated == 1
    with pytest.raises(chat.MessageError, match="too_long"):
        chat.truncate_left(template, tok, messages, 20)


def test_a_folder_without_a_template_or_tokenizer_json_is_one_line(chat_folders, tmp_path, shared_tok_path):
    import shutil

    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(f"{chat_folders['llama3']}/tokenizer.json", plain / "tokenizer.json")
    (plain / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    with pytest.raises(InputError, match="no chat template"):
        chat.load_template("hf", str(plain / "tokenizer.json"))
    with pytest.raises(InputError, match="needs a Hugging Face tokenizer.json"):
        chat.load_template("hf", shared_tok_path)
    (plain / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }{% endfor %}")
    with pytest.raises(InputError, match="does not parse"):
        chat.load_template("hf", str(plain))
    (plain / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{{ m.content }}<|eot_id|>{% endfor %}")
    template = chat.load_template("hf", str(plain))
    with pytest.raises(chat.MessageError, match="no tools here"):
        template.check([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]) or \
            chat.render(template, tokenizer_lib.load(str(plain)), [{"role": "tool", "content": "x"}])
    assert np.asarray(chat.render(template, tokenizer_lib.load(str(plain)),
                                  [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])[1]).any()


def test_sft_with_the_models_own_template_and_its_export(chat_folders, tmp_path):
    """`sft.template=hf` from a Llama-3-style folder: the run trains on apply_chat_template's ids, keeps the
    template beside its tokenizer (so evaluation renders prompts the same way), and its export's AutoTokenizer
    renders the same ids."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from maxlm import config as C
    from maxlm.data import tasks
    from maxlm.interop import hf, pretrained
    from maxlm.posttrain import sft
    from tests.helpers import ROOT

    base = tmp_path / "base"
    vocab = tokenizer_lib.load(chat_folders["llama3"]).vocab_size
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(str(base))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{chat_folders['llama3']}/{name}", base / name)
    work = str(tmp_path / "sft")
    config = C.override(C.load_config_file(f"{ROOT}/configs/sft_tiny.py"), **{
        "sft.base": str(base), "sft.template": "hf", "sft.tasks": ("format",), "sft.task_train_size": 16,
        "sft.task_eval_size": 4, "sft.eval_items": 2, "sft.system_prompt": "Be brief.", "data.seq_len": 128,
        "data.batch_size": 4, "train.num_steps": 2, "train.log_every": 1, "train.eval_every": 0,
        "checkpoint.every_steps": 2, "optim.warmup_steps": 1})
    history = sft.finetune(config, work)
    assert [r["step"] for r in history] == [1, 2]

    run_config, _, _ = pretrained.load_workdir(work)
    run_tok = tokenizer_lib.load(tokenizer_lib.run_tokenizer_path(run_config, work))
    assert run_tok.vocab_size == vocab  # the model's own template adds no markers
    template = chat.load_template(run_config.sft.template, run_tok.path)
    item = tasks.make_items("format", "train", 1, seed=run_config.sft.task_seed)[0]
    messages = tasks.messages(item, "Be brief.")
    convs = sft.load_conversations(run_config, run_tok, template, "train")
    auto = AutoTokenizer.from_pretrained(str(base))
    assert convs.items[0][0].tolist() == _ids(auto.apply_chat_template(messages, tokenize=True))

    out = str(tmp_path / "export")
    _, params, _ = pretrained.load_workdir(work)
    hf.to_hf(run_config, params, out)
    tokenizer_lib.export(tokenizer_lib.run_tokenizer_path(run_config, work), out)
    exported = AutoTokenizer.from_pretrained(out)
    ids, _ = chat.render(template, run_tok, messages)
    assert _ids(exported.apply_chat_template(messages, tokenize=True)) == ids.tolist()
