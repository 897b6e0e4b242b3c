"""End-to-end pretraining on a small jsonl corpus: outputs, loss falls, exact resume, gradient accumulation."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import config as C
from maxlm.model import decoder as model
from maxlm.training import checkpoint, pretrain as train
from tests.helpers import ROOT, random_params, small_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    write_corpus(path)
    return path


def test_resume_is_exact_and_outputs_written(corpus, tmp_path):
    """A run killed mid-way resumes exactly: the first run stops after step 5, and step 5's save is then cut off as
    by a SIGKILL while writing it (left as an Orbax temporary directory), so the rerun restarts from the newest
    complete checkpoint, the periodic one of step 4 -- saved while training went on -- and must log the
    uninterrupted run's losses for steps 5..8 and end with its parameters, bit for bit."""
    full_cfg = small_config(corpus, **{"train.num_steps": 8, "optim.decay_steps": 8})
    full = train.train(full_cfg, str(tmp_path / "full"))
    assert [r["step"] for r in full] == list(range(1, 9))

    half_cfg = small_config(corpus, **{"train.num_steps": 5, "optim.decay_steps": 8, "checkpoint.every_steps": 2})
    first = train.train(half_cfg, str(tmp_path / "resumed"))
    assert [r["step"] for r in first] == list(range(1, 6))
    ckpt_dir = checkpoint.checkpoint_dir(str(tmp_path / "resumed"))
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "5"]
    os.rename(os.path.join(ckpt_dir, "5"), os.path.join(ckpt_dir, "5.orbax-checkpoint-tmp-1700000000"))
    second = train.train(full_cfg, str(tmp_path / "resumed"))  # resumes from the step-4 checkpoint
    assert [r["step"] for r in second] == [5, 6, 7, 8]
    assert [(r["loss"], r["grad_norm"]) for r in second] == [(r["loss"], r["grad_norm"]) for r in full[4:]]
    assert [r["loss"] for r in first] == [r["loss"] for r in full[:5]]
    (_, a, _), (_, b, _) = (checkpoint.load_latest(str(tmp_path / name)) for name in ("full", "resumed"))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert np.array_equal(x, y), jax.tree_util.keystr(path)

    work = tmp_path / "full"
    records = [json.loads(line) for line in open(work / "metrics.jsonl")]
    for key in ("step", "loss", "tokens_per_sec", "mfu", "lr", "grad_norm"):
        assert all(key in r for r in records), key
    assert (work / "loss.png").stat().st_size > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(work / "tensorboard"))
    assert (work / "tokenizer.model").exists()


