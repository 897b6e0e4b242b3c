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
    ("model.global_every", 6, "model.sliding_window > 0"),
    ("model.local_rope_theta", 1e4, "model.sliding_window > 0"),
    ("model.mlp_activation", "relu", "must be one of"),
    ("model.final_logit_softcap", -1.0, ">= 0"),
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


def test_attention_options_need_an_impl_that_takes_them():
    """Gemma 2's attention soft-capping is in the XLA reference only: the kernels are refused, naming the key;
    Gemma's query_pre_attn_scalar goes to every built-in impl (a logit scale), mixed local/global layers too."""
    c = C.override(C.load_config_file(os.path.join(ROOT, "configs", "tiny.py")),
                   **{"model.attn_logit_softcap": 50.0, "model.attention_impl": "pallas"})
    with pytest.raises(C.ConfigError) as err:
        C.validate(c)
    assert err.value.key == "model.attn_logit_softcap" and "'xla'" in str(err.value)
    C.validate(C.override(c, **{"model.attention_impl": "xla"}))
    C.validate(C.override(c, **{"model.attn_logit_softcap": 0.0, "model.query_pre_attn_scalar": 256.0,
                                "model.sliding_window": 8, "model.global_every": 6}))


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


# ---- registries beside their implementation (RoPE variants, attention impls, chat templates, eval tasks) ----

def _tiny(**overrides):
    return C.override(C.load_config_file(os.path.join(ROOT, "configs", "tiny.py")), **overrides)


@pytest.mark.parametrize("key,value,names", [
    ("model.rope_scaling", "xpos", ("none", "linear", "ntk", "dynamic", "yarn", "llama3")),
    ("model.attention_impl", "flash", ("xla", "cudnn", "pallas")),
    ("sft.template", "chatgpt", ("chatml", "internlm2", "hf")),
])
def test_unknown_registry_names_are_one_line_naming_the_key_and_the_registered(key, value, names):
    with pytest.raises(C.ConfigError) as err:
        C.validate(_tiny(**{key: value}))
    assert err.value.key == key and "\n" not in str(err.value)
    assert f"must be one of {names}" in str(err.value)


@pytest.fixture
def fake_rope():
    """A registered RoPE variant `test_double_theta`: plain rope with twice the base; records its arguments."""
    from maxlm.model import attention

    seen = []

    @attention.register_rope("test_double_theta")
    def double_theta(h, *, theta, **params):
        seen.append(set(params))
        return attention._inverse_frequencies(h, 2 * theta), 1.0

    try:
        yield seen
    finally:
        del attention.ROPE_VARIANTS["test_double_theta"]


def _small(**overrides):
    return _tiny(**{"model.num_layers": 1, "model.vocab_size": 64, "model.d_model": 32, "model.num_heads": 2,
                    "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.max_seq_len": 64, "data.seq_len": 32,
                    **overrides})


