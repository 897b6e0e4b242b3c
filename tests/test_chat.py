"""Chat templates, special tokens added to a SentencePiece model, chat records, truncation and packing."""

import json

import numpy as np
import pytest

from maxlm import tokenizer
from maxlm.data import chat
from maxlm.data import sft as sft_data

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "one"},
    {"role": "assistant", "content": "two"},
    {"role": "user", "content": "three"},
    {"role": "assistant", "content": "four"},
]


@pytest.fixture(scope="module")
def tok(shared_tok_path):
    return tokenizer.load(shared_tok_path)


@pytest.fixture(scope="module")
def tool_tok(shared_tok_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tooltok") / "tokenizer.model")
    return tokenizer.add_special_tokens(shared_tok_path, chat.INTERNLM2.special_tokens, out)[0]


def _trained_text(tok, ids, weights):
    return tok.decode([i for i, w in zip(ids, weights) if w])


def test_chatml_text_and_mask(tok):
    ids, weights = chat.render(chat.CHATML, tok, CONVERSATION)
    assert ids[0] == tok.bos_id and weights[0] == 0
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\none<|im_end|>\n"
                "<|im_start|>assistant\ntwo<|im_end|>\n<|im_start|>user\nthree<|im_end|>\n"
                "<|im_start|>assistant\nfour<|im_end|>\n")
    assert tok.decode(ids[1:].tolist()) == expected
    # Every assistant turn is trained, with its end marker; nothing else is.
    trained = [tok.id_to_piece(i) for i, w in zip(ids, weights) if w]
    assert tok.decode([i for i, w in zip(ids, weights) if w]) == "two<|im_end|>four<|im_end|>"
    assert trained.count("<|im_end|>") == 2
    # The sampler's prompt is the rendered conversation so far plus the assistant header, token for token.
    prompt = chat.render_prompt(chat.CHATML, tok, CONVERSATION[:4])
    full, _ = chat.render(chat.CHATML, tok, CONVERSATION)
    assert prompt == full[:len(prompt)].tolist()
    assert tok.decode(full[len(prompt):].tolist()) == "four<|im_end|>\n"


def test_special_tokens_added_without_retraining(tok, tool_tok, shared_tok_path, tmp_path):
    added = chat.INTERNLM2.special_tokens[2:]
    assert tool_tok.vocab_size == tok.vocab_size + len(added)
    for k, piece in enumerate(added):
        assert tool_tok.encode(piece) == [tok.vocab_size + k]
    text = "doc 3: the quick brown fox 数据 <|im_start|>user\n"
    assert tool_tok.encode(text) == tok.encode(text)  # old text keeps its ids
    again, none = tokenizer.add_special_tokens(shared_tok_path, chat.CHATML.special_tokens, str(tmp_path / "t.model"))
    assert none == [] and again.vocab_size == tok.vocab_size and not (tmp_path / "t.model").exists()


def test_internlm2_tool_use(tool_tok):
    messages = [
        {"role": "system", "content": "Use the interpreter."},
        {"role": "user", "content": "the sum"},
        {"role": "assistant", "content": "run it", "tool_call": {"name": "interpreter", "content": "1+2"}},
        {"role": "environment", "name": "interpreter", "content": "3"},
        {"role": "assistant", "content": "three"},
    ]
    chat.check_messages(chat.INTERNLM2, messages)
    ids, weights = chat.render(chat.INTERNLM2, tool_tok, messages)
    text = tool_tok.decode(ids[1:].tolist())
    assert ("<|im_start|>assistant\nrun it<|action_start|><|interpreter|>\n1+2<|action_end|><|im_end|>\n"
            "<|im_start|>environment name=<|interpreter|>\n3<|im_end|>\n") in text
    assert _trained_text(tool_tok, ids, weights) == \
        "run it<|action_start|><|interpreter|>\n1+2<|action_end|><|im_end|>three<|im_end|>"
    with pytest.raises(chat.MessageError, match="unknown_role"):
        chat.check_messages(chat.CHATML, messages[3:])
    with pytest.raises(chat.MessageError, match="bad_tool_call"):
        chat.check_messages(chat.CHATML, messages[2:3])


def test_template_from_json(tmp_path, tok):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"name": "plain", "roles": ["user", "assistant"], "trained_roles": ["assistant"],
                                "header": "{role}:", "end": "</s>", "separator": "\n", "special_tokens": []}))
    template = chat.load_template(str(path))
    ids, weights = chat.render(template, tok, CONVERSATION[1:3])
    assert tok.decode(ids[1:].tolist()) == "user:one</s>\nassistant:two</s>\n"
    with pytest.raises(FileNotFoundError):
        chat.load_template("no_such_template")


