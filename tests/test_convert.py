"""Hugging Face <-> maxlm conversion, checked against transformers as the independent oracle.

Small random models (`tests.helpers.build_hf`: 2 layers, hidden 64, 4 heads, vocab 160, intermediate 160,
float32), re-initialised with O(1)-scale weights, random norm scales and non-zero biases so that a wrong
mapping cannot hide behind near-zero activations. Every logit comparison is against a transformers model,
never maxlm against itself. (Gemma 3's norms, zero-centred, get 1 + N(0, 0.1) too: effective scales near 2,
so a norm that forgot its + 1 is off by a factor of two.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from maxlm.model import decoder as model_lib  # noqa: E402
from maxlm.interop.hf import from_hf, to_hf  # noqa: E402
from tests.helpers import HF_TOL, HF_VOCAB, build_hf, hf_logits  # noqa: E402

# name -> (HF class name, extra config kwargs)
VARIANTS = {
    "llama_mha": ("LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama_gqa": ("LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=500.0)),
    "llama_rope_linear": ("LlamaForCausalLM", dict(num_key_value_heads=2,
                                                   rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_tied": ("LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2": ("Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    # Qwen3: QK-norm and an explicit head_dim (24 * 4 heads != hidden 64)
    "qwen3": ("Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=24, rope_theta=1000000.0)),
    # Mistral: a sliding window shorter than the test sequences (17 tokens; packed: segments up to 9)
    "mistral": ("MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=5, head_dim=16)),
    # Gemma 3 (text): 4 layers, local local global local (sliding_window_pattern 3) with a window shorter than
    # the test sequences, the local base 1e4 and the global 1e6 with linear scaling on the global layers only,
    # query_pre_attn_scalar 20 != head_dim 24, tied embeddings; its extra norms all get random scales.
    "gemma3": ("Gemma3ForCausalLM", dict(num_hidden_layers=4, num_key_value_heads=2, head_dim=24, sliding_window=5,
                                         layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                      "sliding_attention"],
                                         rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=20,
                                         rope_scaling={"rope_type": "linear", "factor": 2.0},
                                         tie_word_embeddings=True)),
    # Gemma 3 with final logit soft-capping (a cap small enough to bend O(1) logits) and an untied head
    "gemma3_softcap": ("Gemma3ForCausalLM", dict(num_key_value_heads=2, head_dim=16, sliding_window=5,
                                                 layer_types=["sliding_attention", "full_attention"],
                                                 final_logit_softcapping=3.0, tie_word_embeddings=False)),
    # Mixtral: 4 experts, top-2 renormalised, experts' hidden size intermediate_size (160)
    "mixtral": ("MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    # Qwen3-MoE: QK-norm, 4 experts of moe_intermediate_size 48, top-2 without renormalisation (norm_topk_prob)
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(num_key_value_heads=2, head_dim=24, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False)),
    # Llama 3.2: tied embeddings, a 500000 base and the llama3 rope scaling
    "llama3": ("LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 16})),
}


def _tokens(seed: int = 0, shape=(2, 17)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, HF_VOCAB, shape).astype(np.int32)


def _maxlm_logits(config, params, tokens, **kw) -> np.ndarray:
    return np.asarray(model_lib.apply(config, params, tokens, **kw))


def _max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _check_close(name: str, got, want) -> None:
    diff = _max_diff(got, want)
    print(f"[{name}] max abs diff {diff:.3g}")
    assert diff < HF_TOL, f"{name}: max abs diff {diff} >= {HF_TOL}"


def _save(model, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def _leaves(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _assert_params_equal(a, b) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and np.array_equal(la[k], lb[k]), k


def _assert_tensors_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert np.array_equal(got[k], want[k]), k


# ----------------------------------------------------------------------------------------------------------
# Llama / Qwen2


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_and_round_trip(variant, tmp_path):
    class_name, kwargs = VARIANTS[variant]
    hf_model = build_hf(class_name, **kwargs)
    src = _save(hf_model, tmp_path / "src")
    tokens = _tokens()
    want = hf_logits(hf_model, tokens)

    config, params = from_hf(src)
    m = config.model
    assert m.compute_dtype == "float32" and m.num_kv_heads == kwargs["num_key_value_heads"]
    assert m.qkv_bias == (class_name == "Qwen2ForCausalLM") and not m.fused_qkv
    assert m.tie_embeddings == kwargs.get("tie_word_embeddings", False)
    assert m.rope_scaling == kwargs.get("rope_scaling", {}).get("rope_type", "none")
    assert m.qk_norm == (class_name in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"))
    assert m.num_experts == kwargs.get("num_local_experts", kwargs.get("num_experts", 0))
    got = _maxlm_logits(config, params, tokens)
    _check_close(f"{variant} parity", got, want)

    # Round trip: every exported tensor is bit-identical to what transformers saved, and reads back equal.
    out = str(tmp_path / "out")
    to_hf(config, params, out)
    _assert_tensors_equal(safetensors_numpy.load_file(os.path.join(out, "model.safetensors")),
                          safetensors_numpy.load_file(os.path.join(src, "model.safetensors")))
    config2, params2 = from_hf(out)
    assert config2.model.to_dict() == config.model.to_dict()
    _assert_params_equal(params2, params)

    # The exported folder loads in transformers and computes the same function.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == class_name
    again = hf_logits(reloaded, tokens)
    _check_close(f"{variant} reloaded-HF vs HF", again, want)
    _check_close(f"{variant} reloaded-HF vs maxlm", got, again)


def _packed_batch():
    """Two rows of 17: documents [5, 7, 5] and [9, 6] + 2 padding; positions restart per document."""
    rng = np.random.default_rng(1)
    layout = [[5, 7, 5], [9, 6]]
    tokens = rng.integers(0, HF_VOCAB, (2, 17)).astype(np.int32)
    positions = np.zeros((2, 17), np.int32)
    segment_ids = np.zeros((2, 17), np.int32)
    docs = []  # (row, start, length)
    for row, lengths in enumerate(layout):
        start = 0
        for seg, length in enumerate(lengths, start=1):
            positions[row, start:start + length] = np.arange(length)
            segment_ids[row, start:start + length] = seg
            docs.append((row, start, length))
            start += length
    return tokens, positions, segment_ids, docs


def _check_packed(name, config, params, hf_model):
    tokens, positions, segment_ids, docs = _packed_batch()
    got = _maxlm_logits(config, params, tokens, positions=positions, segment_ids=segment_ids)
    worst = 0.0
    for row, start, length in docs:
        want = hf_logits(hf_model, tokens[row:row + 1, start:start + length])[0]
        worst = max(worst, _max_diff(got[row, start:start + length], want))
    print(f"[{name} packed] max abs diff {worst:.3g}")
    assert worst < HF_TOL


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen2", "qwen3", "mistral", "gemma3", "mixtral"])
def test_packed_sequences(variant, tmp_path):
    class_name, kwargs = VARIANTS[variant]
    hf_model = build_hf(class_name, seed=1, **kwargs)
    config, params = from_hf(_save(hf_model, tmp_path / "src"))
    _check_packed(variant, config, params, hf_model)


def _check_pallas(variant: str, tmp_path) -> None:
    """`variant` through maxlm's flash kernel (interpreted here): its logits against transformers, packed
    documents included, and the loss gradient equal to the XLA path's."""
    from maxlm import config as config_lib

    class_name, kwargs = VARIANTS[variant]
    hf_model = build_hf(class_name, seed=1, **kwargs)
    config, params = from_hf(_save(hf_model, tmp_path / "src"))
    pallas = config_lib.override(config, **{"model.attention_impl": "pallas"})
    _check_close(f"{variant} pallas", _maxlm_logits(pallas, params, _tokens()), hf_logits(hf_model, _tokens()))
    _check_packed(f"{variant} pallas", pallas, params, hf_model)
    tokens, positions, segment_ids, _ = _packed_batch()

    def loss(p, cfg):
        logits = model_lib.apply(cfg, p, tokens, positions=positions, segment_ids=segment_ids)
        return (logits * (segment_ids > 0)[..., None]).sum() / 100.0

    def grad(cfg):  # jitted: one compilation instead of op-by-op dispatch, about half the time
        return jax.jit(jax.grad(lambda p: loss(p, cfg)))(params)

    want, got = grad(config), grad(pallas)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert diff < 1e-4, diff


