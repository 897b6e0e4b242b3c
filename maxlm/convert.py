"""Hugging Face <-> maxlm weight conversion: `from_hf(path)` and `to_hf(config, params, path)`.

Supported Hugging Face layouts (a `save_pretrained` folder: config.json + model.safetensors, or sharded
safetensors with `model.safetensors.index.json`):

* `LlamaForCausalLM` (MHA, GQA, MQA; optional `attention_bias` for q/k/v, whose o_proj bias must be zero),
* `Qwen2ForCausalLM` (Llama plus biases on q, k and v; no sliding-window layers),
* the InternLM2 layout (`InternLM2ForCausalLM`, the remote-code model of internlm/internlm2-*): one fused
  `wqkv` projection, `wo`, `feed_forward.w1/w3/w2`, `tok_embeddings`, `output`.

Rotary scaling: none (`rope_type` "default") and `linear` (position interpolation) only; anything else
(llama3, yarn, dynamic, longrope, ...) is a `ValueError`, as is every other architecture. Both the legacy
config keys (`rope_theta`, `rope_scaling`) and transformers 5's `rope_parameters` are read; `to_hf` writes
the legacy keys, which transformers 4.x and 5.x both read.

Weight layout. A torch `nn.Linear(in, out)` stores its weight as [out, in] and computes y = x W^T; maxlm
stores every matrix input-first with the head axes split out, so the einsums in `maxlm/model.py` read
directly (L = layers, leading axis of every `layers/...` leaf, stacked from HF's `model.layers.{i}`):

    maxlm leaf                  shape        HF tensor (per layer)             HF shape     mapping
    embedding                   [V, D]       model.embed_tokens.weight         [V, D]       identity
    layers/attn/q               [L, D, N, H] self_attn.q_proj.weight           [N*H, D]     view [N,H,D] -> (D,N,H)
    layers/attn/k, v            [L, D, K, H] self_attn.{k,v}_proj.weight       [K*H, D]     view [K,H,D] -> (D,K,H)
    layers/attn/{q,k,v}_bias    [L, N|K, H]  self_attn.{q,k,v}_proj.bias       [N*H | K*H]  view [N|K, H]
    layers/attn/o               [L, N, H, D] self_attn.o_proj.weight           [D, N*H]     view [D,N,H] -> (N,H,D)
    layers/attn_norm/scale      [L, D]       input_layernorm.weight            [D]          identity
    layers/mlp/gate, up         [L, D, F]    mlp.{gate,up}_proj.weight         [F, D]       transpose
    layers/mlp/down             [L, F, D]    mlp.down_proj.weight              [D, F]       transpose
    layers/mlp_norm/scale       [L, D]       post_attention_layernorm.weight   [D]          identity
    final_norm/scale            [D]          model.norm.weight                 [D]          identity
    lm_head (absent when tied)  [D, V]       lm_head.weight                    [V, D]       transpose

Query head n uses kv head n // G (G = N // K) in both codebases (HF `repeat_kv`), so no head permutation
is needed; the rotary embedding is the same "rotate half" layout, so q/k need no interleave either.

InternLM2 names: tok_embeddings (embedding), attention.wqkv, attention.wo (o), attention_norm,
feed_forward.w1 (gate), w3 (up), w2 (down), ffn_norm, model.norm, output (lm_head). Its fused projection
`wqkv.weight` is [(K*(G+2))*H, D] and is viewed as [K, G+2, H, D]: for each kv head, its G query heads,
then one key head, then one value head (the remote code's `rearrange(.., "b q (h gs d) -> b q h gs d")`).
maxlm's `fused_qkv=True` keeps exactly that grouping, input-first: `layers/attn/wqkv` [L, D, K, G+2, H]
(and `bqkv` [L, K, G+2, H] from `wqkv.bias` when the config says `bias: true`; then `wo.bias` must be 0).

`from_hf` returns the full maxlm config (`default_config()` with the model fields set, compute dtype
float32) and float32 numpy parameters in exactly the tree `maxlm.model.init` builds (checked against
`maxlm.model.abstract_params`). `to_hf` writes config.json + model.safetensors with the safetensors numpy
API; torch is never imported by this module. It picks the InternLM2 layout when `fused_qkv`, Qwen2 when
`qkv_bias`, else Llama, unless `architecture` says otherwise (the fused and split q/k/v layouts are
converted into each other as needed). An InternLM2 export has no remote code files (auto_map), so
`AutoModelForCausalLM` loads it only after you add InternLM2's modeling files; Llama and Qwen2 exports load
directly. A `rope_scaling="ntk"` model (static NTK-aware base scaling, which HF has no rope type for) is
exported exactly as rope_theta * factor^(H / (H - 2)) with no scaling.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy loader reads bf16)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from maxlm import config as config_lib
from maxlm import model as model_lib

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
}
_BY_CLASS = {v.lower(): k for k, v in _ARCHITECTURES.items()}


# ----------------------------------------------------------------------------------------------------------
# Reading


def _resolve(path: str) -> tuple[str, list[str]]:
    """A HF folder or one .safetensors file -> (folder holding config.json, safetensors files to read)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path}: expected a Hugging Face folder or a .safetensors file")
        return os.path.dirname(path), [path]
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such folder or file")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return path, [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return path, [single]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if len(files) == 1:
        return path, files
    if not files:
        raise ValueError(f"{path}: no .safetensors weights (pytorch .bin checkpoints are not supported; "
                         "re-save with safe_serialization=True)")
    raise ValueError(f"{path}: {len(files)} .safetensors files but no model.safetensors.index.json")


