"""Acceptance: at sequence length 8192 with the tiny model, sequence parallelism of degree 4 cuts the
compiled per-device temporary (activation) bytes to at most 35% of the degree-1 figure (XLA's compiled
memory analysis, via experiments/sequence_parallel_memory.py in a subprocess with 8 forced CPU devices)."""

import os
import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "experiments", "sequence_parallel_memory.py")


def test_sequence_parallel_degree_4_cuts_temporaries_to_35_percent():
    proc = subprocess.run([sys.executable, SCRIPT, "--config=configs/tiny.py", "--seq_len=8192", "--batch_size=1",
                           "--degrees=1,4", "--attention_impl=xla"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout
    result = {k: float(v) for k, v in (f.split("=") for f in lines[0].split()[1:])}
    temp1, temp4 = result["degree1_temp"], result["degree4_temp"]
    assert temp1 > 0 and temp4 > 0, proc.stdout
    assert abs(result["ratio"] - temp4 / temp1) <= 1e-3, proc.stdout
    assert temp4 <= 0.35 * temp1, proc.stdout