def test_a_registered_rope_variant_is_accepted_by_config_and_used_by_the_model(fake_rope):
    import jax
    import numpy as np

    from maxlm.model import decoder as model

    c = C.validate(_small(**{"model.rope_scaling": "test_double_theta"}))  # no config edit needed
    params = model.init(c, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(0).integers(0, 64, (2, 24)).astype(np.int32)
    got = np.asarray(model.apply(c, params, tokens))
    doubled = np.asarray(model.apply(C.override(c, **{"model.rope_scaling": "none", "model.rope_theta": 2e4}),
                                     params, tokens))
    plain = np.asarray(model.apply(C.override(c, **{"model.rope_scaling": "none"}), params, tokens))
    np.testing.assert_array_equal(got, doubled)
    assert not np.allclose(got, plain)
    # Every model.rope_<name> key but theta / scaling reaches the variant as <name> (and seq_len).
    rope_keys = {k[len("rope_"):] for k in c.model if k.startswith("rope_")} - {"theta", "scaling"}
    assert fake_rope and all(s == rope_keys | {"seq_len"} for s in fake_rope)
    with pytest.raises(TypeError, match="unknown rope parameter"):  # a misspelt parameter is not swallowed
        from maxlm.model import attention

        attention.rope_frequencies(8, theta=1e4, scaling="yarn", beta_fats=16.0)


def test_a_registered_attention_impl_is_accepted_by_config_and_used_by_the_model():
    import jax
    import numpy as np

    from maxlm.model import attention, decoder as model

    calls = []

    @attention.register_attention("test_counting")
    def counting(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal):
        calls.append(q.shape)
        return attention.ATTENTION_IMPLS["xla"].fn(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal)

    try:
        c = C.validate(_small(**{"model.attention_impl": "test_counting"}))
        params = model.init(c, jax.random.PRNGKey(0))
        tokens = np.random.default_rng(0).integers(0, 64, (2, 24)).astype(np.int32)
        calls.clear()
        got = np.asarray(model.apply(c, params, tokens))
        assert calls and calls[-1][:2] == (2, 24)
        np.testing.assert_array_equal(got, np.asarray(model.apply(C.override(c, **{"model.attention_impl": "xla"}),
                                                                  params, tokens)))
    finally:
        del attention.ATTENTION_IMPLS["test_counting"]


def test_shape_keys_are_the_model_section_but_the_run_keys():
    from maxlm.interop import pretrained

    expected = {"vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                "max_seq_len", "rope_theta", "rope_scaling", "rope_factor", "rope_original_max_len", "rope_beta_fast",
                "rope_beta_slow", "rope_attention_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "norm_eps", "tie_embeddings", "fused_qkv", "qkv_bias", "qk_norm", "sliding_window", "init_std",
                "param_dtype", "global_every", "local_rope_theta", "norm_zero_centered", "post_norms",
                "mlp_activation", "scale_embeddings", "query_pre_attn_scalar", "attn_logit_softcap",
                "final_logit_softcap", "num_experts", "experts_per_token", "expert_mlp_dim", "router_renormalize"}
    assert set(C.shape_keys()) == expected and len(C.shape_keys()) == len(expected)
    assert tuple(pretrained.SHAPE_KEYS) == C.shape_keys()
    model_keys = set(C.default_config().model)
    assert set(C.MODEL_RUN_KEYS) <= model_keys and model_keys == expected | set(C.MODEL_RUN_KEYS)
    assert set(C.STAGE_KEYS["model"]) == {"max_seq_len", "rope_theta", "rope_scaling", "rope_factor",
                                          "rope_original_max_len", "rope_beta_fast", "rope_beta_slow",
                                          "rope_attention_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                                          "local_rope_theta", "attention_impl", "remat_policy", "compute_dtype"}


def test_eval_tasks_come_from_the_registry():
    from maxlm.evaluation import harness as evaluate
    from maxlm.data import tasks

    assert list(evaluate.EVAL_TASKS) == [*tasks.TASKS, "all", "mc", "ppl", "gen", "passkey", "contamination"]
    with pytest.raises(evaluate.EvaluateError) as err:
        evaluate.get_task("chess")
    assert str(err.value) == ("unknown --task=chess; choose one of format, reverse, sort, add, all, mc, ppl, gen, "
                              "passkey or contamination")
    ran = []
    evaluate.eval_task("test_echo", "a test task", needs_model=False)(lambda flags, model: ran.append(model))
    try:
        assert evaluate.task_help().endswith(", contamination (--data against --corpus) or test_echo (a test task).")
        evaluate.get_task("test_echo").run(None, None)
        assert ran == [None] and "test_echo" in str(pytest.raises(evaluate.EvaluateError, evaluate.get_task, "x").value)
    finally:
        del evaluate.EVAL_TASKS["test_echo"]


def test_evaluate_cli_unknown_task_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "maxlm.evaluate", "--task=chess"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "unknown --task=chess; choose one of format, reverse" in lines[0] and "contamination" in lines[0]


def test_rl_environments_are_validated_from_their_registry():
    """`ppo.reward_fn` names an environment registered beside its code (maxlm.environments, maxlm.graph)."""
    from maxlm.posttrain import environments, ppo  # noqa: F401  (ppo imports every built-in environment)

    assert list(environments.ENVIRONMENTS)[:3] == ["model", "checker", "shortest_path"]
    config = C.override(C.default_config(), **{"ppo.reward_fn": "chess"})
    with pytest.raises(C.ConfigError, match=r"ppo\.reward_fn.*'model', 'checker', 'shortest_path'"):
        environments.validate(config)
    environments.register("chess")(object)
    try:
        environments.validate(config)
    finally:
        del environments.ENVIRONMENTS["chess"]