def test_mistral_window_through_the_pallas_kernel(tmp_path):
    """The sliding window in maxlm's flash kernel: Mistral, every layer local."""
    _check_pallas("mistral", tmp_path)


def test_gemma3_local_and_global_layers_through_the_pallas_kernel(tmp_path):
    """Gemma 3's interleave in maxlm's flash kernel: a static window per compiled branch, `lax.cond` choosing
    the local or the global one per scanned layer, and query_pre_attn_scalar as the kernel's logit scale."""
    _check_pallas("gemma3", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# InternLM2 layout: packed here from a GQA Llama with torch ops; the Llama model is the oracle.


def _internlm2_checkpoint(llama, path, tie=False) -> str:
    cfg = llama.config
    n, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    h, g = d // n, n // kv
    sd = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"]}
    if not tie:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        q = sd[src + "self_attn.q_proj.weight"].view(kv, g, h, d)  # query head k*g + j -> [k, j]
        k = sd[src + "self_attn.k_proj.weight"].view(kv, 1, h, d)
        v = sd[src + "self_attn.v_proj.weight"].view(kv, 1, h, d)
        out[dst + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(kv * (g + 2) * h, d)
        out[dst + "attention.wo.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "feed_forward.w1.weight"] = sd[src + "mlp.gate_proj.weight"]
        out[dst + "feed_forward.w3.weight"] = sd[src + "mlp.up_proj.weight"]
        out[dst + "feed_forward.w2.weight"] = sd[src + "mlp.down_proj.weight"]
        out[dst + "attention_norm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = sd[src + "post_attention_layernorm.weight"]
    os.makedirs(path, exist_ok=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(path, "model.safetensors"),
                                metadata={"format": "pt"})
    hf_config = {  # the keys of internlm/internlm2-7b's config.json
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2", "attn_implementation": "eager", "bias": False, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu", "hidden_size": d, "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": n, "num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": kv,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_scaling": None, "rope_theta": 1000000, "torch_dtype": "float32",
        "tie_word_embeddings": tie, "use_cache": True, "vocab_size": cfg.vocab_size,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return str(path)


def test_internlm2_layout(tmp_path):
    llama = build_hf("LlamaForCausalLM", seed=2, num_key_value_heads=2, rope_theta=1000000.0)
    src = _internlm2_checkpoint(llama, tmp_path / "src")
    tokens = _tokens(2)
    want = hf_logits(llama, tokens)

    config, params = from_hf(src)
    assert config.model.fused_qkv and not config.model.qkv_bias and config.model.rope_theta == 1e6
    assert params["layers"]["attn"]["wqkv"].shape == (2, 64, 2, 4, 16)
    _check_close("internlm2 parity", _maxlm_logits(config, params, tokens), want)
    _check_packed("internlm2", config, params, llama)

    # Round trip in the InternLM2 layout (no modeling code offline: compare tensors, not logits).
    out = str(tmp_path / "out")
    to_hf(config, params, out)
    _assert_tensors_equal(safetensors_numpy.load_file(os.path.join(out, "model.safetensors")),
                          safetensors_numpy.load_file(os.path.join(src, "model.safetensors")))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["InternLM2ForCausalLM"]
    _, params2 = from_hf(out)
    _assert_params_equal(params2, params)

    # Un-fusing to Llama gives back the oracle's exact tensors and a model transformers runs identically.
    as_llama = str(tmp_path / "as_llama")
    to_hf(config, params, as_llama, architecture="llama")
    _assert_tensors_equal(safetensors_numpy.load_file(os.path.join(as_llama, "model.safetensors")),
                          {k: v.numpy() for k, v in llama.state_dict().items()})
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(as_llama, attn_implementation="eager").eval()
    _check_close("internlm2 -> llama reloaded-HF vs HF", hf_logits(reloaded, tokens), want)


def test_internlm2_tied(tmp_path):
    llama = build_hf("LlamaForCausalLM", seed=3, num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True)
    config, params = from_hf(_internlm2_checkpoint(llama, tmp_path / "src", tie=True))
    assert config.model.tie_embeddings and "lm_head" not in params
    tokens = _tokens(3)
    _check_close("internlm2 tied parity", _maxlm_logits(config, params, tokens), hf_logits(llama, tokens))


# ----------------------------------------------------------------------------------------------------------
# Checkpoint forms and errors


def test_sharded_bf16_and_file_path(tmp_path):
    hf_model = build_hf("Qwen2ForCausalLM", seed=4, num_key_value_heads=2)
    tokens = _tokens(4)

    sharded = str(tmp_path / "sharded")
    hf_model.save_pretrained(sharded, max_shard_size="60KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    config, params = from_hf(sharded)
    _check_close("qwen2 sharded parity", _maxlm_logits(config, params, tokens), hf_logits(hf_model, tokens))

    # bf16 weights: the oracle is the same bf16-rounded weights run in float32 by transformers.
    bf16 = str(tmp_path / "bf16")
    rounded = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    hf_model.to(torch.bfloat16).save_pretrained(bf16)
    hf_model = build_hf("Qwen2ForCausalLM", seed=4, num_key_value_heads=2)  # fresh float32 rotary buffers
    hf_model.load_state_dict({k: v.float() for k, v in rounded.items()})
    config, params = from_hf(os.path.join(bf16, "model.safetensors"))  # a file path, config.json beside it
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))
    _check_close("qwen2 bf16 parity", _maxlm_logits(config, params, tokens), hf_logits(hf_model, tokens))


def test_sharded_bf16_export_loads_everywhere(tmp_path):
    """to_hf(dtype=bfloat16, max_shard_size=...) writes what save_pretrained writes -- shards named
    model-0000i-of-0000N with an index -- and transformers' Auto class reproduces maxlm's logits on the
    bf16-rounded weights with no extra arguments; from_hf reads the shards back exactly."""
    hf_model = build_hf("LlamaForCausalLM", seed=5, num_key_value_heads=2)
    config, params = from_hf(_save(hf_model, tmp_path / "src"))
    out = str(tmp_path / "out")
    to_hf(config, params, out)  # one file first: the sharded export below must remove it
    to_hf(config, params, out, dtype="bfloat16", max_shard_size="40KB")
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert "model.safetensors" not in files and len(files) >= 3, files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    on_disk = {}
    for name in files:
        on_disk.update({k: (name, v) for k, v in safetensors_numpy.load_file(os.path.join(out, name)).items()})
    assert {k: name for k, (name, _) in on_disk.items()} == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(v.nbytes for _, v in on_disk.values())
    assert {str(v.dtype) for _, v in on_disk.values()} == {"bfloat16"}
    for name in files:  # every shard but one holding a single large tensor stays under the limit
        sizes = [v.nbytes for n, v in on_disk.values() if n == name]
        assert sum(sizes) <= 40_000 or len(sizes) == 1, (name, sizes)

    rounded = jax.tree_util.tree_map(lambda x: np.asarray(x, np.dtype("bfloat16")).astype(np.float32), params)
    config2, params2 = from_hf(out)
    _assert_params_equal(params2, rounded)
    tokens = _tokens(5)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                                 dtype=torch.float32).eval()
    _check_close("bf16 sharded export: transformers vs maxlm", hf_logits(reloaded, tokens),
                 _maxlm_logits(config2, params2, tokens))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"

    to_hf(config, params, out)  # and back to one file: the shards and the index go
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]


def test_lazy_import_onto_shardings(tmp_path, monkeypatch):
    """from_hf(shardings=..., dtype=...) places each leaf on its sharding as it is read: jax arrays in the
    asked dtype and sharding, equal to the eager import, and no more than one leaf's worth of tensors read
    ahead of placement."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from maxlm.interop import hf

    hf_model = build_hf("Qwen2ForCausalLM", seed=6, num_key_value_heads=2)
    src = str(tmp_path / "src")
    hf_model.save_pretrained(src, max_shard_size="60KB")
    _, eager = from_hf(src)

    mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    asked = {}

    def shardings(config):
        asked["config"] = config
        return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, PartitionSpec(*([None] * len(x.shape)))),
                                      model_lib.abstract_params(config))

    pending = []  # tensor sizes read since the last placement
    peak = []
    pop, place = hf._LazyTensors.pop, jax.make_array_from_callback

    def counting_pop(self, key, *default):
        x = pop(self, key, *default)
        pending.append(getattr(x, "nbytes", 0))
        return x

    def counting_place(shape, sharding, callback):
        peak.append(sum(pending))
        pending.clear()
        return place(shape, sharding, callback)

    monkeypatch.setattr(hf._LazyTensors, "pop", counting_pop)
    monkeypatch.setattr(jax, "make_array_from_callback", counting_place)
    config, params = from_hf(src, dtype=np.dtype("bfloat16"), shardings=shardings)
    assert config.model.param_dtype == "bfloat16" and asked["config"].model.num_kv_heads == 2
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(eager)):
        assert isinstance(got, jax.Array) and got.dtype == jnp.bfloat16, path
        assert got.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec()), got.ndim), path
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(want, np.dtype("bfloat16")).astype(np.float32))
    largest_leaf = max(x.nbytes for x in jax.tree_util.tree_leaves(eager))  # float32 on disk here
    assert 0 < max(peak) <= largest_leaf, (peak, largest_leaf)


def test_unsupported_raise(tmp_path):
    src = _save(build_hf("LlamaForCausalLM", num_key_value_heads=2), tmp_path / "src")
    with open(os.path.join(src, "config.json")) as f:
        base = json.load(f)

    def write(**changes):
        cfg = {k: v for k, v in base.items() if k not in ("rope_parameters", "rope_scaling")}
        cfg.update(changes)
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(cfg, f)

    write(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture"):
        from_hf(src)
    write(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="llama3 rope scaling without low_freq_factor"):
        from_hf(src)
    write(rope_parameters={"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope type"):
        from_hf(src)
    write()
    config, params = from_hf(src)
    with pytest.raises(ValueError, match="unsupported architecture"):
        to_hf(config, params, str(tmp_path / "x"), architecture="gpt2")


@pytest.mark.slow
def test_load_memory_script_on_eight_devices():
    """experiments/load_hf_memory.py at its tiny shape: the sharded import onto 8 CPU devices leaves each
    device about an eighth of the model (asserted inside the script), and every loader reports."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "load_hf_memory.py"), "--shape=tiny"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["files"] > 1 and {r["loader"] for r in result["rows"]} >= {"maxlm float32 host", "maxlm bf16 sharded"}


# ----------------------------------------------------------------------------------------------------------
# Gemma 3: the config forms found on the Hub, refusals, and attention soft-capping


def test_gemma3_hub_config_forms_and_refusals(tmp_path):
    """The Hub's older config.json form of Gemma 3 (sliding_window_pattern, rope_theta, rope_local_base_freq,
    rope_scaling) reads as the same model as transformers 5's (layer_types, per-layer-type rope_parameters),
    and transformers reads it so too; what maxlm cannot run as transformers does is one HFError line."""
    class_name, kwargs = VARIANTS["gemma3"]
    src = _save(build_hf(class_name, **kwargs), tmp_path / "src")
    config, params = from_hf(src)
    m = config.model
    assert (m.sliding_window, m.global_every, m.local_rope_theta, m.rope_theta) == (5, 3, 1e4, 1e6)
    assert (m.rope_scaling, m.rope_factor, m.query_pre_attn_scalar) == ("linear", 2.0, 20.0)
    with open(os.path.join(src, "config.json")) as f:
        v5 = json.load(f)
    assert "layer_types" in v5 and "full_attention" in v5["rope_parameters"]

    def write(**changes):
        cfg = {k: v for k, v in v5.items() if k not in ("layer_types", "rope_parameters")}
        cfg.update(sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=1e4,
                   rope_scaling={"rope_type": "linear", "factor": 2.0})
        cfg.update(changes)
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(cfg, f)

    write()
    assert from_hf(src)[0].model.to_dict() == m.to_dict()
    hf_config = transformers.AutoConfig.from_pretrained(src)
    assert hf_config.layer_types == kwargs["layer_types"] and hf_config.rope_parameters == v5["rope_parameters"]

    refusals = [
        (dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3"), "Gemma3ForConditionalGeneration"),
        (dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2"), "unsupported Gemma variant"),
        (dict(use_bidirectional_attention=True), "bidirectional"),
        (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        (dict(hidden_activation="gelu"), "hidden_activation"),
        (dict(layer_types=["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]),
         "pattern"),
        (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
              rope_scaling=None), "sliding-window layers"),
    ]
    for changes, fragment in refusals:
        write(**changes)
        with pytest.raises(ValueError, match=fragment) as err:
            from_hf(src)
        assert "\n" not in str(err.value), changes

    from maxlm import config as config_lib

    with pytest.raises(ValueError, match="export as gemma3"):
        to_hf(config, params, str(tmp_path / "x"), architecture="llama")
    with pytest.raises(ValueError, match="attn_logit_softcap"):
        to_hf(config_lib.override(config, **{"model.attn_logit_softcap": 50.0}), params, str(tmp_path / "y"))


def test_attention_softcap_matches_transformers_gemma2():
    """maxlm's attention logit soft-capping (the XLA reference) against transformers' Gemma 2 eager attention,
    whose model applies attn_logit_softcapping: a custom logit scale, the cap, a causal sliding window, GQA."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from maxlm.model import attention

    b, t, n, kv, h, window, scale, cap = 2, 9, 4, 2, 8, 4, 0.3, 2.0
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(0, 1.5, (b, t, heads, h)).astype(np.float32) for heads in (n, kv, kv))
    rows, cols = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = np.where((cols <= rows) & (rows - cols < window), 0.0, -np.inf).astype(np.float32)
    module = SimpleNamespace(head_dim=h, num_key_value_groups=n // kv, training=False)
    as_torch = lambda x: torch.from_numpy(x).transpose(1, 2)  # [B,T,N,H] -> [B,N,T,H]
    seg = np.ones((b, t), np.int32)

    def maxlm_attention(**kw):
        return np.asarray(attention.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, window=window,
                                           scale=scale, **kw))

    with torch.no_grad():
        want, _ = eager_attention_forward(module, as_torch(q), as_torch(k), as_torch(v),
                                          torch.from_numpy(mask)[None, None], scaling=scale, softcap=cap)
    _check_close("attention softcap", maxlm_attention(softcap=cap), want.numpy())
    assert _max_diff(maxlm_attention(), want.numpy()) > 1e-2  # the cap matters at these logits
