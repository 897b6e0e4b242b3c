"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) train exactly like one
process x 8 devices on the same mesh: same global batches (each host packs only its rows), same losses."""

import json
import os
import shutil
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/tiny.py", "--config.train.num_steps=20", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.num_samples=1", "--config.train.sample_tokens=8",
        "--config.tokenizer.train_max_bytes=300000", "--config.mesh.data=8"]


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "maxlm.train", *ARGS]
    proc = subprocess.run([*cmd, f"--workdir={one}"], cwd=ROOT, env=_env(8), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two.mkdir()
    shutil.copy(one / "tokenizer.model", two / "tokenizer.model")  # the same vocabulary, trained once
    port = _free_port()
    procs = [subprocess.Popen([*cmd, f"--workdir={two}", f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=_env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "on 8 cpu device(s)" in outs[0][0] and "--- sample" in outs[0][0]
    assert "step 20/20" not in outs[1][0]  # only process 0 logs
    single, multi = _losses(one), _losses(two)
    assert len(single) == len(multi) == 20
    assert max(abs(a - b) for a, b in zip(single, multi)) <= 1e-5
    assert os.path.isdir(two / "checkpoints" / "20")
