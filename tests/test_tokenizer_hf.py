"""Hugging Face `tokenizer.json` support (issue 22): `maxlm.tokenizer.load` reads a Llama-3-style byte-level
BPE folder, and its ids equal transformers' `AutoTokenizer` on the same folder -- the oracle -- over more than
10,000 lines of mixed text (the standard library's source, generated Chinese, emoji, whitespace runs);
decoding round-trips; chat markers added to it are single tokens that AutoTokenizer reads the same way.

Export: a SentencePiece run's export reads back in AutoTokenizer -- fast, with bos, without protobuf -- as
maxlm's `[bos] + encode(text)` over the same lines; bos framing (`add_bos`, `text_prefix`) follows what
AutoTokenizer does for Llama-3-, Qwen- (no bos) and GPT-2-style (a bos never added) tokenizers."""

from __future__ import annotations

import json
import os
import random
import sysconfig

import pytest

from maxlm import tokenizer as tokenizer_lib
from tests.helpers import LLAMA3_SPLIT

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def _mixed_lines(n_source: int, seed: int = 0) -> list[str]:
    """Lines of the standard library's Python source, then generated Chinese, emoji and whitespace runs."""
    rng = random.Random(seed)
    lines: list[str] = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in sorted(os.listdir(stdlib)):
        if name.endswith(".py") and len(lines) < n_source:
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
                lines += [line.rstrip("\n") for line in f if line.strip()]
    lines = lines[:n_source]
    han = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单研"
    for _ in range(2000):
        lines.append("".join(rng.choice(han) for _ in range(rng.randint(1, 40))))
    emoji = [chr(c) for c in range(0x1F600, 0x1F64F)] + ["\U0001F468\u200D\U0001F469\u200D\U0001F467", "\u2764\uFE0F"]
    for _ in range(1000):
        lines.append(" ".join(rng.choice(emoji) + rng.choice(["", "ok", "好", "42"]) for _ in range(rng.randint(1, 8))))
    for _ in range(500):
        lines.append("".join(rng.choice([" ", "  ", "\t", "\n", "x", "\u3000", "if", "  \n"]) for _ in range(20)))
    lines += ["", " ", "\u2581 literal", "naïve café", "x=1;y=2  # comment", "<|begin_of_text|> in text"]
    return lines


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    """A Llama-3-style tokenizer trained here: byte-level BPE (2,000 tokens) under Llama 3's split, bos/eos
    as special tokens, a post-processor that prepends bos, and the tokenizer_config.json naming them."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("llama3_tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_mixed_lines(20000, seed=1), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": {"__type": "AddedToken", "content": EOS, "special": True, "lstrip": False,
                                    "rstrip": False, "normalized": False, "single_word": False}, "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192, "clean_up_tokenization_spaces": False}))
    return str(folder)


def test_ids_equal_auto_tokenizer_over_mixed_text(llama3_folder):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(llama3_folder)
    tok = tokenizer_lib.load(llama3_folder)
    lines = _mixed_lines(7000)
    assert len(lines) >= 10_000
    mismatches = [line for line in lines if tok.encode(line) != ref.encode(line, add_special_tokens=False)]
    assert not mismatches, (len(mismatches), mismatches[:3])
    # Byte-level BPE is lossless, except that bos / eos written in the text become those ids (as in
    # AutoTokenizer), which decode drops like SentencePiece's control pieces.
    assert [line for line in lines if tok.decode(tok.encode(line)) != line] == ["<|begin_of_text|> in text"]
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert tok.pad_id == tok.eos_id and tok.vocab_size == len(ref)  # no pad token: eos is the filler
    assert tok.decode([tok.bos_id] + tok.encode("hi there") + [tok.eos_id]) == "hi there"


def test_load_takes_a_file_or_a_folder_and_names_what_is_wrong(llama3_folder, shared_tok_path, tmp_path):
    assert isinstance(tokenizer_lib.load(os.path.join(llama3_folder, "tokenizer.json")), tokenizer_lib.HFTokenizer)
    assert isinstance(tokenizer_lib.load(llama3_folder), tokenizer_lib.HFTokenizer)
    sp_folder = tmp_path / "sp"
    sp_folder.mkdir()
    (sp_folder / "tokenizer.model").write_bytes(open(shared_tok_path, "rb").read())
    assert isinstance(tokenizer_lib.load(str(sp_folder)), tokenizer_lib.Tokenizer)
    assert tokenizer_lib.file_name(llama3_folder) == "tokenizer.json"
    assert tokenizer_lib.file_name(shared_tok_path) == "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        tokenizer_lib.load(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
        tokenizer_lib.load(str(tmp_path))


def test_chat_markers_are_added_as_single_tokens_that_auto_tokenizer_reads_alike(llama3_folder, tmp_path):
    from transformers import AutoTokenizer

    base = tokenizer_lib.load(llama3_folder)
    markers = ["<|im_start|>", "<|im_end|>"]
    target = str(tmp_path / "tokenizer.json")
    tok, added = tokenizer_lib.add_special_tokens(llama3_folder, markers, target)
    assert added == markers and tok.vocab_size == base.vocab_size + 2
    assert os.path.exists(tmp_path / "tokenizer_config.json")  # bos / eos still known in the copy
    assert (tok.bos_id, tok.eos_id) == (base.bos_id, base.eos_id)
    text = "<|im_start|>user\nSort 3 1 2<|im_end|>\n<|im_start|>assistant\n1 2 3<|im_end|>"
    ids = tok.encode(text)
    assert ids.count(tok.piece_to_id("<|im_start|>")) == 2 and ids.count(tok.piece_to_id("<|im_end|>")) == 2
    assert tok.decode(ids) == text
    plain = "no markers here, 数据 and 🙂"
    assert tok.encode(plain) == base.encode(plain)  # existing ids unchanged
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    assert ids == ref.encode(text, add_special_tokens=False)
    again, none = tokenizer_lib.add_special_tokens(target, markers, str(tmp_path / "other.json"))
    assert none == [] and again.vocab_size == tok.vocab_size and not os.path.exists(tmp_path / "other.json")


def test_fine_tuning_a_folder_with_a_tokenizer_json_and_exporting_it(llama3_folder, tmp_path):
    """SFT from a Llama folder whose tokenizer is a tokenizer.json: the run keeps a tokenizer.json (chat
    markers added), and its export reads back in AutoTokenizer with the run's ids and in AutoModelForCausalLM."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from maxlm import config as C
    from maxlm.interop import hf, pretrained
    from maxlm.posttrain import sft
    from tests.helpers import ROOT

    base = tmp_path / "base"
    torch.manual_seed(0)
    vocab = tokenizer_lib.load(llama3_folder).vocab_size
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(str(base))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(llama3_folder, name), base / name)
    work = str(tmp_path / "sft")
    config = C.override(C.load_config_file(os.path.join(ROOT, "configs", "sft_tiny.py")), **{
        "sft.base": str(base), "sft.template": "chatml", "sft.tasks": ("format",), "sft.task_train_size": 20,
        "sft.task_eval_size": 4, "sft.eval_items": 0, "data.seq_len": 256, "data.batch_size": 4,
        "train.num_steps": 2, "train.log_every": 1, "train.eval_every": 0, "checkpoint.every_steps": 2,
        "optim.warmup_steps": 1})
    history = sft.finetune(config, work)
    assert [r["step"] for r in history] == [1, 2]
    run_tok = tokenizer_lib.load(work)
    assert run_tok.path.endswith("tokenizer.json") and run_tok.vocab_size == vocab + 2
    out = str(tmp_path / "export")
    run_config, params, _ = pretrained.load_workdir(work)
    hf.to_hf(run_config, params, out)
    assert tokenizer_lib.export(tokenizer_lib.run_tokenizer_path(run_config, work), out) == [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    text = "<|im_start|>user\nFormat 3 as JSON<|im_end|>\n<|im_start|>assistant\n"
    assert AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False) == run_tok.encode(text)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == vocab + 2