def test_record_shapes_agree():
    shaped = {"system": "Be brief.", "history": [["one", "two"]], "prompt": "three", "response": "four"}
    assert sft_data.to_messages(shaped) == CONVERSATION
    assert sft_data.to_messages({"messages": CONVERSATION[1:]}, system_prompt="Be brief.") == CONVERSATION
    assert sft_data.to_messages({"messages": CONVERSATION}, system_prompt="other") == CONVERSATION


def test_malformed_records_are_counted_by_reason(tok, tmp_path):
    good = {"messages": CONVERSATION}
    lines = [json.dumps(good), "{broken", json.dumps([1, 2]), json.dumps({"text": "x"}),
             json.dumps({"messages": []}), json.dumps({"messages": [{"role": "user", "content": 3}]}),
             json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"prompt": "q", "response": "a", "history": [["only one"]]}),
             json.dumps({"prompt": "x " * 400, "response": "y"}), '{"prompt": "\\ud800", "response": "y"}', "",
             json.dumps(good)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe not utf-8\n")
    convs = sft_data.load_jsonl(str(tmp_path / "*.jsonl"), sft_data.Conversations(chat.CHATML, tok, 64))
    assert len(convs) == 2
    assert {k: v for k, v in convs.skipped.items() if v} == {
        "bad_utf8": 2, "bad_json": 1, "not_object": 1, "unknown_shape": 1, "no_messages": 1, "bad_message": 2,
        "unknown_role": 1, "no_assistant": 1, "too_long": 1}
    assert "skipped 11" in convs.summary()
    with pytest.raises(FileNotFoundError):
        sft_data.load_jsonl(str(tmp_path / "none*.jsonl"), convs)


def test_truncation_drops_oldest_rounds_keeps_system(tok):
    rounds = [{"role": r, "content": f"{r} {k} " + "word " * 6} for k in range(6) for r in ("user", "assistant")]
    messages = [{"role": "system", "content": "sys"}] + rounds
    full, _ = chat.render(chat.CHATML, tok, messages)
    ids, weights, dropped = chat.truncate_left(chat.CHATML, tok, messages, len(full) - 5)
    assert dropped == 1
    text = tok.decode(ids[1:].tolist())
    assert text.startswith("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nuser 1 ")
    assert text.endswith("assistant 5 " + "word " * 6 + "<|im_end|>\n")
    expected, _ = chat.render(chat.CHATML, tok, messages[:1] + rounds[2:])
    assert ids.tolist() == expected.tolist() and len(ids) <= len(full) - 5
    with pytest.raises(chat.MessageError, match="too_long"):
        chat.truncate_left(chat.CHATML, tok, messages, 20)


def _conversations(tok, n, seed=0):
    rng = np.random.default_rng(seed)
    convs = sft_data.Conversations(chat.CHATML, tok, 65)
    for k in range(n):
        words = " ".join(["fox", "dog", "box", "jump"][int(i)] for i in rng.integers(0, 4, int(rng.integers(1, 8))))
        convs.add({"prompt": f"q{k} {words}", "response": words})
    return convs


def test_packing_keeps_conversations_whole(tok):
    convs = _conversations(tok, 40)
    it = sft_data.SFTIterator(convs, seq_len=64, batch_size=4, seed=3, pad_id=tok.pad_id)
    lengths = sorted(len(ids) - 1 for ids, _ in convs.items)
    seen = []
    for _ in range(3):
        batch = next(it)
        for r in range(4):
            seg, pos = batch["segment_ids"][r], batch["positions"][r]
            for s in range(1, seg.max() + 1):
                span = np.flatnonzero(seg == s)
                assert (np.diff(span) == 1).all() and (pos[span] == np.arange(len(span))).all()
                seen.append(len(span))
            pad = seg == 0
            assert (batch["loss_weights"][r][pad] == 0).all() and (batch["inputs"][r][pad] == tok.pad_id).all()
            # Greedy packing: the next conversation did not fit in this row's padding.
            assert pad.sum() < 64
    assert set(seen) <= set(lengths) and it.stats["conversations"] == len(seen)


def test_iterator_resumes_exactly_and_splits_hosts(tok):
    convs = _conversations(tok, 25)
    a = sft_data.SFTIterator(convs, seq_len=64, batch_size=4, seed=1, pad_id=tok.pad_id)
    for _ in range(7):  # past an epoch boundary
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    b = sft_data.SFTIterator(convs, seq_len=64, batch_size=4, seed=1, pad_id=tok.pad_id)
    b.set_state(state)
    host1 = sft_data.SFTIterator(convs, seq_len=64, batch_size=4, seed=1, pad_id=tok.pad_id, host_id=1, num_hosts=2)
    host1.set_state(state)
    for _ in range(3):
        x, y, h = next(a), next(b), next(host1)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
            np.testing.assert_array_equal(x[k][2:], h[k])
    with pytest.raises(ValueError, match="seed"):
        sft_data.SFTIterator(convs, seq_len=64, batch_size=4, seed=2).set_state(state)


