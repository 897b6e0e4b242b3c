"""DPO and its relatives: each loss against numpy formulas written here, the packed step against per-sequence
log-probs of unpadded conversations, the cached reference against the frozen one, LoRA's base as the reference,
the packed iterator's exact resume, and `python -m maxlm.dpo` end to end on an imported Hugging Face model."""

import json
import math
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
from maxlm.data import chat, preference, tasks
from maxlm.data import dpo as dpo_data
from maxlm.model import decoder as model, lora
from maxlm.posttrain import dpo
from tests.helpers import ROOT, random_params, tiny_model_config

SEQ = 384


@pytest.fixture(scope="module")
def tok(shared_tok_path):
    return tokenizer.load(shared_tok_path)


def _sigmoid_loss(x, smoothing=0.0):
    return -(1 - smoothing) * math.log(1 / (1 + math.exp(-x))) - smoothing * math.log(1 / (1 + math.exp(x)))


def _oracle(name, pc, pr, rc, rr, lc, lr, beta, smoothing, gamma):
    """One pair's (loss, chosen reward, rejected reward), from the papers' formulas."""
    if name in ("dpo", "cdpo"):
        h = beta * ((pc - rc) - (pr - rr))
        return _sigmoid_loss(h, smoothing if name == "cdpo" else 0.0), beta * (pc - rc), beta * (pr - rr)
    if name == "ipo":
        h = (pc - rc) / lc - (pr - rr) / lr
        return (h - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)
    assert name == "simpo"
    return _sigmoid_loss(beta * pc / lc - beta * pr / lr - gamma, smoothing), beta * pc / lc, beta * pr / lr


@pytest.mark.parametrize("name", ["dpo", "cdpo", "ipo", "simpo"])
def test_each_loss_matches_its_formula(name):
    rng = np.random.default_rng(0)
    p = 9
    pc, pr, rc, rr = (rng.normal(-20, 6, p) for _ in range(4))
    lc, lr = rng.integers(1, 30, p).astype(float), rng.integers(1, 30, p).astype(float)
    d = C.override(C.default_config(), **{"dpo.loss": name, "dpo.beta": 0.3, "dpo.label_smoothing":
                                          0.15 if name in ("cdpo", "simpo") else 0.0, "dpo.simpo_gamma": 0.7}).dpo
    x = dpo.PairLogps(*(jnp.asarray(a, jnp.float32) for a in (pc, pr, rc, rr, lc, lr)))
    losses, chosen, rejected = jax.jit(lambda x: dpo.LOSSES[name].fn(x, d))(x)
    for i in range(p):
        want = _oracle(name, pc[i], pr[i], rc[i], rr[i], lc[i], lr[i], 0.3, d.label_smoothing, 0.7)
        np.testing.assert_allclose([losses[i], chosen[i], rejected[i]], want, rtol=1e-4, atol=1e-4)
    assert dpo.LOSSES[name].uses_reference == (name != "simpo")


def _pairs(tok, n, seed=0):
    pairs = preference.Pairs(chat.CHATML, tok, SEQ, with_weights=True)
    rng = random.Random(seed)
    for item in tasks.make_items("sort", "train", n, seed=seed):
        assert pairs.add({"prompt": item.prompt, "chosen": item.answer, "rejected": tasks.wrong_answer(item, rng)})
    return pairs


def _seq_logp(config, params, ids, weights):
    """The oracle: one unpadded conversation through the model alone, log-softmax in numpy (float64), summed
    over the tokens the weights mark (the reply and its end marker) -> (sum, count)."""
    logits = np.asarray(model.apply(config, params, jnp.asarray([ids[:-1]])), np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = logp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.sum(picked * weights[1:])), float(np.sum(weights[1:] > 0))


def _config(tok, **kw):
    return C.override(tiny_model_config(tok.vocab_size), **{"data.seq_len": SEQ, "dpo.beta": 0.5, **kw})