NO_PROTOBUF = """
import json, sys
sys.modules["google.protobuf"] = None  # as if protobuf were not installed
sys.modules["google"] = None
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps([tok.encode(line) for line in json.loads(sys.argv[2])]))
"""


@pytest.fixture(scope="module")
def sp_export(tmp_path_factory):
    """A 2,000-piece SentencePiece BPE model trained by maxlm on the mixed lines (its own choices: byte
    fallback, digits split, whitespace pieces, ChatML markers) and its export folder."""
    from maxlm import config as C

    folder = tmp_path_factory.mktemp("sp_export")
    config = C.override(C.default_config(), **{"model.vocab_size": 2000, "tokenizer.train_max_bytes": 2_000_000})
    tokenizer_lib.train(_mixed_lines(20000, seed=1), str(folder / "sp"), config)
    out = folder / "export"
    written = tokenizer_lib.export(str(folder / "sp.model"), str(out), model_max_length=256)
    assert written == ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    return str(folder / "sp.model"), str(out)


def test_sentencepiece_export_gives_maxlm_ids_with_bos_in_auto_tokenizer(sp_export):
    from transformers import AutoTokenizer

    model, out = sp_export
    sp, ref = tokenizer_lib.load(model), AutoTokenizer.from_pretrained(out)
    assert type(ref).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")  # tokenizer.json, not the .model
    lines = _mixed_lines(7000) + ["1234567 89", "  \t\n\n   x", "<|im_start|>user\n你好<|im_end|>\n"]
    mismatches = [line for line in lines if ref.encode(line) != [sp.bos_id] + sp.encode(line)]
    # maxlm sends a literal U+2581 as bytes (so it decodes to itself); any tokenizer.json reads it as a space
    assert mismatches == [line for line in lines if "\u2581" in line] and len(mismatches) == 1
    decoded = {line: sp.decode(sp.encode(line), skip_special=True) for line in lines if "\u2581" not in line}
    assert [line for line, text in decoded.items() if ref.decode(ref.encode(line), skip_special_tokens=True) != text] == []
    assert (ref.bos_token_id, ref.eos_token_id) == (sp.bos_id, sp.eos_id)
    assert (ref.pad_token_id, ref.unk_token_id) == (sp.pad_id, sp.unk_id)
    assert ref.model_max_length == 256 and len(ref) == sp.vocab_size
    chat = "<|im_start|>user\nhi<|im_end|>"
    ids = ref.encode(chat, add_special_tokens=False)
    assert ids == sp.encode(chat)
    assert (ids[0], ids[-1]) == (sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>"))
    assert ref.decode(ids) == chat
    assert ref.decode(ids, skip_special_tokens=True) == "user\nhi" == sp.decode(ids, skip_special=True)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    assert (cfg["add_bos_token"], cfg["add_eos_token"]) == (True, False)
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<s>", "</s>")
    with open(os.path.join(out, "special_tokens_map.json")) as f:
        assert json.load(f)["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]


def test_sentencepiece_export_reads_without_protobuf(sp_export):
    import subprocess
    import sys

    model, out = sp_export
    sp = tokenizer_lib.load(model)
    lines = ["the quick brown fox", "数据 模型 训练", "def f(x):\n    return x  # 42", "🙂👍 ok", "a   b\t\tc\n\n"]
    done = subprocess.run([sys.executable, "-c", NO_PROTOBUF, out, json.dumps(lines)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[sp.bos_id] + sp.encode(line) for line in lines]


def test_chat_template_goes_into_tokenizer_config(sp_export, tmp_path):
    from transformers import AutoTokenizer

    model, _ = sp_export
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    tokenizer_lib.export(model, str(tmp_path), chat_template=template)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    assert ref.chat_template == template
    text = ref.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


def _byte_level(folder, config: dict, bos_in_post_processor: bool = False) -> str:
    """A small byte-level BPE tokenizer.json (GPT-2's split) with <|endoftext|> (and <|bos|>) as special tokens
    and the given tokenizer_config.json; the post-processor prepends <|bos|> when asked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|bos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_mixed_lines(200, seed=3), trainer)
    if bos_in_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
    return str(folder)


@pytest.mark.parametrize("style, config, post, add_bos", [
    ("qwen", {"bos_token": None, "eos_token": "<|endoftext|>"}, False, False),
    ("gpt2", {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, False, False),
    ("llama3", {"bos_token": "<|bos|>", "eos_token": "<|endoftext|>"}, True, True),
    # transformers 5's generic class frames text as tokenizer.json's post-processor does, whatever this key says
    ("config_says", {"bos_token": "<|bos|>", "eos_token": "<|endoftext|>", "add_bos_token": True}, False, False),
])
def test_bos_framing_follows_auto_tokenizer(tmp_path, style, config, post, add_bos):
    """Every scorer frames text with `text_prefix`: exactly what AutoTokenizer puts first, for each style."""
    from transformers import AutoTokenizer

    folder = _byte_level(tmp_path / style, config, post)
    tok, ref = tokenizer_lib.load(folder), AutoTokenizer.from_pretrained(folder)
    assert tok.add_bos == add_bos
    for text in ("Answer: B", "数据 and 🙂", "x"):
        assert tokenizer_lib.text_prefix(tok) + tok.encode(text) == ref.encode(text)
    # a document's first token is scored after bos, else eos (lm-evaluation-harness's prefix_token_id)
    expected = ref.bos_token_id if ref.bos_token_id is not None else ref.eos_token_id
    assert tokenizer_lib.score_prefix_id(tok) == expected
    out = tmp_path / f"{style}_export"
    tokenizer_lib.export(folder, str(out))
    again, ref_again = tokenizer_lib.load(str(out)), AutoTokenizer.from_pretrained(str(out))
    assert again.add_bos == add_bos and ref_again.encode("Answer: B") == ref.encode("Answer: B")
