"""experiments/bench_attention.py: a tiny end-to-end run on CPU, the FLOP convention, failure cells, the summary."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "experiments", "bench_attention.py")
NUMBER = r"\d+\.\d+"


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_module()


def test_tiny_run_prints_numeric_rows_and_writes_json(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--seqs=64", "--head_dims=64", "--tokens=128", "--iters=1",
                           "--dtype=float32", f"--json_out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device: ") and "jax " in lines[0]
    assert any("interpreter timings" in line for line in lines)
    for impl in ("pallas", "xla"):
        # hdim seq batch heads impl | fwd ms, fwd TF/s, f+b ms, f+b TF/s, then the two XLA memory figures
        pattern = (rf"^64\s+64\s+2\s+32\s+{impl}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}"
                   rf"\s+{NUMBER} MiB\s+{NUMBER} MiB\s+n/a$")
        assert any(re.match(pattern, line) for line in lines), (impl, proc.stdout)
    # cuDNN is GPU-only: on CPU its row reads n/a instead of ending the run.
    assert any(re.match(r"^64\s+64\s+2\s+32\s+cudnn(\s+n/a)+$", line) for line in lines), proc.stdout

    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"pallas", "xla", "cudnn"}
    fwd = 4 * 2 * 32 * 64 * 64 * 64 / 2  # 4 B N T S H, causal half
    for impl in ("pallas", "xla"):
        r = rows[impl]
        assert r["fwd_flops"] == fwd and r["fwd_bwd_flops"] == 3.5 * fwd
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert abs(r["fwd_tflops"] - fwd / (r["fwd_ms"] / 1e3) / 1e12) <= 1e-9


def test_flops_follow_flash_attention_2():
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=False) == (4 * 2 * 16 * 1024**2 * 128,
                                                                         3.5 * 4 * 2 * 16 * 1024**2 * 128)
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=True)[0] == 2 * 2 * 16 * 1024**2 * 128
    assert [bench.parse_length(s) for s in ("512", "4k", "16K")] == [512, 4096, 16384]


def test_a_failing_cell_is_labelled_and_the_run_goes_on(monkeypatch):
    def raises(message):
        def fn(q, k, v):
            raise RuntimeError(message)
        return fn

    q = jnp.zeros((1, 8, 2, 4), jnp.float32)
    monkeypatch.setattr(bench, "attention_fn", lambda impl, causal: raises("RESOURCE_EXHAUSTED: Out of memory"))
    errors = {}
    cell = bench.bench_cell("pallas", q, q, q, True, 1, errors)
    assert cell["fwd_ms"] == cell["fwd_bwd_ms"] == cell["fwd_bwd_tflops"] == "oom"
    assert errors["pallas fwd"].startswith("RuntimeError: RESOURCE_EXHAUSTED")

    monkeypatch.setattr(bench, "attention_fn", lambda impl, causal: raises("unsupported"))
    assert bench.bench_cell("xla", q, q, q, True, 1, {})["fwd_ms"] == "error"
    assert bench.bench_cell("cudnn", q, q, q, True, 1, {})["fwd_bwd_ms"] == "n/a"


def test_summary_is_pallas_over_cudnn_at_4k_and_16k_head_dim_128():
    def row(impl, seq, tflops, head_dim=128):
        return {"impl": impl, "head_dim": head_dim, "seq": seq, "fwd_bwd_tflops": tflops}

    rows = [row("pallas", 4096, 300.0), row("cudnn", 4096, 400.0), row("pallas", 16384, "oom"),
            row("cudnn", 16384, 450.0), row("pallas", 4096, 100.0, head_dim=64), row("cudnn", 4096, 1.0, head_dim=64)]
    want = "pallas / cudnn fwd+bwd TFLOP/s (head dim 128, causal): seq 4096: 0.75"
    assert bench.summary_line(rows, causal=True) == want
    assert bench.summary_line([row("pallas", 4096, 300.0), row("cudnn", 4096, "n/a")], causal=True) is None