def test_packed_step_matches_unpadded_conversations_and_the_cache(tok):
    pairs = _pairs(tok, 5)
    assert all(w[0] == 0 and w[-1] == 1 for side in pairs.items for _, w in side)  # reply + end marker only
    config = _config(tok, **{"dpo.pairs_per_row": 3, "dpo.reference": "frozen"})
    rng = np.random.default_rng(0)
    policy = random_params(model.abstract_params(config), rng, std=0.3)
    ref = random_params(model.abstract_params(config), rng, std=0.3)
    want = []
    for (c, cw), (r, rw) in pairs.items:
        (pc, lc), (pr, lr) = _seq_logp(config, policy, c, cw), _seq_logp(config, policy, r, rw)
        (rc, _), (rr, _) = _seq_logp(config, ref, c, cw), _seq_logp(config, ref, r, rw)
        want.append(_oracle("dpo", pc, pr, rc, rr, lc, lr, 0.5, 0, 0))
    want = np.asarray(want)
    items = dpo_data.sides(pairs)
    loss = jax.jit(lambda p, b, f: dpo.dpo_loss(p, config, b, f))

    def check(batch, frozen):
        total, sums = loss(policy, batch, frozen)
        assert float(sums["weight"]) == 5
        np.testing.assert_allclose(float(total), want[:, 0].sum(), rtol=1e-4)
        np.testing.assert_allclose(float(sums["margin"]), (want[:, 1] - want[:, 2]).sum(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(float(sums["reward_chosen"]), want[:, 1].sum(), rtol=1e-4, atol=1e-4)
        assert float(sums["accuracy"]) == np.sum(want[:, 1] > want[:, 2])

    # Greedy rows of at most 3 pairs and SEQ positions (n - 1 per side); the rows after them are padding.
    sizes = [len(c) + len(r) - 2 for (c, _), (r, _) in pairs.items]
    rows, used, count = [0], sizes[0], 1
    for size in sizes[1:]:
        new = used + size > SEQ or count == 3
        rows.append(rows[-1] + new)
        used, count = (size, 1) if new else (used + size, count + 1)
    packed, placements = dpo_data.pack(items, SEQ, 5, 3, tok.pad_id)
    assert [p[0] for p in placements] == rows and rows[-1] < 4 and not (packed["slots"][rows[-1] + 1:] >= 0).any()
    assert len(set(rows)) < 5  # some row holds two pairs
    check(packed, {"reference": ref})
    assert np.all(packed["positions"][packed["segment_ids"] == 0] == 0)
    # One pair per row: the same sums.
    one = C.override(config, **{"dpo.pairs_per_row": 1})
    total, sums = jax.jit(lambda p, b, f: dpo.dpo_loss(p, one, b, f))(policy, dpo_data.pack(items, SEQ, 5, 1,
                                                                                             tok.pad_id)[0],
                                                                      {"reference": ref})
    np.testing.assert_allclose(float(total), want[:, 0].sum(), rtol=1e-4)
    # The cache: the reference's log-probs computed once, carried by the batch; no reference in the step.
    ref_fn = jax.jit(lambda b: dpo.token_logprobs(config, ref, b))
    cached = dpo_data.attach_reference(items, ref_fn, seq_len=SEQ, rows=2, pairs_per_row=3, pad_id=tok.pad_id)
    batch, _ = dpo_data.pack(cached, SEQ, 4, 3, tok.pad_id, with_reference=True)
    check(batch, {})


def test_lora_starts_at_the_reference(tok):
    """With LoRA the frozen base is the reference: fresh adapters (B = 0) give every pair log-ratio 0, so each
    pair costs log 2 and no reply is preferred; an adapter update moves the policy away from it."""
    config = _config(tok, **{"lora.rank": 4, "dpo.pairs_per_row": 2})
    base = random_params(model.abstract_params(config), 1, std=0.3)
    adapters = lora.init(config, jax.random.key(0))
    batch, _ = dpo_data.pack(dpo_data.sides(_pairs(tok, 3)), SEQ, 2, 2, tok.pad_id)
    loss = jax.jit(lambda a, b: dpo.dpo_loss(a, config, b, {"base": base}))
    total, sums = loss(adapters, batch)
    np.testing.assert_allclose(float(total), 3 * math.log(2), rtol=1e-6)
    assert float(sums["margin"]) == 0 and float(sums["implicit_kl"]) == 0
    grads = jax.grad(lambda a: loss(a, batch)[0])(adapters)
    moved = jax.tree.map(lambda a, g: a - 0.5 * g, adapters, grads)
    assert float(loss(moved, batch)[1]["margin"]) > 0  # one gradient step prefers the chosen replies


def test_packed_iterator_resumes_exactly_on_any_number_of_hosts(tok):
    items = dpo_data.sides(_pairs(tok, 7))
    kw = dict(seq_len=SEQ, batch_size=2, pairs_per_row=2, seed=1, pad_id=tok.pad_id)
    a = dpo_data.PackedPairIterator(items, **kw)
    seen = [next(a) for _ in range(3)]  # 4 pairs per batch: the third batch crosses into epoch 1
    assert a.stats["pairs"] == 12 and a.epoch == 1
    state = json.loads(json.dumps(a.get_state()))
    b = dpo_data.PackedPairIterator(items, **kw)
    b.set_state(state)
    host1 = dpo_data.PackedPairIterator(items, **kw, host_id=1, num_hosts=2)
    host1.set_state(state)
    want, got, half = next(a), next(b), next(host1)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])
        np.testing.assert_array_equal(want[k][1:], half[k])
    # 12 pairs in 3 batches of 2 rows: 2 pairs a row, each with a chosen and a rejected slot.
    assert all(sorted(set(r[r >= 0])) == [0, 1, 2, 3] for batch in seen for r in batch["slots"])


