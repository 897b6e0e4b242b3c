"""SFT: the answer-only mask, packing equivalence, and fine-tuning an imported Hugging Face model end to end
(full and LoRA), exported back to a folder `transformers` loads with the same logits."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import config as C
from maxlm import tokenizer
from maxlm.data import chat, tasks
from maxlm.data import sft as sft_data
from maxlm.interop import pretrained
from maxlm.model import decoder as model
from maxlm.training import pretrain as train
from tests.helpers import ROOT, tiny_model_config


@pytest.fixture(scope="module")
def tok(shared_tok_path):
    return tokenizer.load(shared_tok_path)


def _conversations(tok, items):
    convs = sft_data.Conversations(chat.CHATML, tok, 257)
    for item in items:
        assert convs.add({"messages": tasks.messages(item)})
    return convs


def _batch(convs, rows=1):
    it = sft_data.SFTIterator(convs, seq_len=256, batch_size=rows, seed=0)
    return {k: jnp.asarray(v) for k, v in next(it).items()}


def _mean_loss_and_grads(config):
    def mean_loss(params, batch):
        loss_sum, n = train.loss_fn(params, config, batch)
        return loss_sum / n
    return jax.jit(jax.value_and_grad(mean_loss))


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_only_assistant_labels_matter(tok):
    config = tiny_model_config(tok.vocab_size)
    params = model.init(config, jax.random.key(0))
    batch = _batch(_conversations(tok, tasks.make_items("add", "train", 2, seed=5)))
    weights = np.asarray(batch["loss_weights"][0])
    assert 0 < weights.sum() < (batch["segment_ids"][0] > 0).sum()  # some tokens are masked, some are not
    loss_and_grads = _mean_loss_and_grads(config)
    loss, grads = loss_and_grads(params, batch)
    rng = np.random.default_rng(0)

    def relabel(positions):
        targets = np.array(batch["targets"])
        for t in positions:
            targets[0, t] = (targets[0, t] + 1 + rng.integers(tok.vocab_size - 1)) % tok.vocab_size
        return {**batch, "targets": jnp.asarray(targets)}

    masked = np.flatnonzero(weights == 0)
    for positions in [masked, *[[t] for t in masked]]:  # all at once, then each one alone
        other_loss, other_grads = loss_and_grads(params, relabel(positions))
        assert float(other_loss) == float(loss) and _same(other_grads, grads), positions
    for t in np.flatnonzero(weights):
        other_loss, other_grads = loss_and_grads(params, relabel([t]))
        assert float(other_loss) != float(loss) and not _same(other_grads, grads), t


def test_packed_row_equals_conversations_run_separately(tok):
    config = tiny_model_config(tok.vocab_size)
    params = model.init(config, jax.random.key(1))
    items = [tasks.make_items(t, "train", 1, seed=2)[0] for t in ("format", "sort", "add")]
    packed = _batch(_conversations(tok, items))
    assert packed["segment_ids"].max() == 3  # all three share one row

    def alone(item):  # one conversation in its own row (padded like the packed one), built here
        ids, weights = chat.render(chat.CHATML, tok, tasks.messages(item))
        n, t = len(ids) - 1, packed["inputs"].shape[1]
        row = lambda x: jnp.zeros((1, t), x.dtype).at[0, :n].set(x)  # noqa: E731
        return {"inputs": row(ids[:-1]), "targets": row(ids[1:]), "positions": row(np.arange(n, dtype=np.int32)),
                "segment_ids": row(np.ones(n, np.int32)), "loss_weights": row(weights[1:])}

    sums = jax.jit(jax.value_and_grad(lambda p, b: train.loss_fn(p, config, b), has_aux=True))
    (loss_sum, n), grads = sums(params, packed)
    parts = [sums(params, alone(item)) for item in items]
    separate = sum(float(s) for (s, _), _ in parts) / sum(float(k) for (_, k), _ in parts)
    np.testing.assert_allclose(float(loss_sum) / float(n), separate, rtol=1e-5)
    assert float(n) == sum(float(k) for (_, k), _ in parts)
    # The gradients agree as well: packing does not change the objective.
    total = jax.tree.map(lambda *g: sum(g), *[g for _, g in parts])
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(total)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _sft_config(base, **extra):
    c = C.load_config_file(os.path.join(ROOT, "configs", "sft_tiny.py"))
    return C.override(c, **{
        "sft.base": base, "sft.template": "internlm2", "sft.tasks": ("format", "add"), "sft.task_train_size": 30,
        "sft.task_eval_size": 8, "sft.eval_items": 4, "data.seq_len": 192, "data.batch_size": 4,
        "train.num_steps": 3, "train.log_every": 1, "train.eval_every": 3, "train.eval_batches": 1,
        "checkpoint.every_steps": 3, "optim.warmup_steps": 1, **extra})


def _hf_logits(folder, tokens):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("rank", [0, 4])
def test_sft_on_imported_hf_model_exports_back(hf_base, tok, tmp_path, rank):
    from maxlm.posttrain import sft

    work = str(tmp_path / "sft")
    history = sft.finetune(_sft_config(hf_base, **{"lora.rank": rank}), work)
    assert [r["step"] for r in history] == [1, 2, 3] and np.isfinite(history[-1]["eval_loss"])
    # The internlm2 template's tool markers were added to the tokenizer and the embeddings grew to match.
    run_tok = tokenizer.load(os.path.join(work, "tokenizer.model"))
    assert run_tok.vocab_size == tok.vocab_size + 4
    with open(os.path.join(work, "sft_eval.json")) as f:
        assert set(json.load(f)) == {"format", "add"}
    memory = json.load(open(os.path.join(work, "memory.json")))
    config, params, step = pretrained.load_workdir(work)
    assert step == 3 and config.model.vocab_size == run_tok.vocab_size
    if rank:  # only adapters are trained: their optimizer state is a small fraction of the model's
        assert memory["opt_state"] < 0.2 * memory["frozen_base"] * 2
        _, base, _ = pretrained.load_base(hf_base)
        # Frozen, except the rows of the template's markers (lora.token_ids), which are trained.
        markers = {tok.encode(p)[0] for p in chat.INTERNLM2.special_tokens if len(tok.encode(p)) == 1}
        assert markers and markers <= set(config.lora.token_ids)
        frozen = np.setdiff1d(np.arange(tok.vocab_size), config.lora.token_ids)
        np.testing.assert_array_equal(params["embedding"][frozen], base["embedding"][frozen])

    out = str(tmp_path / "hf_out")
    done = subprocess.run([sys.executable, "-m", "maxlm.convert", "to_hf", f"--workdir={work}", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert tokenizer.load(os.path.join(out, "tokenizer.model")).vocab_size == run_tok.vocab_size
    # The export carries the run's template: AutoTokenizer formats a conversation as the run was trained.
    from transformers import AutoTokenizer

    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "1+2"},
                    {"role": "assistant", "content": "3"}, {"role": "user", "content": "再加 4"},
                    {"role": "assistant", "content": "7"}]
    auto = AutoTokenizer.from_pretrained(out)
    ids, _ = chat.render(chat.INTERNLM2, run_tok, conversation)
    rendered = auto.apply_chat_template(conversation, tokenize=True)
    assert list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered) == ids.tolist()
    tokens = np.asarray([chat.render_prompt(chat.INTERNLM2, run_tok, [{"role": "user", "content": "1+2"}])])
    ours = np.asarray(model.apply(config, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(_hf_logits(out, tokens), ours, atol=1e-4, rtol=1e-4)

    # The logged held-out loss is the total answer-token cross-entropy over the total answer tokens of the
    # eval batch, recomputed here with transformers on the exported model, one packed conversation at a time.
    held_out = sft.load_conversations(config, run_tok, chat.INTERNLM2, "eval")
    batch = next(sft_data.SFTIterator(held_out, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                                      seed=0, pad_id=run_tok.pad_id))
    total = weight = 0.0
    for row in range(batch["inputs"].shape[0]):
        for segment in set(batch["segment_ids"][row].tolist()) - {0}:
            cols = batch["segment_ids"][row] == segment
            logits = _hf_logits(out, batch["inputs"][row][cols][None])[0].astype(np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            ce = -logp[np.arange(cols.sum()), batch["targets"][row][cols]]
            total += float((ce * batch["loss_weights"][row][cols]).sum())
            weight += float(batch["loss_weights"][row][cols].sum())
    assert weight > 0 and len({len(ids) for ids, _ in held_out.items}) > 1  # ragged conversations
    np.testing.assert_allclose(history[-1]["eval_loss"], total / weight, rtol=1e-4)


def test_evaluate_cli_prints_json(hf_base, tmp_path):
    done = subprocess.run([sys.executable, "-m", "maxlm.evaluate", f"--hf={hf_base}", "--task=format", "--n=5",
                           f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["task"] == "format" and summary["n"] == 5 and 0.0 <= summary["accuracy"] <= 1.0
    rows = [json.loads(line) for line in open(tmp_path / "format.jsonl", encoding="utf-8")]
    assert len(rows) == 5 and sum(r["correct"] for r in rows) / 5 == summary["accuracy"]
    bad = subprocess.run([sys.executable, "-m", "maxlm.evaluate", f"--hf={hf_base}", "--task=chess"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown --task=chess" in bad.stderr and "Traceback" not in bad.stderr


def test_sft_cli_user_errors_are_one_line(tmp_path):
    for flags, message in [(["--config.sft.base=/no/such/base"], "not a directory"),
                           (["--config.sft.template=chatgpt"], "sft.template"),
                           (["--config.lora.rank=8", "--config.lora.targets=('q','wqkv')"], "lora.targets"),
                           (["--config.train.stages=('steps=5',)"], "train.stages: staged training is run by")]:
        done = subprocess.run([sys.executable, "-m", "maxlm.sft", "--config=configs/sft_tiny.py",
                               f"--workdir={tmp_path}", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