def _read_tensors(files: list[str]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        with safe_open(name, framework="np") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _architecture(hf: dict) -> str:
    names = list(hf.get("architectures") or [])
    for name in names:
        if name.lower() in _BY_CLASS:
            return _BY_CLASS[name.lower()]
    model_type = str(hf.get("model_type", "")).lower()
    if not names and model_type in _ARCHITECTURES:
        return model_type
    raise ValueError(f"unsupported architecture {names or model_type!r}: maxlm.convert reads "
                     f"{sorted(_ARCHITECTURES.values())}")


def _rope_from_hf(hf: dict) -> tuple[float, str, float]:
    """(theta, maxlm rope_scaling, factor) from legacy rope_theta/rope_scaling or v5 rope_parameters."""
    theta = hf.get("rope_theta")
    scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        if params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"per-layer-type rope_parameters are not supported: {params}")
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling = params
    theta = 10000.0 if theta is None else float(theta)
    rope_type = "default"
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, "none", 1.0
    if rope_type == "linear":
        if "factor" not in scaling:
            raise ValueError(f"linear rope scaling without a factor: {scaling}")
        return theta, "linear", float(scaling["factor"])
    raise ValueError(f"unsupported rope type {rope_type!r} (rope scaling {scaling}); maxlm.convert supports "
                     "'default' and 'linear'")


def _require_zero(tensors: dict, key: str, why: str) -> None:
    if key in tensors and np.any(np.asarray(tensors[key], np.float32) != 0):
        raise ValueError(f"{key} is non-zero but maxlm has no {why}")


