"""Three float32 train steps on a mesh of 8 forced CPU devices against the same steps on 1 device.

    python tests/parallel_steps_check.py pipeline=2 pipeline=4,train.microbatches=8 sequence=4,sequence_strategy=ring
    python tests/parallel_steps_check.py configs/moe_tiny.py@expert=4

Each argument is `[CONFIG@]overrides`: a config file (default: a 4-layer model of tests/sharded_step_check.py's
size) and comma-separated `key=value` overrides, a bare key being a `mesh.` one (`pipeline=2` is
`mesh.pipeline=2`); the data axis takes the devices left over. The single-device run has the same config with
every mesh axis 1 -- no pipeline, no ring: the plain layer scan and the all-gather attention are the oracle.
Prints one `RESULT` line per argument: both runs' three losses and the largest relative difference. Run as a
subprocess by tests/test_pipeline.py and tests/test_ring.py, because the device count is fixed before jax starts.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from maxlm import config as C  # noqa: E402
from maxlm.training.sharding import make_mesh  # noqa: E402
from maxlm.training.pretrain import Trainer  # noqa: E402

BASE = {"model.vocab_size": 128, "model.num_layers": 4, "model.d_model": 64, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 128, "model.max_seq_len": 64, "model.compute_dtype": "float32",
        "data.seq_len": 32, "data.batch_size": 8, "optim.warmup_steps": 0, "optim.peak_lr": 1e-3}
# A config file keeps its model (4 layers, so that 2 and 4 stages split it) at this batch and length.
FILE_BASE = {"model.num_layers": 4, "model.compute_dtype": "float32", "data.seq_len": 32, "data.batch_size": 8,
             "optim.warmup_steps": 0, "optim.peak_lr": 1e-3}
STEPS = 3


def _batches(vocab: int, seq_len: int, batch: int) -> list[dict]:
    """STEPS batches of two packed documents per row (a cut at 5/8 of the row, positions restarting)."""
    rng = np.random.default_rng(0)
    cut = seq_len * 5 // 8
    segments = np.ones((batch, seq_len), np.int32)
    segments[:, cut:] = 2
    positions = np.concatenate([np.arange(cut), np.arange(seq_len - cut)])[None].repeat(batch, 0).astype(np.int32)
    out = []
    for _ in range(STEPS):
        tokens = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
                    "positions": positions, "loss_weights": np.ones((batch, seq_len), np.float32)})
    return out


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _config(path: str, overrides: dict):
    if path:
        return C.validate(C.override(C.load_config_file(path), **{**FILE_BASE, **overrides}))
    return C.validate(C.override(C.default_config(), **{**BASE, **overrides}))


def run(cfg, devices) -> list[float]:
    trainer = Trainer(cfg, mesh=make_mesh(cfg, devices))
    state = trainer.init_state(jax.random.key(0))
    losses = []
    for batch in _batches(cfg.model.vocab_size, cfg.data.seq_len, cfg.data.batch_size):
        state, metrics = trainer.step(state, trainer.device_batch(batch))
        losses.append(float(metrics["loss"]))
    return losses


def main(specs: list[str]) -> None:
    singles = {}
    for spec in specs:
        path, _, text = spec.rpartition("@")
        overrides = {}
        for item in filter(None, text.split(",")):
            key, value = item.split("=", 1)
            overrides[key if "." in key else f"mesh.{key}"] = _value(value)
        model_keys = {k: v for k, v in overrides.items() if k.startswith("model.")}
        key = (path, tuple(sorted(model_keys.items())))
        if key not in singles:
            singles[key] = run(_config(path, {**model_keys, "mesh.data": 1}), jax.devices()[:1])
        losses1 = singles[key]
        losses8 = run(_config(path, {"mesh.data": -1, **overrides}), jax.devices())
        rel = max(abs(a - b) / abs(a) for a, b in zip(losses1, losses8))
        print(f"RESULT {spec} losses1={','.join(f'{x:.7f}' for x in losses1)} "
              f"losses8={','.join(f'{x:.7f}' for x in losses8)} rel={rel:.3e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