def test_gradient_accumulation_matches_one_big_batch(corpus):
    """accum=4 over micro-batches gives the same update as one batch (loss normalised over the global batch)."""
    from maxlm import data, tokenizer

    results = []
    for accum in (1, 4):
        cfg = small_config(corpus, **{"optim.grad_accum_steps": accum, "train.num_steps": 2})
        tok = tokenizer.train(data.iter_texts(data.make_source(cfg, "train")), "/tmp/maxlm_test_accum_tok", cfg)
        it = data.PackedIterator(data.make_source(cfg, "train"), tok, seq_len=64, batch_size=8, seed=0)
        batch = next(it)
        batch["loss_weights"][:2] = 0.0  # uneven token counts across micro-batches
        trainer = train.Trainer(cfg)
        state = trainer.init_state(jax.random.key(0))
        state, metrics = trainer.step(state, trainer.device_batch(batch))
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state["params"])))
    (l1, g1, p1), (l4, g4, p4) = results
    assert abs(l1 - l4) < 1e-5 and abs(g1 - g4) < 1e-5 * g1
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_loss_fn_is_the_weighted_sum_of_token_cross_entropies():
    """`train.loss_fn` against numpy on the model's own logits z: (sum_i w_i (logsumexp z_i - z_i[y_i]), sum_i w_i),
    with weights that are zero, fractional and one (a packed row of two documents and a padding tail)."""
    cfg = C.override(C.default_config(), **{"model.vocab_size": 37, "model.num_layers": 1, "model.d_model": 16,
                                            "model.num_heads": 2, "model.num_kv_heads": 1, "model.mlp_dim": 32,
                                            "model.compute_dtype": "float32"})
    rng = np.random.default_rng(0)  # random parameters without model.init (compiling it takes seconds)
    params = jax.tree.map(jnp.asarray, random_params(model.abstract_params(cfg), rng, std=0.3))
    batch = {"inputs": rng.integers(0, 37, (2, 6)), "targets": rng.integers(0, 37, (2, 6)),
             "positions": np.array([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]),
             "segment_ids": np.array([[1, 1, 1, 2, 2, 0], [1] * 6]),
             "loss_weights": np.array([[0, 1, 1, 0, 0.5, 0], [1, 1, 0, 1, 1, 1]], np.float32)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def both(p, b):
        return train.loss_fn(p, cfg, b), model.apply(cfg, p, b["inputs"], positions=b["positions"],
                                                     segment_ids=b["segment_ids"])

    (loss_sum, weight), z = jax.jit(both)(params, batch)
    z = np.asarray(z, np.float64)
    top = z.max(-1)
    ce = top + np.log(np.exp(z - top[..., None]).sum(-1)) - np.take_along_axis(
        z, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    w = np.asarray(batch["loss_weights"], np.float64)
    np.testing.assert_allclose(float(loss_sum), (w * ce).sum(), rtol=1e-5)
    assert float(weight) == w.sum() == 7.5


def test_loss_falls_well_below_uniform(corpus, tmp_path):
    cfg = small_config(corpus, **{"train.num_steps": 60, "train.log_every": 10, "checkpoint.every_steps": 60,
                                  "train.num_samples": 0})
    history = train.train(cfg, str(tmp_path / "w"))
    assert history[-1]["loss"] < np.log(320) - 2.5, history[-1]
    assert history[-1]["data_skipped"] == 1.0  # the malformed line, met once the epoch has been read


@pytest.mark.slow
def test_cli_resume_100_of_200_steps_exact(corpus, tmp_path):
    """The acceptance check: the same command, stopped after step 100 and rerun, logs the same losses."""

    def run(workdir, steps):
        cmd = [sys.executable, "-m", "maxlm.train", "--config=configs/tiny.py", f"--workdir={workdir}",
               "--config.data.source=jsonl", f"--config.data.path={corpus}", "--config.model.vocab_size=320",
               "--config.model.num_layers=2", "--config.model.d_model=64", "--config.model.num_heads=4",
               "--config.model.num_kv_heads=2", "--config.model.mlp_dim=128", "--config.data.seq_len=64",
               "--config.data.batch_size=8", "--config.train.log_every=1", "--config.checkpoint.every_steps=50",
               "--config.train.eval_every=0", "--config.train.num_samples=0", "--config.optim.decay_steps=200",
               "--config.tokenizer.train_max_bytes=200000", f"--config.train.num_steps={steps}"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=900)
        return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}

    full = run(tmp_path / "a", 200)
    run(tmp_path / "b", 100)
    resumed = run(tmp_path / "b", 200)
    assert sorted(resumed) == list(range(1, 201))
    for step in range(101, 201):
        assert abs(full[step] - resumed[step]) <= 1e-6, step


@pytest.mark.slow
def test_tiny_default_run_learns_and_samples(tmp_path):
    """The README's main job: the tiny default on the stdlib corpus ends >= 3 nats below ln(V) and samples."""
    proc = subprocess.run([sys.executable, "-m", "maxlm.train", "--config=configs/tiny.py",
                           f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    cfg = C.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    assert records[-1]["step"] == cfg.train.num_steps
    assert records[-1]["loss"] <= np.log(cfg.model.vocab_size) - 3.0, records[-1]
    assert proc.stdout.count("--- sample") == cfg.train.num_samples