def from_hf(path: str) -> tuple[ml_collections.ConfigDict, dict]:
    """Read a HF Llama / Qwen2 / InternLM2 checkpoint -> (full maxlm config, float32 numpy params)."""
    folder, files = _resolve(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{folder}: no config.json next to the weights")
    with open(config_path) as f:
        hf = json.load(f)
    arch = _architecture(hf)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {act!r}: maxlm's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported: maxlm's MLP has no biases")
    if arch == "qwen2":
        layer_types = hf.get("layer_types")
        sliding = (any(t != "full_attention" for t in layer_types) if layer_types
                   else hf.get("use_sliding_window", False)
                   and hf.get("max_window_layers", 0) < hf["num_hidden_layers"])
        if sliding:
            raise ValueError("Qwen2 sliding-window attention layers are not supported by maxlm")

    n_layers = int(hf["num_hidden_layers"])
    d = int(hf["hidden_size"])
    n = int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or n)
    h = int(hf.get("head_dim") or d // n) if arch != "internlm2" else d // n
    g = n // kv
    theta, scaling, factor = _rope_from_hf(hf)

    tensors = _read_tensors(files)
    pre = "model.layers.{}."
    if arch == "internlm2":
        embed_key, head_key = "model.tok_embeddings.weight", "output.weight"
        qkv_bias = "model.layers.0.attention.wqkv.bias" in tensors
    else:
        embed_key, head_key = "model.embed_tokens.weight", "lm_head.weight"
        qkv_bias = "model.layers.0.self_attn.q_proj.bias" in tensors
    tie = bool(hf.get("tie_word_embeddings", head_key not in tensors))
    if not tie and head_key not in tensors:
        raise ValueError(f"{path}: tie_word_embeddings is false but there is no {head_key}")

    config = config_lib.override(config_lib.default_config(), **{
        "model.vocab_size": int(hf["vocab_size"]),
        "model.num_layers": n_layers,
        "model.d_model": d,
        "model.num_heads": n,
        "model.num_kv_heads": kv,
        "model.head_dim": h,
        "model.mlp_dim": int(hf["intermediate_size"]),
        "model.max_seq_len": int(hf.get("max_position_embeddings") or 2048),
        "model.rope_theta": theta,
        "model.rope_scaling": scaling,
        "model.rope_factor": factor,
        "model.norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "model.tie_embeddings": tie,
        "model.qkv_bias": qkv_bias,
        "model.fused_qkv": arch == "internlm2",
        "model.init_std": float(hf.get("initializer_range", 0.02)),
        "model.param_dtype": "float32",
        "model.compute_dtype": "float32",
    })
    config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
    config_lib.validate(config)

    def get(key: str) -> np.ndarray:
        if key not in tensors:
            raise ValueError(f"{path}: missing tensor {key!r} for {_ARCHITECTURES[arch]}")
        return np.asarray(tensors.pop(key), np.float32)

    def stack(fn: Callable[[str], np.ndarray]) -> np.ndarray:
        return np.stack([fn(pre.format(i)) for i in range(n_layers)])

    if arch == "internlm2":
        for i in range(n_layers):
            _require_zero(tensors, f"{pre.format(i)}attention.wo.bias", "output-projection bias")
            tensors.pop(f"{pre.format(i)}attention.wo.bias", None)
        attn_params = {
            "wqkv": stack(lambda p: get(p + "attention.wqkv.weight").reshape(kv, g + 2, h, d).transpose(3, 0, 1, 2)),
            "o": stack(lambda p: get(p + "attention.wo.weight").reshape(d, n, h).transpose(1, 2, 0)),
        }
        if qkv_bias:
            attn_params["bqkv"] = stack(lambda p: get(p + "attention.wqkv.bias").reshape(kv, g + 2, h))
        norm_keys = ("attention_norm.weight", "ffn_norm.weight")
        mlp_keys = ("feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight")
        final_key = "model.norm.weight"
    else:
        for i in range(n_layers):
            _require_zero(tensors, f"{pre.format(i)}self_attn.o_proj.bias", "output-projection bias")
            tensors.pop(f"{pre.format(i)}self_attn.o_proj.bias", None)

        def split_heads(heads: int, name: str):
            return stack(lambda p: get(p + f"self_attn.{name}_proj.weight").reshape(heads, h, d).transpose(2, 0, 1))

        attn_params = {"q": split_heads(n, "q"), "k": split_heads(kv, "k"), "v": split_heads(kv, "v"),
                       "o": stack(lambda p: get(p + "self_attn.o_proj.weight").reshape(d, n, h).transpose(1, 2, 0))}
        if qkv_bias:
            for name, heads in (("q", n), ("k", kv), ("v", kv)):
                attn_params[name + "_bias"] = stack(lambda p: get(p + f"self_attn.{name}_proj.bias").reshape(heads, h))
        norm_keys = ("input_layernorm.weight", "post_attention_layernorm.weight")
        mlp_keys = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
        final_key = "model.norm.weight"

    params: dict[str, Any] = {
        "embedding": get(embed_key),
        "layers": {
            "attn": attn_params,
            "attn_norm": {"scale": stack(lambda p: get(p + norm_keys[0]))},
            "mlp": {"gate": stack(lambda p: get(p + mlp_keys[0]).T),
                    "up": stack(lambda p: get(p + mlp_keys[1]).T),
                    "down": stack(lambda p: get(p + mlp_keys[2]).T)},
            "mlp_norm": {"scale": stack(lambda p: get(p + norm_keys[1]))},
        },
        "final_norm": {"scale": get(final_key)},
    }
    if tie:
        tensors.pop(head_key, None)  # some tied checkpoints store the (identical) head anyway
    else:
        params["lm_head"] = get(head_key).T
    params = jax.tree_util.tree_map(np.ascontiguousarray, params)
    leftover = sorted(k for k in tensors if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise ValueError(f"{path}: tensors not understood by the {_ARCHITECTURES[arch]} mapping: {leftover[:8]}"
                         + (" ..." if len(leftover) > 8 else ""))
    _check_tree(config, params, f"from_hf({path})")
    return config, params


def _check_tree(config: ml_collections.ConfigDict, params: dict, where: str) -> None:
    """Same tree structure and leaf shapes as `maxlm.model.init(config)` would produce."""
    expected = model_lib.abstract_params(config)
    exp_paths = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    got_paths = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if exp_paths.keys() != got_paths.keys():
        raise ValueError(f"{where}: parameter tree mismatch; missing {sorted(exp_paths.keys() - got_paths.keys())}, "
                         f"unexpected {sorted(got_paths.keys() - exp_paths.keys())}")
    bad = {k: (got_paths[k], exp_paths[k]) for k in exp_paths if tuple(exp_paths[k]) != got_paths[k]}
    if bad:
        raise ValueError(f"{where}: shape mismatch (got, expected): {bad}")


# ----------------------------------------------------------------------------------------------------------
# Writing


def _normalize_arch(architecture: str | None, m: ml_collections.ConfigDict) -> str:
    if architecture is None:
        return "internlm2" if m.fused_qkv else "qwen2" if m.qkv_bias else "llama"
    key = architecture.lower()
    if key in _ARCHITECTURES:
        return key
    if key in _BY_CLASS:
        return _BY_CLASS[key]
    raise ValueError(f"unsupported architecture {architecture!r}; choose one of "
                     f"{sorted(_ARCHITECTURES)} or {sorted(_ARCHITECTURES.values())}")


def to_hf(config: ml_collections.ConfigDict, params: dict, path: str, architecture: str | None = None) -> None:
    """Write `path`/config.json + `path`/model.safetensors for Llama, Qwen2 or the InternLM2 layout."""
    m = model_lib.model_config(config)
    arch = _normalize_arch(architecture, m)
    _check_tree(config, params, "to_hf")
    n_layers, d, n, kv = m.num_layers, m.d_model, m.num_heads, m.num_kv_heads
    h, g = config_lib.head_dim(m), m.num_heads // m.num_kv_heads

    theta, rope_scaling = float(m.rope_theta), None
    if m.rope_scaling == "linear":
        rope_scaling = {"rope_type": "linear", "type": "linear", "factor": float(m.rope_factor)}
    elif m.rope_scaling == "ntk":
        theta = theta * m.rope_factor ** (h / (h - 2))  # exactly what maxlm.attention.rope computes
    elif m.rope_scaling != "none":
        raise ValueError(f"unsupported rope_scaling {m.rope_scaling!r}")
    if arch == "internlm2" and h * n != d:
        raise ValueError(f"the InternLM2 layout needs head_dim * num_heads == d_model, got {h} * {n} != {d}")

    p = jax.tree_util.tree_map(np.asarray, params)
    a = p["layers"]["attn"]
    dtype = p["embedding"].dtype
    zeros = lambda *shape: np.zeros(shape, a["o"].dtype)
    # Bring the attention weights into the layout the target needs (fused <-> split q/k/v).
    if arch == "internlm2":
        if "wqkv" in a:
            wqkv, bqkv = a["wqkv"], a.get("bqkv")
        else:
            wqkv = np.concatenate([a["q"].reshape(n_layers, d, kv, g, h), a["k"][:, :, :, None], a["v"][:, :, :, None]],
                                  axis=3)
            bqkv = None
            if "q_bias" in a:
                bqkv = np.concatenate([a["q_bias"].reshape(n_layers, kv, g, h), a["k_bias"][:, :, None],
                                       a["v_bias"][:, :, None]], axis=2)
    else:
        if "wqkv" in a:
            w = a["wqkv"]
            q, k, v = w[:, :, :, :g].reshape(n_layers, d, n, h), w[:, :, :, g], w[:, :, :, g + 1]
            biases = None
            if "bqkv" in a:
                b = a["bqkv"]
                biases = (b[:, :, :g].reshape(n_layers, n, h), b[:, :, g], b[:, :, g + 1])
        else:
            q, k, v = a["q"], a["k"], a["v"]
            biases = (a["q_bias"], a["k_bias"], a["v_bias"]) if "q_bias" in a else None
        if biases is None and arch == "qwen2":  # Qwen2 always has q/k/v biases
            biases = (zeros(n_layers, n, h), zeros(n_layers, kv, h), zeros(n_layers, kv, h))

    t: dict[str, np.ndarray] = {}
    lay = p["layers"]
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        if arch == "internlm2":
            t[pre + "attention.wqkv.weight"] = wqkv[i].transpose(1, 2, 3, 0).reshape(kv * (g + 2) * h, d)
            if bqkv is not None:
                t[pre + "attention.wqkv.bias"] = bqkv[i].reshape(-1)
                t[pre + "attention.wo.bias"] = zeros(d)
            t[pre + "attention.wo.weight"] = a["o"][i].transpose(2, 0, 1).reshape(d, n * h)
            t[pre + "attention_norm.weight"] = lay["attn_norm"]["scale"][i]
            t[pre + "ffn_norm.weight"] = lay["mlp_norm"]["scale"][i]
            t[pre + "feed_forward.w1.weight"] = lay["mlp"]["gate"][i].T
            t[pre + "feed_forward.w3.weight"] = lay["mlp"]["up"][i].T
            t[pre + "feed_forward.w2.weight"] = lay["mlp"]["down"][i].T
        else:
            for name, w, heads in (("q", q, n), ("k", k, kv), ("v", v, kv)):
                t[pre + f"self_attn.{name}_proj.weight"] = w[i].transpose(1, 2, 0).reshape(heads * h, d)
            if biases is not None:
                for name, b in zip("qkv", biases):
                    t[pre + f"self_attn.{name}_proj.bias"] = b[i].reshape(-1)
                if arch == "llama":  # Llama's attention_bias also puts a bias on o_proj
                    t[pre + "self_attn.o_proj.bias"] = zeros(d)
            t[pre + "self_attn.o_proj.weight"] = a["o"][i].transpose(2, 0, 1).reshape(d, n * h)
            t[pre + "input_layernorm.weight"] = lay["attn_norm"]["scale"][i]
            t[pre + "post_attention_layernorm.weight"] = lay["mlp_norm"]["scale"][i]
            t[pre + "mlp.gate_proj.weight"] = lay["mlp"]["gate"][i].T
            t[pre + "mlp.up_proj.weight"] = lay["mlp"]["up"][i].T
            t[pre + "mlp.down_proj.weight"] = lay["mlp"]["down"][i].T
    if arch == "internlm2":
        t["model.tok_embeddings.weight"] = p["embedding"]
        t["model.norm.weight"] = p["final_norm"]["scale"]
        if not m.tie_embeddings:
            t["output.weight"] = p["lm_head"].T
    else:
        t["model.embed_tokens.weight"] = p["embedding"]
        t["model.norm.weight"] = p["final_norm"]["scale"]
        if not m.tie_embeddings:
            t["lm_head.weight"] = p["lm_head"].T
    t = {key: np.ascontiguousarray(value) for key, value in t.items()}

    dtype_name = np.dtype(dtype).name
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": m.vocab_size,
        "hidden_size": d,
        "intermediate_size": m.mlp_dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n,
        "num_key_value_heads": kv,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": float(m.norm_eps),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "initializer_range": float(m.init_std),
        "use_cache": True,
        "torch_dtype": dtype_name,  # transformers 4.x
        "dtype": dtype_name,  # transformers 5.x
    }
    if arch == "internlm2":
        hf.update(bias=bqkv is not None, attn_implementation="eager")
    else:
        hf.update(head_dim=h, attention_dropout=0.0)
        if arch == "llama":
            hf.update(attention_bias=biases is not None, mlp_bias=False)
        else:
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=n_layers)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(t, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
