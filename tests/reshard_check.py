"""Save a training state under one mesh of 8 forced CPU devices and restore it under others.

    python tests/reshard_check.py WORKDIR

Writes a checkpoint from an FSDP mesh (1,8,1,1), then restores it onto (1,1,1,1) on one device, (2,1,2,1)
(data x tensor) on four, (1,4,2,1) with ZeRO-1 on eight and a 2-stage pipeline x fsdp x tensor on eight; then
a pipelined run's checkpoint onto one device. One `RESULT` line per target with the largest difference to
the saved values. Run as a subprocess by tests/test_fault_tolerance.py.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from maxlm.training import checkpoint  # noqa: E402
from maxlm import config as C  # noqa: E402
from maxlm.training.sharding import make_mesh  # noqa: E402
from maxlm.training.pretrain import Trainer  # noqa: E402

BASE = {"model.vocab_size": 128, "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 128, "model.max_seq_len": 64, "data.seq_len": 32,
        "data.batch_size": 8}


def _config(data, fsdp, tensor, zero=3, pipeline=1):
    return C.validate(C.override(C.default_config(), **BASE, **{
        "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, "mesh.sequence": 1, "mesh.zero_stage": zero,
        "mesh.pipeline": pipeline}))


def _restore(workdir, saved, name, cfg, devices):
    target = Trainer(cfg, mesh=make_mesh(cfg, devices))
    params, opt_state, meta = checkpoint.Checkpointer(workdir, cfg).restore_latest(
        target.abstract_state["params"], target.abstract_state["opt_state"])
    placed = all(x.sharding == s for x, s in zip(jax.tree.leaves(params),
                                                  jax.tree.leaves(target.state_shardings["params"])))
    got = jax.device_get({"params": params, "opt_state": opt_state})
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(got)))
    print(f"RESULT {name} step={meta['step']} diff={diff} placed={placed}", flush=True)


def _save(workdir, cfg):
    trainer = Trainer(cfg, mesh=make_mesh(cfg, jax.devices()))
    state = trainer.init_state(jax.random.key(0))
    saved = jax.device_get({"params": state["params"], "opt_state": state["opt_state"]})
    ckpt = checkpoint.Checkpointer(workdir, cfg)
    ckpt.save(7, state["params"], state["opt_state"], {"note": "reshard"})
    ckpt.close()
    return saved


def main(workdir: str) -> None:
    saved = _save(workdir, _config(1, 8, 1))
    for name, (data, fsdp, tensor, zero, pipeline), n in (
            ("1dev", (1, 1, 1, 3, 1), 1), ("data2xtensor2", (2, 1, 2, 3, 1), 4),
            ("fsdp4xtensor2-zero1", (1, 4, 2, 1, 1), 8), ("pipeline2xfsdp2xtensor2", (1, 2, 2, 3, 2), 8)):
        _restore(workdir, saved, name, _config(data, fsdp, tensor, zero, pipeline), jax.devices()[:n])
    # and back: a pipelined run's checkpoint (the layers split over 2 stages) into an unpipelined one
    piped = os.path.join(workdir, "pipelined")
    saved = _save(piped, _config(2, 2, 1, 3, 2))
    _restore(piped, saved, "pipeline2-to-1dev", _config(1, 1, 1), jax.devices()[:1])


if __name__ == "__main__":
    main(sys.argv[1])
