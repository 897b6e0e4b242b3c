"""`python -m maxlm.aot`: topology names, the collective parser, and (with libtpu) the acceptance runs.

The parser is checked against HLO lines written here in the forms XLA prints (synchronous and async,
listed and iota replica groups, TPU tiled layouts); the compiled runs need the `tpu` extra.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import kernels
from maxlm.training import aot
from tests.helpers import ROOT

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu: pip install -e '.[tpu]'")


@pytest.mark.parametrize("name, generation, shape, chips", [
    ("v5p-8", "v5p", "2x2x1", 4), ("v4-8", "v4", "2x2x1", 4), ("v5e-256", "v5e", "16x16", 256),
    ("v6e-8", "v6e", "2x4", 8), ("v5e-1", "v5e", "1x1", 1), ("v5p:2x2x1", "v5p", "2x2x1", 4),
    ("v5p-128", "v5p", "4x4x4", 64), ("V6E:8x8", "v6e", "8x8", 64), ("v5litepod-16", "v5e", "4x4", 16)])
def test_topology_names(name, generation, shape, chips):
    chip, got_shape, got_chips = aot.parse_topology(name)
    assert (chip.generation, got_shape, got_chips) == (generation, shape, chips)


@pytest.mark.parametrize("name, message", [
    ("v5p-6", "no standard v5p slice"), ("v7x-8", "unknown TPU generation"), ("v5e:2x2x1", "2 dimensions"),
    ("tpu", "expected a name like")])
def test_bad_topology_names_say_why(name, message):
    with pytest.raises(aot.TopologyError, match=message):
        aot.parse_topology(name)


HLO = """\
  %all-gather-start.1 = (bf16[512,4096]{1,0:T(8,128)(2,1)}, bf16[2048,4096]{1,0:T(8,128)(2,1)}) all-gather-start(bf16[512,4096]{1,0:T(8,128)(2,1)} %fusion.3), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}, use_global_device_ids=true
  %all-gather-done.1 = bf16[2048,4096]{1,0:T(8,128)(2,1)} all-gather-done((bf16[512,4096]{1,0}, bf16[2048,4096]{1,0}) %all-gather-start.1)
  %all-reduce.7 = f32[1024]{0} all-reduce(f32[1024]{0} %p), channel_id=2, replica_groups={{0,1},{2,3}}, to_apply=%add
  %reduce-scatter.2 = f32[256,128]{1,0} reduce-scatter(f32[1024,128]{1,0} %g), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %collective-permute.4 = s32[8]{0} collective-permute(s32[8]{0} %x), channel_id=4, source_target_pairs={{0,1},{1,2}}
  %fusion.9 = f32[4]{0} fusion(f32[4]{0} %all-reduce.7), kind=kLoop, calls=%fused
  %all-reduce.8 = f32[16]{0} all-reduce(f32[16]{0} %q), channel_id=5, replica_groups={{0},{1},{2},{3}}, to_apply=%add
"""


def test_collectives_from_hlo():
    found = aot.collectives(HLO, num_devices=4)
    assert set(found) == {"all-gather", "all-reduce", "reduce-scatter", "collective-permute"}
    gather = found["all-gather"]  # the gathered result, 3/4 of it over the wire; -done is not counted again
    assert gather["count"] == 1 and gather["bytes"] == 2048 * 4096 * 2 and gather["ici_bytes"] == 0.75 * gather["bytes"]
    reduce = found["all-reduce"]  # groups of 2: a ring all-reduce sends 2 x 1/2; a group of one moves nothing
    assert reduce["count"] == 1 and reduce["bytes"] == 4096 and reduce["ici_bytes"] == 4096
    scatter = found["reduce-scatter"]  # the operand, 3/4 of it
    assert scatter["bytes"] == 1024 * 128 * 4 and scatter["ici_bytes"] == 0.75 * 1024 * 128 * 4
    assert found["collective-permute"]["ici_bytes"] == 32


def test_compile_target_switches_the_kernel_family_off_the_interpreter():
    assert kernels.default_backend() == "gpu"  # on this CPU: the GPU kernels, interpreted
    with kernels.compile_target("tpu"):
        assert kernels.default_backend() == "tpu"
    assert kernels.default_backend() == "gpu"
    with pytest.raises(ValueError, match="compile_target"):
        with kernels.compile_target("cpu"):
            pass


def _aot(*flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_STDERR_LOG_LEVEL": "3", "TPU_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-m", "maxlm.aot", *flags], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=900)
    return proc, json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None


def test_bad_topology_is_one_line():
    proc, _ = _aot("--config=configs/tiny.py", "--topology=v9-8")
    assert proc.returncode == 2 and "unknown TPU generation" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.tpu
@needs_libtpu
def test_llama2_7b_on_one_v5e_chip_is_refused():
    proc, out = _aot("--config=configs/llama2_7b.py", "--topology=v5e-1", "--per_chip_batch=1")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert out["fits"] is False and out["compiled_bytes_per_chip"] > out["hbm_bytes_per_chip"] == 16 * 1024 ** 3
    assert "does not fit" in proc.stderr and "suggestion:" in proc.stderr and "more chips" in out["suggestion"]


@pytest.mark.tpu
@needs_libtpu
def test_decode_step_compiles_and_reports_tokens_per_second():
    proc, out = _aot("--config=configs/llama_1b.py", "--topology=v5e-8", "--step=decode", "--per_chip_batch=4",
                     "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out["fits"] and out["batch_size"] == 8 and out["tokens_per_s"] > 0
    assert out["bound"] == "hbm"  # one token per sequence: reading the weights and cache dominates


@pytest.mark.slow
@pytest.mark.tpu
@needs_libtpu
def test_llama2_7b_with_pallas_attention_fits_v5p_8():
    """The issue's acceptance run: the configured 1024 x 4096 batch on four v5p chips, as the largest
    micro-batch that fits with gradient accumulation."""
    proc, out = _aot("--config=configs/llama2_7b.py", "--topology=v5p-8", "--config.model.attention_impl=pallas")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out["fits"] and out["compiled_bytes_per_chip"] <= out["hbm_bytes_per_chip"]
    assert out["batch_size"] == 1024 and out["grad_accum_steps"] > 1
    assert 0 < out["estimated_mfu"] <= 1 and out["flops_per_step"] > 0
