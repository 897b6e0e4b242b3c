"""Profiling and experiment tracking around the training loop.

`train.profile_steps=(5, 8)` must leave an XProf trace; `train.wandb_project` with WANDB_MODE=offline must leave
a W&B run whose history holds the same losses as metrics.jsonl -- read back from W&B's own file format (a
LevelDB-style log of protobuf records, parsed here with W&B's protobuf classes), not through maxlm -- and a
resumed run must continue the same W&B run.
"""

import glob
import json
import os
import struct

import pytest

from maxlm import config as C
from maxlm import train
from tests.helpers import small_config


def _wandb_records(path: str) -> list:
    """Every record of a `.wandb` file: a 7-byte header (":W&B", magic, version), then LevelDB log blocks of
    32 KiB holding chunks (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last) of serialised Records."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, raws, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            raws.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            raws.append(pending + chunk)
    records = []
    for raw in raws:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def _history(records) -> dict[int, dict]:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            out.setdefault(int(row["_step"]), {}).update(row)
    return out


def test_profile_trace_and_offline_wandb_run(shared_corpus, shared_tok_path, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    work = str(tmp_path / "run")
    cfg = small_config(shared_corpus, **{"tokenizer.path": shared_tok_path, "train.num_steps": 10,
                                         "optim.decay_steps": 12, "train.profile_steps": (5, 8),
                                         "train.wandb_project": "maxlm-test", "train.wandb_group": "g1",
                                         "checkpoint.every_steps": 10, "checkpoint.async_save": False})
    train.train(cfg, work)

    traces = glob.glob(os.path.join(work, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
    status = json.load(open(os.path.join(work, "status.json")))
    assert status["complete"] and status["step"] == status["num_steps"] == 10

    logged = {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(work, "metrics.jsonl")))}
    runs = glob.glob(os.path.join(work, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1, runs
    records = _wandb_records(runs[0])
    history = _history(records)
    assert {s: h["loss"] for s, h in history.items() if "loss" in h} == pytest.approx(logged, rel=1e-6)
    assert history[10]["samples/_type"] == "table-file"  # the end-of-run samples, as a W&B table
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "maxlm-test" and run.run_group == "g1" and run.display_name == "run"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["model"]["d_model"] == 64 and config["train"]["profile_steps"] == [5, 8]
    run_id = open(os.path.join(work, "wandb_id")).read().strip()
    assert run.run_id == run_id

    # Resuming continues the same W&B run, from the next step on.
    train.train(C.override(cfg, **{"train.num_steps": 12, "train.profile_steps": ()}), work)
    runs = sorted(glob.glob(os.path.join(work, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(runs) == 2 and all(os.path.basename(r) == f"run-{run_id}.wandb" for r in runs)
    resumed = _history(_wandb_records(runs[-1]))
    assert sorted(s for s, h in resumed.items() if "loss" in h) == [11, 12]


def test_profile_steps_and_wandb_project_checked_before_compiling(shared_corpus, monkeypatch):
    with pytest.raises(C.ConfigError, match="train.profile_steps"):
        small_config(shared_corpus, **{"train.profile_steps": (8, 5)})
    with pytest.raises(C.ConfigError, match="train.profile_steps"):
        small_config(shared_corpus, **{"train.profile_steps": (0, 3)})
    real = C.importlib.util.find_spec
    monkeypatch.setattr(C.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(C.ConfigError, match=r"train.wandb_project.*maxlm\[wandb\]"):
        small_config(shared_corpus, **{"train.wandb_project": "p"})
