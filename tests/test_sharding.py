"""Sharded train steps equal the single-device step (8 forced CPU devices, in a subprocess)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mesh,impl", [((8, 1, 1, 1), "xla"), ((2, 2, 2, 1), "xla"), ((1, 2, 2, 2), "xla"),
                                       ((2, 2, 2, 1), "pallas"), ((1, 2, 2, 2), "pallas")])
def test_sharded_step_matches_single_device(mesh, impl):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_step_check.py"), *map(str, mesh), impl],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"RESULT loss1=(\S+) loss8=(\S+) param_diff=(\S+)", proc.stdout)
    loss1, loss8, diff = map(float, m.groups())
    assert abs(loss1 - loss8) <= 1e-5 * abs(loss1)
    assert diff <= 1e-5
