"""Aggregate metrics on ragged input. `Trainer.evaluate` on held-out batches with different numbers of real
tokens / pairs: each metric is the total over all batches divided by the total weight, checked against
per-token losses and per-pair rewards computed here with numpy from the model's own logits / hidden states.
`evaluate.task_accuracy`: exact match pooled over items and per language, from scripted replies."""

import jax
import numpy as np
import pytest

from maxlm import config as C
from maxlm.data import preference
from maxlm.model import decoder as model
from maxlm.posttrain import reward
from maxlm.training import pretrain as train
from tests.helpers import random_params

T, B, V = 16, 2, 64


def _config():
    return C.override(C.default_config(), **{
        "model.vocab_size": V, "model.num_layers": 1, "model.d_model": 32, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.max_seq_len": T, "model.compute_dtype": "float32",
        "data.seq_len": T, "data.batch_size": B})


def _lm_batch(rng, real):
    """A [B, T] batch with `real` weighted target tokens (row-major), two packed segments in row 0."""
    segments = np.ones((B, T), np.int32)
    segments[0, T // 2:] = 2
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    positions[0, T // 2:] -= T // 2
    weights = np.zeros(B * T, np.float32)
    weights[:real] = 1.0
    return {"inputs": rng.integers(0, V, (B, T)).astype(np.int32),
            "targets": rng.integers(0, V, (B, T)).astype(np.int32),
            "positions": positions, "segment_ids": segments, "loss_weights": weights.reshape(B, T)}


def _state(trainer, params):
    """What `Trainer.evaluate` reads of a state: the parameters, laid out as the trainer's."""
    return {"params": jax.device_put(params, trainer.state_shardings["params"])}


def _token_losses(config, params, batches):
    """-log softmax(logits)[target] per token of each batch, by numpy from `model.apply`'s logits (one call)."""
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    apply = jax.jit(lambda p, x, pos, seg: model.apply(config, p, x, positions=pos, segment_ids=seg))
    logits = np.asarray(apply(params, cat["inputs"], cat["positions"], cat["segment_ids"]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.split(-np.take_along_axis(logp, cat["targets"][..., None], -1)[..., 0], len(batches))


def test_eval_loss_is_total_loss_over_total_tokens_on_ragged_batches():
    """Eval loss over batches holding 32, 3 and 11 real tokens = sum of per-token losses / 46, not the mean of
    the three batch means."""
    config = _config()
    trainer = train.Trainer(config)
    params = random_params(model.abstract_params(config), 0, std=0.3)
    state = _state(trainer, params)
    rng = np.random.default_rng(0)
    batches = [_lm_batch(rng, n) for n in (B * T, 3, 11)]
    losses = _token_losses(config, params, batches)
    sums = [float((loss * b["loss_weights"]).sum()) for loss, b in zip(losses, batches)]
    counts = [float(b["loss_weights"].sum()) for b in batches]
    total, tokens, per_batch = sum(sums), sum(counts), [s / c for s, c in zip(sums, counts)]
    assert tokens == 46 and abs(np.mean(per_batch) - total / tokens) > 1e-3  # the two readings differ here
    got = trainer.evaluate(state, [trainer.device_batch(b) for b in batches])
    assert got == {"loss": pytest.approx(total / tokens, rel=1e-5)}
    assert trainer.eval_loss(state, [trainer.device_batch(batches[1])]) == pytest.approx(per_batch[1], rel=1e-5)


def test_reward_eval_metrics_pool_pairs_across_ragged_batches(shared_tok_path):
    """Reward-model evaluation over batches of 4, 1 and 3 real pairs (the rest padding rows): accuracy,
    margin and loss are means over the 8 pairs, from rewards read by numpy at each sequence's last token."""
    from maxlm.data import chat, tasks
    from maxlm import tokenizer as tokenizer_lib

    tok = tokenizer_lib.load(shared_tok_path)
    seq = 96
    config = C.override(_config(), **{"model.vocab_size": tok.vocab_size, "model.max_seq_len": seq,
                                      "data.seq_len": seq, "data.batch_size": 4})
    pairs = preference.Pairs(chat.CHATML, tok, seq)
    rng = np.random.default_rng(1)
    for item in tasks.make_items("add", "train", 8):
        wrong = str(int(item.answer) + int(rng.integers(1, 9)))
        assert pairs.add({"prompt": item.prompt, "chosen": item.answer, "rejected": wrong})
    params = reward.from_lm(random_params(model.abstract_params(config), 0, std=0.3))
    params["head"] = np.random.default_rng(3).normal(0, 1, params["head"].shape).astype(np.float32)
    trainer = train.Trainer(config, objective=reward.OBJECTIVE)
    state = _state(trainer, params)

    seqs = [s for pair in pairs.items for s in pair]
    padded = np.zeros((len(seqs), seq), np.int32)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    h = np.asarray(jax.jit(lambda p, x: model.hidden(config, p, x))(params["decoder"], padded), np.float64)
    r = np.array([h[i, len(s) - 1] @ np.asarray(params["head"], np.float64) for i, s in enumerate(seqs)])
    margins = r[0::2] - r[1::2]
    want = {"accuracy": np.mean(margins > 0), "margin": margins.mean(), "loss": np.mean(np.log1p(np.exp(-margins)))}
    assert 0 < want["accuracy"] < 1
    splits = [(0, 4), (4, 5), (5, 8)]
    means_of_means = np.mean([np.mean(margins[a:b] > 0) for a, b in splits])
    assert abs(means_of_means - want["accuracy"]) > 0.01  # the fixture tells the two readings apart

    batches = [trainer.device_batch(preference.pair_batch(pairs.items[a:b], seq, tok.pad_id, rows=4))
               for a, b in splits]
    got = trainer.evaluate(state, batches)
    assert set(got) == set(want)
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
    assert got["margin"] == pytest.approx(want["margin"], rel=1e-4, abs=1e-5)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def test_task_accuracy_and_per_language_accuracy_pool_items(monkeypatch, shared_tok_path):
    """`evaluate.task_accuracy` with the sampler replaced by scripted replies (right for every zh item and for
    the first en one; a right reply may carry whitespace): accuracy over all items and per language, counted
    here from the items' languages."""
    from maxlm.evaluation import harness as evaluate
    from maxlm.data import tasks
    from maxlm import tokenizer as tokenizer_lib

    tok = tokenizer_lib.load(shared_tok_path)
    config = C.default_config()
    items = tasks.make_items("add", "eval", 12, seed=config.sft.task_seed)
    en = [i for i, it in enumerate(items) if it.lang == "en"]
    right = [it.lang == "zh" or i == en[0] for i, it in enumerate(items)]
    assert 1 < len(en) < len(items) and sum(right) / len(items) != (1 / len(en) + 1) / 2  # pooled != mean by lang
    replies = [f" {it.answer}\n" if ok else it.answer + "0" for it, ok in zip(items, right)]

    def generate(config, params, prompts, **kw):
        assert len(prompts) == len(items) and kw["greedy"]
        return [tok.encode(r) for r in replies]

    monkeypatch.setattr(evaluate.engine_lib, "generate", generate)
    result = evaluate.task_accuracy(config, None, tok, "add", n=12)
    assert [r["correct"] for r in result["items"]] == right and result["n"] == 12
    assert result["accuracy"] == sum(right) / 12
    zh = len(items) - len(en)
    assert result["by_lang"] == {"en": 1 / len(en), "zh": zh / zh}
