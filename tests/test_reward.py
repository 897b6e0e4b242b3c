"""Reward model: the pairwise loss against numpy on unpadded sequences, the built-in (conflicting) preference
pairs, malformed records, and `python -m maxlm.reward` end to end on an imported Hugging Face model."""

import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import config as C
from maxlm import tokenizer
from maxlm.data import chat, tasks
from maxlm.data import preference
from maxlm.model import decoder as model
from maxlm.posttrain import reward
from tests.helpers import ROOT, pair_margins_by_hand, random_params, tiny_model_config


@pytest.fixture(scope="module")
def tok(shared_tok_path):
    return tokenizer.load(shared_tok_path)


def test_pair_loss_matches_numpy_on_unpadded_sequences(tok):
    config = tiny_model_config(tok.vocab_size)
    rng = np.random.default_rng(0)  # random weights drawn by numpy: compiling `model.init` would cost seconds
    params = reward.from_lm(random_params(model.abstract_params(config), rng, std=0.3))
    params["head"] = rng.normal(0, 1, params["head"].shape).astype(np.float32)
    pairs = preference.Pairs(chat.CHATML, tok, 192)
    rng = random.Random(0)
    for i, item in enumerate(tasks.make_items("sort", "train", 5)):
        system = "" if i % 2 else preference.DOMAINS["correct"]
        assert pairs.add({"prompt": item.prompt, "chosen": item.answer, "rejected": tasks.wrong_answer(item, rng),
                          "system": system})
    batch = preference.pair_batch(pairs.items, 192, tok.pad_id, rows=6)  # the 6th row is padding
    pair_loss = jax.jit(lambda p, b: reward.pair_loss(p, config, b))
    loss_sum, sums = pair_loss(params, batch)

    hidden = jax.jit(lambda p, x: model.hidden(config, p, x))

    def score(ids):  # the oracle: one unpadded sequence, the head applied to the last hidden state by numpy
        h = np.asarray(hidden(params["decoder"], jnp.asarray([ids])))[0, -1]
        return float(h @ np.asarray(params["head"]))

    margins = np.array([score(c) - score(r) for c, r in pairs.items])
    np.testing.assert_allclose(float(loss_sum), np.sum(np.log1p(np.exp(-margins))), rtol=1e-4)
    assert float(sums["weight"]) == 5
    assert float(sums["accuracy"]) == np.sum(margins > 0)
    np.testing.assert_allclose(float(sums["margin"]), margins.sum(), rtol=1e-4, atol=1e-4)
    # The untrained (zero) head ties every pair: a tie is not a correct ranking, and each pair costs log 2.
    tie_sum, ties = pair_loss(dict(params, head=0 * params["head"]), batch)
    assert float(ties["accuracy"]) == 0 and float(ties["margin"]) == 0
    np.testing.assert_allclose(float(tie_sum), 5 * np.log(2), rtol=1e-6)
    # Tokens after a sequence's last one (padding, or anything else) do not change its score.
    junk = dict(batch, chosen_inputs=np.where(batch["chosen_segment_ids"] == 0, 7, batch["chosen_inputs"]))
    np.testing.assert_allclose(float(pair_loss(params, junk)[0]), float(loss_sum), rtol=1e-6)


def test_builtin_pairs_and_conflicting_domains():
    records = preference.task_pairs(("sort", "add"), "train", 30, domains=("correct", "brief"))
    by_domain = {d: [r for r in records if r["domain"] == d] for d in ("correct", "brief")}
    for r in by_domain["correct"]:
        assert r["system"] == preference.DOMAINS["correct"] and r["chosen"] != r["rejected"]
    for r in by_domain["brief"]:  # the brief domain prefers a shorter, wrong reply over the right one
        assert len(r["chosen"]) < len(r["rejected"]) and r["system"] == preference.DOMAINS["brief"]
    items = {(t, i.prompt): i for t in ("sort", "add") for i in tasks.make_items(t, "train", 30)}
    for r in records:
        item = items[(r["task"], r["prompt"])]
        correct_one = r["chosen"] if r["domain"] == "correct" else r["rejected"]
        other = r["rejected"] if r["domain"] == "correct" else r["chosen"]
        assert tasks.check(item, correct_one) and not tasks.check(item, other)
    plain = preference.task_pairs(("sort",), "train", 10, domains=("correct", "brief"), conditional=False)
    assert all(r["system"] == "" for r in plain)
    held_out = {r["prompt"] for r in preference.task_pairs(("sort",), "eval", 30)}
    assert not held_out & {r["prompt"] for r in records if r["task"] == "sort"}
    with pytest.raises(ValueError, match="unknown preference domain"):
        preference.task_pairs(("sort",), "train", 1, domains=("kind",))