def test_answer_mask_against_hand_laid_out_targets(tok):
    """`render`'s weights and a packed SFT row's loss_weights against a mask written down here: the ids are laid out
    piece by piece, and a target carries weight 1 exactly when it is an assistant reply token or the <|im_end|>
    closing that reply -- target j is token j + 1, so the weights are the token mask shifted left by one."""
    end, newline = tok.piece_to_id("<|im_end|>"), tok.encode("\n")
    assert tok.encode("<|im_end|>") == [end] and len(newline) == 1
    layout, replies = [[tok.bos_id]], []  # the conversation's pieces of ids; indices of the trained pieces
    for message in CONVERSATION:
        layout += [tok.encode(f"<|im_start|>{message['role']}\n"), tok.encode(message["content"])]
        if message["role"] == "assistant":
            replies += [len(layout) - 1, len(layout)]  # the content and its end marker
        layout += [[end], newline]
    ids = np.concatenate(layout)
    starts = np.cumsum([0] + [len(p) for p in layout])
    token_mask = np.zeros(len(ids), np.float32)
    for k in replies:
        token_mask[starts[k]:starts[k + 1]] = 1.0
    assert token_mask.sum() == len(tok.encode("two")) + len(tok.encode("four")) + 2
    target_mask = token_mask[1:]

    rendered, weights = chat.render(chat.CHATML, tok, CONVERSATION)
    np.testing.assert_array_equal(rendered, ids)
    np.testing.assert_array_equal(weights, token_mask)

    # One conversation, then two packed into a row: each segment's weights are its conversation's target mask.
    other = [{"role": "user", "content": "fox"}, {"role": "assistant", "content": "dog box"}]
    o_ids = np.concatenate([[tok.bos_id], tok.encode("<|im_start|>user\n"), tok.encode("fox"), [end], newline,
                            tok.encode("<|im_start|>assistant\n"), tok.encode("dog box"), [end], newline])
    o_reply = len(o_ids) - 2 - len(tok.encode("dog box"))  # index of the first reply token
    o_target_mask = np.zeros(len(o_ids) - 1, np.float32)
    o_target_mask[o_reply - 1:len(o_ids) - 2] = 1.0  # targets o_reply .. the end marker
    expected = {tuple(ids[:-1]): (ids[1:], target_mask), tuple(o_ids[:-1]): (o_ids[1:], o_target_mask)}
    for records in ([{"messages": CONVERSATION}], [{"messages": CONVERSATION}, {"messages": other}]):
        convs = sft_data.Conversations(chat.CHATML, tok, 128)
        assert all(convs.add(r) for r in records)
        batch = next(sft_data.SFTIterator(convs, seq_len=112, batch_size=1, seed=0, pad_id=tok.pad_id))
        seg = batch["segment_ids"][0]
        assert seg.max() == len(records)
        for s in range(1, len(records) + 1):
            span = seg == s
            targets, mask = expected[tuple(batch["inputs"][0][span].tolist())]
            np.testing.assert_array_equal(batch["targets"][0][span], targets)
            np.testing.assert_array_equal(batch["loss_weights"][0][span], mask)
        assert not batch["loss_weights"][0][seg == 0].any()
    # The first trained target is the first reply's first token, read at the header's newline; the last is <|im_end|>,
    # read at the last reply's last token; the separator after it is not trained.
    first, last = np.flatnonzero(target_mask)[[0, -1]]
    assert ids[first] == newline[0] and ids[first + 1] == tok.encode("two")[0]
    assert ids[last + 1] == end and ids[last] == tok.encode("four")[-1] and target_mask[last + 1] == 0


@pytest.mark.parametrize("name", sorted(chat.TEMPLATES))
def test_to_jinja_renders_what_maxlm_trains_on(name):
    """`chat.to_jinja` (what an export writes as its chat template) rendered by transformers' own Jinja
    environment gives the text of maxlm's pieces: headers, names, tool calls, markers and the generation
    prompt, on contents with Jinja syntax, quotes and backslashes in them."""
    render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    template = chat.TEMPLATES[name]
    messages = [{"role": "system", "content": "Be {{ brief }} and \"exact\"."},
                {"role": "user", "content": "a\\b\n{% raw %}"}, {"role": "assistant", "content": "ok"}]
    if name == "internlm2":
        messages[0]["name"] = "interpreter"
        messages += [{"role": "user", "content": "run it"},
                     {"role": "assistant", "content": "", "tool_call": {"name": "interpreter", "content": "print(1)"}},
                     {"role": "environment", "name": "interpreter", "content": "1"}]
    for prompt in (False, True):
        (text,), _ = render_jinja_template(conversations=[messages], chat_template=chat.to_jinja(template),
                                           add_generation_prompt=prompt, bos_token="<s>")
        want = "<s>" + "".join(piece for m in messages for piece, _ in chat._pieces(template, m))
        assert text == want + (template.generation_prompt() if prompt else "")