def test_dpo_end_to_end(hf_base, tmp_path):
    """Three steps from an imported model, with the built-in and on-policy pairs: metrics, evaluation (true
    score and sampled KL, 0 at the start), the result file; a bad key exits 2 naming it."""
    work = str(tmp_path / "dpo")
    flags = [f"--config.dpo.base={hf_base}", "--config.dpo.train_size=12", "--config.dpo.eval_size=4",
             "--config.dpo.eval_items=4", "--config.dpo.policy_samples=2", "--config.dpo.sampled_items=3",
             "--config.dpo.builtin_pairs=True",
             "--config.data.batch_size=2", "--config.data.seq_len=256", "--config.train.num_steps=3",
             "--config.train.log_every=1", "--config.train.eval_every=3", "--config.train.eval_batches=2",
             "--config.checkpoint.every_steps=3", "--config.optim.warmup_steps=1"]
    done = subprocess.run([sys.executable, "-m", "maxlm.dpo", "--config=configs/dpo_tiny.py", f"--workdir={work}",
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "on-policy pairs" in out and "reference log-probs of" in out, out[-3000:]
    records = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    assert records[0]["step"] == 0 and records[0]["eval_kl"] == pytest.approx(0, abs=1e-4)
    assert {"accuracy", "margin", "reward_chosen", "logps_rejected", "implicit_kl"} <= set(records[1])
    assert 0 <= records[-1]["eval_true_score"] <= 1 and "eval_accuracy" in records[-1]
    result = json.load(open(os.path.join(work, "dpo_eval.json")))
    assert result["last"]["step"] == 3 and result["first"]["step"] == 0
    bad = subprocess.run([sys.executable, "-m", "maxlm.dpo", "--config=configs/dpo_tiny.py",
                          f"--workdir={tmp_path / 'bad'}", f"--config.dpo.base={hf_base}", "--config.dpo.loss=kto"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "dpo.loss" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
