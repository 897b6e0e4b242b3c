"""Ring attention (maxlm/model/ring_attention.py): the ring against the reference on the whole sequence --
outputs and gradients, both token orders, a sliding window -- on 4 forced CPU devices; three train steps with
ring context parallelism against one device; the tiles a device computes against a count from the full mask."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from kernels import reference
from maxlm import config as C
from maxlm.model import ring_attention
from tests.helpers import ROOT, parallel_params, parallel_rel


def test_ring_equals_the_reference_with_gradients():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ring_check.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"RESULT (zigzag=\S+ window=\S+) out=(\S+) dq=(\S+) dk=(\S+) dv=(\S+) permutes=(\S+)",
                      proc.stdout)
    assert len(rows) == 4, proc.stdout
    for case, *diffs, permutes in rows:
        assert all(float(d) < 1e-5 for d in diffs), case
        assert permutes == "True", case


def test_zigzag_permutation_gives_device_i_chunks_i_and_mirror():
    order = ring_attention.zigzag_permutation(16, 4)  # chunks of 2
    assert sorted(order) == list(range(16))
    np.testing.assert_array_equal(order[:4], [0, 1, 14, 15])  # device 0: chunk 0 and chunk 7
    np.testing.assert_array_equal(order[12:], [6, 7, 8, 9])  # device 3: chunks 3 and 4


@pytest.mark.parametrize("devices", [2, 4, 8])
@pytest.mark.parametrize("zigzag", [True, False])
def test_tiles_per_device_match_the_full_causal_mask(devices, zigzag):
    """The tiles the ring computes are exactly those where the whole sequence's causal mask is non-empty."""
    c = 3
    t = 2 * devices * c
    mask = np.asarray(reference.attention_mask(np.ones((1, t), np.int32), np.ones((1, t), np.int32),
                                               causal=True))[0]
    order = ring_attention.zigzag_permutation(t, devices) if zigzag else np.arange(t)
    want = []
    for i in range(devices):
        rows = order[2 * c * i: 2 * c * (i + 1)]
        count = 0
        for a in (rows[:c], rows[c:]):
            for j in range(2 * devices):
                count += bool(mask[np.ix_(a, np.arange(j * c, (j + 1) * c))].any())
        want.append(count)
    assert ring_attention.tiles_per_device(devices, zigzag) == want
    if zigzag:
        assert len(set(want)) == 1  # balanced: 2P + 1 tiles each
    else:
        assert want[-1] == 4 * devices - 1 and want[0] == 3


@pytest.mark.parametrize("over,key", [({"mesh.sequence_strategy": "ulysses"}, "mesh.sequence_strategy"),
                                      ({"mesh.sequence_order": "random"}, "mesh.sequence_order"),
                                      ({"mesh.sequence_strategy": "ring", "mesh.sequence": 4, "data.seq_len": 36},
                                       "mesh.sequence"),
                                      ({"mesh.sequence_strategy": "ring", "model.attn_logit_softcap": 50.0},
                                       "mesh.sequence_strategy")])
def test_bad_ring_configs_name_the_key(over, key):
    with pytest.raises(C.ConfigError, match=re.escape(key)):
        C.validate(C.override(C.default_config(), **{"data.seq_len": 32, **over}))


# 8 forced CPU devices, three float32 steps against one device (1e-4 relative).
FAST = []
SLOW = ["sequence=4,sequence_strategy=ring", "sequence=4,sequence_strategy=ring,sequence_order=contiguous",
        "pipeline=2,tensor=2,sequence=2,sequence_strategy=ring"]


@pytest.mark.parametrize("spec", parallel_params(FAST, SLOW))
def test_ring_steps_equal_one_device(spec):
    assert parallel_rel(spec, FAST, SLOW) <= 1e-4