def test_malformed_pair_records_are_counted(tok, tmp_path):
    good = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    lines = [json.dumps(good), "{not json", json.dumps([1]), json.dumps({"prompt": "x", "chosen": 1, "rejected": "y"}),
             json.dumps({"prompt": "x", "chosen": "y", "rejected": "y"}),
             json.dumps({"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"}),
             json.dumps({**good, "chosen": "word " * 200}),
             json.dumps({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                    {"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "22",
                         "system": "Be right."})]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    pairs = preference.load_jsonl(str(path), preference.Pairs(chat.CHATML, tok, 128))
    assert len(pairs) == 2
    assert dict(pairs.skipped) == {"bad_json": 1, "not_object": 1, "bad_pair": 1, "identical": 1,
                                   "unknown_role": 1, "too_long": 1, "bad_utf8": 1}
    chosen, rejected = pairs.items[1]
    assert tok.decode(chosen.tolist()).startswith(tok.decode(
        chat.render_prompt(chat.CHATML, tok, [{"role": "system", "content": "Be right."},
                                              {"role": "user", "content": "hi"}])))


def _pair_metrics(margins):
    """Held-out pairwise metrics by definition: a pair is right when the chosen reply scores strictly higher."""
    return {"accuracy": float(np.mean(margins > 0)), "margin": float(np.mean(margins)),
            "loss": float(np.mean(np.log1p(np.exp(-margins)))), "n": len(margins)}


def test_reward_cli_end_to_end(reward_run, hf_base, tmp_path):
    work, done = reward_run
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3]
    result = json.load(open(os.path.join(work, "reward_eval.json")))
    by_domain = result["by_domain"]
    assert set(by_domain) == {"correct", "brief"} and by_domain["correct"]["n"] == 8  # one per held-out item
    assert 1 <= by_domain["brief"]["n"] <= 8 and result["n"] == 8 + by_domain["brief"]["n"]
    config, params, run_tok = reward.load(work)
    assert set(params) == {"decoder", "head"} and "lm_head" not in params["decoder"]
    assert np.abs(params["head"]).sum() > 0  # trained away from its zero init

    # Every held-out number against the final model's margins r_chosen - r_rejected, computed here per pair.
    held_out = reward.load_pairs(config, run_tok, chat.load_template(config.sft.template), "eval")
    margins, domains = pair_margins_by_hand(config, params, held_out.items), np.array(held_out.domains)
    assert np.abs(margins).min() > 1e-7  # no pair near a tie: each sign is certain
    assert {k: v for k, v in result.items() if k != "by_domain"} == pytest.approx(_pair_metrics(margins),
                                                                                   rel=1e-4, abs=1e-8)
    for d, got in by_domain.items():
        assert got == pytest.approx(_pair_metrics(margins[domains == d]), rel=1e-4, abs=1e-8), d
    first = _pair_metrics(margins[:2 * 4])  # the logged eval: train.eval_batches=2 batches of 4 pairs
    assert {k: records[-1][f"eval_{k}"] for k in ("accuracy", "margin", "loss")} == pytest.approx(
        {k: first[k] for k in ("accuracy", "margin", "loss")}, rel=1e-4, abs=1e-8)

    bad = subprocess.run([sys.executable, "-m", "maxlm.reward", "--config=configs/reward_tiny.py",
                          f"--workdir={tmp_path / 'bad'}", f"--config.reward.base={hf_base}",
                          "--config.reward.domains=('polite',)"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "reward.domains" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    lora = subprocess.run([sys.executable, "-m", "maxlm.reward", "--config=configs/reward_tiny.py",
                           f"--workdir={tmp_path / 'lora'}", f"--config.reward.base={hf_base}", "--config.lora.rank=4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert lora.returncode == 2 and "lora.rank" in lora.stderr and "Traceback" not in lora.stderr, lora.stderr


def test_sampled_pairs_reject_the_policys_wrong_replies(hf_base, tok):
    from maxlm.interop import pretrained

    config, params, _ = pretrained.load_base(hf_base)
    items = tasks.make_items("sort", "train", 3)
    records = reward.sampled_pairs(config, params, tok, chat.CHATML, items, samples=3, seed=1)
    assert records, "a random model gets sorting wrong"
    by_prompt = {i.prompt: i for i in items}
    for r in records:
        item = by_prompt[r["prompt"]]
        assert tasks.check(item, r["chosen"]) and not tasks.check(item, r["rejected"]) and r["rejected"]
        assert r["domain"] == "correct" and r["system"] == preference.DOMAINS["correct"]
    assert len({(r["prompt"], r["rejected"]) for r in records}) == len(records)  # distinct wrong replies
    assert records == reward.sampled_pairs(config, params, tok, chat.CHATML, items, samples=3, seed=1)


def test_pair_iterator_resumes_exactly_on_any_number_of_hosts(tok):
    pairs = preference.Pairs(chat.CHATML, tok, 192)
    for record in preference.task_pairs(("sort",), "train", 7):
        pairs.add(record)
    a = preference.PairIterator(pairs, seq_len=192, batch_size=4, seed=1, pad_id=tok.pad_id)
    for _ in range(3):  # crosses an epoch boundary (7 pairs)
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    b = preference.PairIterator(pairs, seq_len=192, batch_size=4, seed=1, pad_id=tok.pad_id)
    b.set_state(state)
    host1 = preference.PairIterator(pairs, seq_len=192, batch_size=4, seed=1, pad_id=tok.pad_id, host_id=1, num_hosts=2)
    host1.set_state(state)
    want, got, half = next(a), next(b), next(host1)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])
        np.testing.assert_array_equal(want[k][2:], half[k])
    assert a.stats["pairs"] == 16 and state["epoch"] == 1
    with pytest.raises(ValueError, match="seed"):
        preference.PairIterator(pairs, seq_len=192, batch_size=4, seed=2).set_state(state)


def test_pairs_sampled_from_another_policy(hf_base, tok):
    """`reward.sample_policy`: the sampled pairs come from that model even when the reward model's own base
    params are not passed, and they are exactly `sampled_pairs` of it on the items past the synthetic ones."""
    from maxlm.interop import pretrained

    config, params, _ = pretrained.load_base(hf_base)
    cfg = pretrained.with_base_model(C.override(C.default_config(), **{
        "reward.tasks": ("sort",), "reward.train_size": 4, "reward.policy_samples": 2, "reward.sampled_items": 3,
        "reward.sample_policy": hf_base, "data.seq_len": 192, "model.max_seq_len": 256}), config, tok.vocab_size)
    pairs = reward.load_pairs(cfg, tok, chat.CHATML, "train")
    synthetic = reward.load_pairs(C.override(cfg, **{"reward.policy_samples": 0}), tok, chat.CHATML, "train")
    items = tasks.make_items("sort", "train", 7)[4:]
    expected = reward.sampled_pairs(cfg, params, tok, chat.CHATML, items, samples=2, seed=cfg.train.seed)
    assert expected and len(pairs) == len(synthetic) + len(expected)
    with pytest.raises(FileNotFoundError, match="reward.sample_policy"):
        reward.load_pairs(C.override(cfg, **{"reward.sample_policy": "/nonexistent"}), tok, chat.CHATML, "train")
