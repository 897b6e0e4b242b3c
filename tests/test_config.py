"""The config schema: every shipped config validates, bad values and unknown keys fail naming the key."""

import math
import os
import subprocess
import sys

import pytest

from maxlm import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["tiny", "llama_125m", "llama_1b", "llama2_7b", "internlm2_7b", "longctx_tiny", "internlm2_7b_32k"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
    c = C.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
    C.validate(c)


def test_param_counts_match_published_models():
    # Independent figures: Llama-2-7B has 6,738,415,616 parameters (HF model card / state dict sum);
    # InternLM2-7B 7.74B (report, table 1).
    c = C.load_config_file(os.path.join(ROOT, "configs", "llama2_7b.py"))
    assert C.num_params(c) == 6_738_415_616
    c = C.load_config_file(os.path.join(ROOT, "configs", "internlm2_7b.py"))
    assert abs(C.num_params(c) / 1e9 - 7.74) < 0.01


@pytest.mark.parametrize("key,value,fragment", [
    ("model.num_kv_heads", 3, "num_heads % num_kv_heads"),
    ("model.attention_impl", "flash", "must be one of"),
    ("model.rope_factor", 0.5, ">= 1"),
    ("data.seq_len", 4096, "max_seq_len"),
    ("optim.grad_accum_steps", 5, "not divisible"),
    ("optim.schedule", "exp", "must be one of"),
    ("mesh.tensor", 0, ">= 1 or -1"),
    ("lora.lr_ratio", 0.0, "must be positive"),
])
def test_invalid_values_name_the_key(key, value, fragment):
    c = C.override(C.load_config_file(os.path.join(ROOT, "configs", "tiny.py")), **{key: value})
    with pytest.raises(C.ConfigError) as err:
        C.validate(c)
    assert err.value.key == key
    assert fragment in str(err.value)


def test_pallas_needs_whole_kv_heads_per_tensor_shard():
    c = C.override(C.load_config_file(os.path.join(ROOT, "configs", "tiny.py")),
                   **{"model.attention_impl": "pallas", "model.num_kv_heads": 1, "mesh.tensor": 2})
    with pytest.raises(C.ConfigError) as err:
        C.validate(c)
    assert err.value.key == "mesh.tensor" and "pallas" in str(err.value)
    C.validate(C.override(c, **{"mesh.tensor": 1}))


def test_unknown_keys_are_rejected():
    c = C.default_config()
    with pytest.raises(C.ConfigError):
        C.override(c, **{"model.num_layer": 4})
    with pytest.raises(AttributeError):
        c.model.num_layer = 4  # the schema is locked


def test_from_dict_round_trip():
    c = C.load_config_file(os.path.join(ROOT, "configs", "internlm2_7b.py"))
    import json

    back = C.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.to_dict() == c.to_dict()


def test_flops_per_token_matches_6n_rule():
    # With a short context the attention term is negligible: FLOPs/token ~ 6 x matmul params.
    c = C.load_config_file(os.path.join(ROOT, "configs", "llama2_7b.py"))
    per_token = C.flops_per_token(c, seq_len=1)
    matmul_params = 6_738_415_616 - 32000 * 4096
    assert math.isclose(per_token, 6 * matmul_params, rel_tol=1e-3)


def _run_train(*args):
    return subprocess.run([sys.executable, "-m", "maxlm.train", "--config=configs/tiny.py", "--workdir=/tmp/unused",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("arg,key", [
    ("--config.model.num_kv_heads=3", "model.num_kv_heads"),
    ("--config.model.num_layer=4", "model.num_layer"),
    ("--config=configs/missing.py", "config"),
])
def test_cli_config_errors_are_one_line(arg, key):
    proc = _run_train(arg)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0] and "Traceback" not in proc.stderr
