"""Hugging Face <-> maxlm weight conversion: `from_hf(path)` and `to_hf(config, params, path)`.

Supported Hugging Face layouts (a `save_pretrained` folder: config.json + model.safetensors, or sharded
safetensors with `model.safetensors.index.json`):

* `LlamaForCausalLM` (MHA, GQA, MQA; optional `attention_bias` for q/k/v, whose o_proj bias must be zero;
  Llama 2, and Llama 3 / 3.1 / 3.2 with their `llama3` rope scaling and tied embeddings),
* `Qwen2ForCausalLM` (Llama plus biases on q, k and v; no sliding-window layers; Qwen2 and Qwen2.5),
* `Qwen3ForCausalLM` (QK-norm: `self_attn.{q,k}_norm.weight` [H], RMSNorm of each head's query and key
  before RoPE -> `layers/attn/{q,k}_norm/scale`; an explicit `head_dim`),
* `MistralForCausalLM` (Llama's tensors; its `sliding_window` -> `model.sliding_window`, null: none),
* the InternLM2 layout (`InternLM2ForCausalLM`, the remote-code model of internlm/internlm2-*): one fused
  `wqkv` projection, `wo`, `feed_forward.w1/w3/w2`, `tok_embeddings`, `output`,
* `MixtralForCausalLM` and `Qwen3MoeForCausalLM` (mixtures of experts, `maxlm/model/moe.py`): Mistral's /
  Qwen3's attention, and in every layer a router `gate.weight` [E, D] and E SwiGLU experts stored one tensor
  per expert (`experts.{j}.w1/w3/w2` for Mixtral, `experts.{j}.gate_proj/up_proj/down_proj` for Qwen3-MoE),
  stacked into `layers/moe/{gate,up,down}` [L, E, ...] and `layers/moe/router` [L, D, E]. Mixtral always
  renormalises the top-k weights; Qwen3-MoE when `norm_topk_prob`. Qwen3-MoE's dense layers
  (`mlp_only_layers`, `decoder_sparse_step` > 1) and Qwen2-MoE's shared experts are HFErrors.
* `Gemma3ForCausalLM` (Gemma 3 text, model_type `gemma3_text`; Gemma Team 2025, "Gemma 3 Technical Report"):
  Llama's projections plus QK-norm, a norm after attention and after the MLP too (four per layer), RMSNorms
  computing norm(x) * (1 + weight) with the zero-centred weights copied as they are (`model.norm_zero_centered`,
  so both directions are bit-exact), a GeGLU MLP (`hidden_activation` gelu_pytorch_tanh), embeddings times
  sqrt(hidden_size), logits scaled by `query_pre_attn_scalar`^-0.5, `final_logit_softcapping`, tied embeddings
  by default, and local sliding-window layers between global ones: `layer_types` (or the older
  `sliding_window_pattern`) -> `model.global_every`, `sliding_window`, the global layers' `rope_theta` /
  `rope_scaling` and the local ones' `rope_local_base_freq` (-> `model.local_rope_theta`), or transformers 5's
  per-layer-type `rope_parameters`. Its `attn_logit_softcapping` must be null: transformers' Gemma 3 ignores
  it. The multimodal `Gemma3ForConditionalGeneration`, Gemma 1 and Gemma 2 are HFErrors.

Rotary scaling: none (`rope_type` "default"), `linear` (position interpolation), `dynamic` (dynamic NTK),
`yarn` and `llama3`; anything else (longrope, ...) is an HFError, as is every other architecture. Both the legacy
config keys (`rope_theta`, `rope_scaling`; Gemma 3's `rope_local_base_freq`) and transformers 5's
`rope_parameters` are read; `to_hf` writes the legacy keys, which transformers 4.x and 5.x both read.

Weight layout. A torch `nn.Linear(in, out)` stores its weight as [out, in] and computes y = x W^T; maxlm
stores every matrix input-first with the head axes split out, so the einsums in `maxlm/model/decoder.py` read
directly (L = layers, leading axis of every `layers/...` leaf, stacked from HF's `model.layers.{i}`):

    maxlm leaf                  shape        HF tensor (per layer)             HF shape     mapping
    embedding                   [V, D]       model.embed_tokens.weight         [V, D]       identity
    layers/attn/q               [L, D, N, H] self_attn.q_proj.weight           [N*H, D]     view [N,H,D] -> (D,N,H)
    layers/attn/k, v            [L, D, K, H] self_attn.{k,v}_proj.weight       [K*H, D]     view [K,H,D] -> (D,K,H)
    layers/attn/{q,k,v}_bias    [L, N|K, H]  self_attn.{q,k,v}_proj.bias       [N*H | K*H]  view [N|K, H]
    layers/attn/o               [L, N, H, D] self_attn.o_proj.weight           [D, N*H]     view [D,N,H] -> (N,H,D)
    layers/attn/{q,k}_norm/scale [L, H]      self_attn.{q,k}_norm.weight       [H]          identity
    layers/attn_norm/scale      [L, D]       input_layernorm.weight            [D]          identity
    layers/mlp/gate, up         [L, D, F]    mlp.{gate,up}_proj.weight         [F, D]       transpose
    layers/mlp/down             [L, F, D]    mlp.down_proj.weight              [D, F]       transpose
    layers/mlp_norm/scale       [L, D]       post_attention_layernorm.weight   [D]          identity
    final_norm/scale            [D]          model.norm.weight                 [D]          identity
    lm_head (absent when tied)  [D, V]       lm_head.weight                    [V, D]       transpose

Gemma 3 names every leaf as Llama does but for its four norms per layer, where Gemma's
`post_attention_layernorm` is the norm on the attention output, not the pre-MLP one:

    layers/attn_norm/scale      [L, D]       input_layernorm.weight            [D]          identity
    layers/attn_post_norm/scale [L, D]       post_attention_layernorm.weight   [D]          identity
    layers/mlp_norm/scale       [L, D]       pre_feedforward_layernorm.weight  [D]          identity
    layers/mlp_post_norm/scale  [L, D]       post_feedforward_layernorm.weight [D]          identity

Query head n uses kv head n // G (G = N // K) in both codebases (HF `repeat_kv`), so no head permutation
is needed; the rotary embedding is the same "rotate half" layout, so q/k need no interleave either.

In the code these tables live once, in two parts that both directions use: `_HF_NAMES` (each layout's
tensor name for every maxlm leaf: the Llama, InternLM2 and Gemma 3 columns) and `_hf_layout` (every leaf's HF
shape, view and axis order).

InternLM2 names: tok_embeddings (embedding), attention.wqkv, attention.wo (o), attention_norm,
feed_forward.w1 (gate), w3 (up), w2 (down), ffn_norm, model.norm, output (lm_head). Its fused projection
`wqkv.weight` is [(K*(G+2))*H, D] and is viewed as [K, G+2, H, D]: for each kv head, its G query heads,
then one key head, then one value head (the remote code's `rearrange(.., "b q (h gs d) -> b q h gs d")`).
maxlm's `fused_qkv=True` keeps exactly that grouping, input-first: `layers/attn/wqkv` [L, D, K, G+2, H]
(and `bqkv` [L, K, G+2, H] from `wqkv.bias` when the config says `bias: true`; then `wo.bias` must be 0).

`from_hf` returns the full maxlm config (`default_config()` with the model fields set, compute dtype
float32) and float32 numpy parameters in exactly the tree `maxlm.model.init` builds (every leaf of
`maxlm.model.abstract_params` is read from its HF tensor(s), and the shapes are checked). `to_hf` writes
config.json + model.safetensors with the safetensors numpy API; torch is never imported by this module.
It picks Qwen3-MoE for a mixture of experts with `qk_norm` and Mixtral for one without, Gemma 3 when
`post_norms` or `norm_zero_centered`, Mistral when `sliding_window`, the InternLM2 layout
when `fused_qkv`, Qwen3 when `qk_norm`, Qwen2 when `qkv_bias`, else Llama, unless `architecture` says otherwise
(the fused and split q/k/v layouts are converted into each other as needed; a switch the target cannot carry,
such as a Gemma norm in a Llama export, is an HFError naming the model keys). An InternLM2
export has no remote code files (auto_map), so `AutoModelForCausalLM` loads it only after you add
InternLM2's modeling files; Llama and Qwen2 exports load directly. A `rope_scaling="ntk"` model (static
NTK-aware base scaling, which HF has no rope type for) is exported exactly as rope_theta * factor^(H / (H - 2))
with no scaling.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

import jax
import ml_collections
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy loader reads bf16)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from maxlm import config as config_lib
from maxlm.data import records
from maxlm.errors import UserError
from maxlm.model import decoder as model_lib
from maxlm.model import moe

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_MOE = ("mixtral", "qwen3_moe")
_BY_CLASS = {v.lower(): k for k, v in _ARCHITECTURES.items()}
# config.json's model_type where it is not maxlm's architecture name (Gemma3ForCausalLM is the text-only model
# "gemma3_text"; "gemma3" is the multimodal Gemma3ForConditionalGeneration).
_MODEL_TYPES = {"gemma3": "gemma3_text"}
_BY_MODEL_TYPE = {_MODEL_TYPES.get(k, k): k for k in _ARCHITECTURES}


INDEX = "model.safetensors.index.json"  # a sharded checkpoint's tensor -> file map


class HFError(UserError):
    """A Hugging Face folder, config or architecture maxlm cannot convert: one line naming what and where."""


# ----------------------------------------------------------------------------------------------------------
# The mapping, one table for names and one for shapes, used by both from_hf and to_hf


# The tensor-name layouts, the columns of `_HF_NAMES`; an architecture not named in `_LAYOUT_OF` uses Llama's.
_LAYOUTS = ("llama", "internlm2", "gemma3")
_LAYOUT_OF = {"internlm2": "internlm2", "gemma3": "gemma3"}

# maxlm leaf -> its HF tensor in (the Llama / Qwen2 / Qwen3 / Mistral layout, the InternLM2 layout, the Gemma 3
# layout), None where that layout has no such tensor. Names of `layers/...` leaves are per layer, under
# "model.layers.{i}." (see `_hf_names`). `layers/attn/o_bias` is not a maxlm leaf (maxlm has no output-projection
# bias): it is only checked to be zero on reading, and written as zeros where the layout's bias flag puts a bias
# on o as well. Gemma's `post_attention_layernorm` is the norm on the attention output (maxlm's attn_post_norm),
# not the pre-MLP norm that Llama's of the same name is.
_HF_NAMES: dict[str, tuple[str | None, str | None, str | None]] = {
    "embedding": ("model.embed_tokens.weight", "model.tok_embeddings.weight", "model.embed_tokens.weight"),
    "layers/attn/q": ("self_attn.q_proj.weight", None, "self_attn.q_proj.weight"),
    "layers/attn/k": ("self_attn.k_proj.weight", None, "self_attn.k_proj.weight"),
    "layers/attn/v": ("self_attn.v_proj.weight", None, "self_attn.v_proj.weight"),
    "layers/attn/q_bias": ("self_attn.q_proj.bias", None, "self_attn.q_proj.bias"),
    "layers/attn/k_bias": ("self_attn.k_proj.bias", None, "self_attn.k_proj.bias"),
    "layers/attn/v_bias": ("self_attn.v_proj.bias", None, "self_attn.v_proj.bias"),
    "layers/attn/wqkv": (None, "attention.wqkv.weight", None),
    "layers/attn/bqkv": (None, "attention.wqkv.bias", None),
    "layers/attn/o": ("self_attn.o_proj.weight", "attention.wo.weight", "self_attn.o_proj.weight"),
    "layers/attn/o_bias": ("self_attn.o_proj.bias", "attention.wo.bias", "self_attn.o_proj.bias"),
    "layers/attn/q_norm/scale": ("self_attn.q_norm.weight", None, "self_attn.q_norm.weight"),
    "layers/attn/k_norm/scale": ("self_attn.k_norm.weight", None, "self_attn.k_norm.weight"),
    "layers/attn_norm/scale": ("input_layernorm.weight", "attention_norm.weight", "input_layernorm.weight"),
    "layers/attn_post_norm/scale": (None, None, "post_attention_layernorm.weight"),
    "layers/mlp/gate": ("mlp.gate_proj.weight", "feed_forward.w1.weight", "mlp.gate_proj.weight"),
    "layers/mlp/up": ("mlp.up_proj.weight", "feed_forward.w3.weight", "mlp.up_proj.weight"),
    "layers/mlp/down": ("mlp.down_proj.weight", "feed_forward.w2.weight", "mlp.down_proj.weight"),
    "layers/mlp_norm/scale": ("post_attention_layernorm.weight", "ffn_norm.weight", "pre_feedforward_layernorm.weight"),
    "layers/mlp_post_norm/scale": (None, None, "post_feedforward_layernorm.weight"),
    "final_norm/scale": ("model.norm.weight", "model.norm.weight", "model.norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight", "lm_head.weight"),
}


# The mixture-of-experts leaves (in place of layers/mlp/*): the router, and per expert j its three matrices.
_MOE_NAMES: dict[str, dict[str, str]] = {
    "mixtral": {"layers/moe/router": "block_sparse_moe.gate.weight",
                "layers/moe/gate": "block_sparse_moe.experts.{j}.w1.weight",
                "layers/moe/up": "block_sparse_moe.experts.{j}.w3.weight",
                "layers/moe/down": "block_sparse_moe.experts.{j}.w2.weight"},
    "qwen3_moe": {"layers/moe/router": "mlp.gate.weight",
                  "layers/moe/gate": "mlp.experts.{j}.gate_proj.weight",
                  "layers/moe/up": "mlp.experts.{j}.up_proj.weight",
                  "layers/moe/down": "mlp.experts.{j}.down_proj.weight"},
}


def _hf_names(arch: str) -> dict[str, str]:
    """maxlm leaf -> HF tensor name in `arch`'s layout; per-layer names are templates with "{i}" for the layer
    (and "{j}" for the expert)."""
    column = _LAYOUTS.index(_LAYOUT_OF.get(arch, "llama"))
    names = {leaf: names[column] for leaf, names in _HF_NAMES.items() if names[column] is not None}
    if arch in _MOE:
        names = {k: v for k, v in names.items() if not k.startswith("layers/mlp/")} | _MOE_NAMES[arch]
    return {leaf: ("model.layers.{i}." + name if leaf.startswith("layers/") else name) for leaf, name in names.items()}


_Layout = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _hf_layout(m: ml_collections.ConfigDict) -> dict[str, _Layout]:
    """maxlm leaf -> (HF shape, view, axes), for one layer of a `layers/...` leaf (one expert of an expert leaf).

    maxlm = hf.reshape(view).transpose(axes) and hf = maxlm.transpose(argsort(axes)).reshape(HF shape): the
    "mapping" column of the module docstring's table. Same for every layout (a layout lacking a leaf never
    asks for it).
    """
    n, kv, h, d = m.num_heads, m.num_kv_heads, config_lib.head_dim(m), m.d_model
    f, vocab = m.mlp_dim, m.vocab_size
    e, fe = m.num_experts, moe.expert_dim(m)
    s = n // kv + 2  # InternLM2's wqkv group per kv head: its G query heads, one key head, one value head
    return {
        "embedding":              ((vocab, d),      (vocab, d),      (0, 1)),
        "layers/attn/q":          ((n * h, d),      (n, h, d),       (2, 0, 1)),
        "layers/attn/k":          ((kv * h, d),     (kv, h, d),      (2, 0, 1)),
        "layers/attn/v":          ((kv * h, d),     (kv, h, d),      (2, 0, 1)),
        "layers/attn/q_bias":     ((n * h,),        (n, h),          (0, 1)),
        "layers/attn/k_bias":     ((kv * h,),       (kv, h),         (0, 1)),
        "layers/attn/v_bias":     ((kv * h,),       (kv, h),         (0, 1)),
        "layers/attn/wqkv":       ((kv * s * h, d), (kv, s, h, d),   (3, 0, 1, 2)),
        "layers/attn/bqkv":       ((kv * s * h,),   (kv, s, h),      (0, 1, 2)),
        "layers/attn/o":          ((d, n * h),      (d, n, h),       (1, 2, 0)),
        "layers/attn/o_bias":     ((d,),            (d,),            (0,)),
        "layers/attn/q_norm/scale": ((h,),          (h,),            (0,)),
        "layers/attn/k_norm/scale": ((h,),          (h,),            (0,)),
        "layers/attn_norm/scale": ((d,),            (d,),            (0,)),
        "layers/attn_post_norm/scale": ((d,),       (d,),            (0,)),
        "layers/mlp/gate":        ((f, d),          (f, d),          (1, 0)),
        "layers/mlp/up":          ((f, d),          (f, d),          (1, 0)),
        "layers/mlp/down":        ((d, f),          (d, f),          (1, 0)),
        "layers/moe/router":      ((e, d),          (e, d),          (1, 0)),
        "layers/moe/gate":        ((fe, d),         (fe, d),         (1, 0)),  # per expert
        "layers/moe/up":          ((fe, d),         (fe, d),         (1, 0)),
        "layers/moe/down":        ((d, fe),         (d, fe),         (1, 0)),
        "layers/mlp_norm/scale":  ((d,),            (d,),            (0,)),
        "layers/mlp_post_norm/scale": ((d,),        (d,),            (0,)),
        "final_norm/scale":       ((d,),            (d,),            (0,)),
        "lm_head":                ((vocab, d),      (vocab, d),      (1, 0)),
    }


def _from_hf_layout(x: np.ndarray, layout: _Layout) -> np.ndarray:
    _, view, axes = layout
    return x.reshape(view).transpose(axes)


def _to_hf_layout(x: np.ndarray, layout: _Layout) -> np.ndarray:
    shape, _, axes = layout
    return x.transpose(np.argsort(axes)).reshape(shape)


def _leaf_name(path: tuple) -> str:
    """A parameter tree path -> the leaf name the tables use, e.g. "layers/attn/q"."""
    return "/".join(key.key for key in path)


# ----------------------------------------------------------------------------------------------------------
# Reading


def _resolve(path: str) -> tuple[str, list[str]]:
    """A HF folder or one .safetensors file -> (folder holding config.json, safetensors files to read)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise HFError(f"{path}: expected a Hugging Face folder or a .safetensors file")
        return os.path.dirname(path), [path]
    if not os.path.isdir(path):
        raise HFError(f"{path}: no such folder or file")
    index = os.path.join(path, INDEX)
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
        raise HFError(f"{path}: no .safetensors weights (pytorch .bin checkpoints are not supported; "
                      "re-save with safe_serialization=True)")
    raise HFError(f"{path}: {len(files)} .safetensors files but no model.safetensors.index.json")


def _open(name: str):
    """A safetensors file for reading with pread(2) where this safetensors has it (0.8+): memory-mapped
    reads would leave every page read mapped, so the process's resident memory would grow by the whole
    checkpoint even though each tensor is dropped once placed."""
    try:
        return safe_open(name, framework="np", backend="pread")
    except TypeError:
        return safe_open(name, framework="np")


class _LazyTensors:
    """The tensors of one checkpoint's safetensors files, read one at a time when asked for.

    Acts as the mapping `from_hf` consumes (`in`, `pop`, `[]`, iteration over the names not yet popped),
    but holds only the files' headers: a tensor's bytes are read by `pop` / `[]`, so a host reading a
    multi-file checkpoint never holds more than the tensor in hand (plus what it keeps). `shape(name)`
    comes from the header, so a wrong shape is reported before anything is read.
    """

    def __init__(self, files: list[str]):
        self._handles = [_open(name) for name in files]
        self._where: dict[str, Any] = {}
        for handle in self._handles:
            for key in handle.keys():
                self._where[key] = handle

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self):
        return iter(list(self._where))

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def pop(self, key: str, *default: Any) -> np.ndarray | None:
        if key not in self._where and default:
            return default[0]
        x = self[key]
        del self._where[key]
        return x


def _architecture(hf: dict) -> str:
    names = list(hf.get("architectures") or [])
    for name in names:
        if name.lower() in _BY_CLASS:
            return _BY_CLASS[name.lower()]
    model_type = str(hf.get("model_type", "")).lower()
    if not names and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    if model_type.startswith("gemma") or any(name.lower().startswith("gemma") for name in names):
        raise HFError(f"unsupported Gemma variant {names or model_type!r}: maxlm.convert reads the text-only "
                      "Gemma3ForCausalLM (model_type gemma3_text), not Gemma 1 / 2 or the multimodal "
                      "Gemma3ForConditionalGeneration")
    raise HFError(f"unsupported architecture {names or model_type!r}: maxlm.convert reads "
                  f"{sorted(_ARCHITECTURES.values())}")


def _rope_from_hf(hf: dict) -> dict[str, Any]:
    """The model.* rope fields (and max_seq_len) from legacy rope_theta/rope_scaling or v5 rope_parameters."""
    theta = hf.get("rope_theta")
    scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        if params and all(isinstance(v, dict) for v in params.values()):
            raise HFError(f"per-layer-type rope_parameters are not supported: {params}")
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling = params
    theta = 10000.0 if theta is None else float(theta)
    max_pos = int(hf.get("max_position_embeddings") or 2048)
    out = {"model.rope_theta": theta, "model.rope_scaling": "none", "model.rope_factor": 1.0,
           "model.max_seq_len": max_pos}
    rope_type = "default"
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return out
    if rope_type not in ("linear", "dynamic", "yarn", "llama3"):
        raise HFError(f"unsupported rope type {rope_type!r} (rope scaling {scaling}); maxlm.convert supports "
                      "'default', 'linear', 'dynamic', 'yarn' and 'llama3'")
    if not scaling.get("factor"):
        raise HFError(f"{rope_type} rope scaling without a factor: {scaling}")
    factor = float(scaling["factor"])
    out.update({"model.rope_scaling": rope_type, "model.rope_factor": factor})
    if rope_type == "dynamic":  # grows past max_position_embeddings: allow factor x that many positions
        out.update({"model.rope_original_max_len": max_pos, "model.max_seq_len": int(max_pos * factor)})
    elif rope_type == "llama3":
        missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if scaling.get(k) is None]
        if missing:
            raise HFError(f"llama3 rope scaling without {', '.join(missing)}: {scaling}")
        out.update({"model.rope_original_max_len": int(scaling["original_max_position_embeddings"]),
                    "model.rope_low_freq_factor": float(scaling["low_freq_factor"]),
                    "model.rope_high_freq_factor": float(scaling["high_freq_factor"])})
    elif rope_type == "yarn":
        if scaling.get("truncate", True) is False:
            raise HFError("yarn rope scaling with truncate=False is not supported")
        attention = scaling.get("attention_factor")
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if attention is None and mscale and mscale_all:  # DeepSeek's form
            attention = (0.1 * mscale * math.log(factor) + 1.0) / (0.1 * mscale_all * math.log(factor) + 1.0)
        out.update({"model.rope_original_max_len": int(scaling.get("original_max_position_embeddings") or max_pos),
                    "model.rope_beta_fast": float(scaling.get("beta_fast") or 32.0),
                    "model.rope_beta_slow": float(scaling.get("beta_slow") or 1.0),
                    "model.rope_attention_factor": float(attention or 0.0)})
    return out


_GEMMA3_LAYER_TYPES = ("sliding_attention", "full_attention")


def _gemma3_from_hf(hf: dict, n_layers: int) -> dict[str, Any]:
    """The model.* fields of a Gemma3ForCausalLM config.json (Gemma Team 2025, "Gemma 3 Technical Report"):
    the Gemma switches, the local/global layers and the two RoPE bases, with Gemma3TextConfig's defaults.

    Layers: `layer_types`, or the older `sliding_window_pattern` P (layer i global when (i + 1) % P == 0,
    default 6), which must be one repeating pattern -> model.global_every. RoPE: transformers 5's per-layer-type
    `rope_parameters` {"full_attention": .., "sliding_attention": ..} or the legacy `rope_theta` (global),
    `rope_local_base_freq` (local) and `rope_scaling` (global layers only); the local layers must be unscaled.
    """
    if hf.get("use_bidirectional_attention"):
        raise HFError("use_bidirectional_attention=True is not supported: maxlm's decoder is causal")
    if hf.get("attn_logit_softcapping") is not None:
        raise HFError(f"attn_logit_softcapping={hf['attn_logit_softcapping']} in a Gemma 3 config: transformers' "
                      "Gemma3ForCausalLM ignores it (Gemma 3 has QK-norm instead), so which attention the weights "
                      "expect is unclear; set it to null to read the model as transformers runs it")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise HFError(f"unsupported Gemma 3 hidden_activation {act!r}: maxlm's GeGLU is gelu_pytorch_tanh")
    types = hf.get("layer_types")
    if types is None:
        pattern = int(hf.get("sliding_window_pattern") or 6)
        types = [_GEMMA3_LAYER_TYPES[(i + 1) % pattern == 0] for i in range(n_layers)]
    if len(types) != n_layers or not set(types) <= set(_GEMMA3_LAYER_TYPES):
        raise HFError(f"layer_types must be {n_layers} of {list(_GEMMA3_LAYER_TYPES)}, got {types}")
    local = [t == "sliding_attention" for t in types]
    every = local.index(False) + 1 if any(local) and not all(local) else 0
    if any(local) and local != [not (every and (i + 1) % every == 0) for i in range(n_layers)]:
        raise HFError(f"layer_types {types} do not repeat one pattern of local layers then a global one, which is "
                      "what maxlm's model.global_every expresses")
    window = int(hf.get("sliding_window", 4096) or 0) if any(local) else 0
    if any(local) and not window:
        raise HFError("layer_types has sliding_attention layers but sliding_window is null")

    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        full, sliding = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full, sliding = {}, {}
    if hf.get("rope_scaling"):  # what Gemma3TextConfig does with a legacy rope_scaling: the global layers' scaling
        full.update(hf["rope_scaling"])
    if sliding.get("rope_type", "default") != "default":
        raise HFError(f"scaled RoPE in the sliding-window layers is not supported: {sliding}")
    theta = full.get("rope_theta") or hf.get("rope_theta") or 1_000_000.0
    local_theta = sliding.get("rope_theta") or hf.get("rope_local_base_freq") or 10_000.0
    rope = _rope_from_hf({"rope_theta": theta, "rope_scaling": full or None,
                          "max_position_embeddings": hf.get("max_position_embeddings") or 131_072})
    return {
        **rope,
        "model.qk_norm": True,
        "model.sliding_window": window,
        "model.global_every": every,
        "model.local_rope_theta": float(local_theta) if any(local) else 0.0,
        "model.norm_zero_centered": True,
        "model.post_norms": True,
        "model.mlp_activation": "gelu_tanh",
        "model.scale_embeddings": True,
        "model.query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar") or 256),
        "model.final_logit_softcap": float(hf.get("final_logit_softcapping") or 0.0),
    }


def _require_zero(tensors: dict, key: str, why: str) -> None:
    if key in tensors and np.any(np.asarray(tensors[key], np.float32) != 0):
        raise HFError(f"{key} is non-zero but maxlm has no {why}")


def _moe_from_hf(hf: dict, arch: str) -> dict[str, Any]:
    """The model.* mixture-of-experts fields of a Mixtral / Qwen3-MoE config.json."""
    experts, k = hf.get("num_local_experts") or hf.get("num_experts"), hf.get("num_experts_per_tok")
    if not experts or not k:
        raise HFError(f"{_ARCHITECTURES[arch]} config.json lacks num_local_experts / num_experts_per_tok")
    out = {"model.num_experts": int(experts), "model.experts_per_token": int(k),
           "model.router_aux_coef": float(hf.get("router_aux_loss_coef") or 0.0), "model.router_renormalize": True}
    if arch == "qwen3_moe":
        if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step") or 1) != 1:
            raise HFError("Qwen3-MoE dense layers (mlp_only_layers, decoder_sparse_step > 1) are not supported: "
                          "every maxlm mixture-of-experts layer is sparse")
        if hf.get("moe_intermediate_size") is None:
            raise HFError("Qwen3MoeForCausalLM config.json lacks moe_intermediate_size")
        out.update({"model.router_renormalize": bool(hf.get("norm_topk_prob", False)),
                    "model.expert_mlp_dim": int(hf["moe_intermediate_size"])})
    return out


_REQUIRED_HF_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def from_hf(path: str, *, dtype: Any = np.float32, shardings: Any = None
            ) -> tuple[ml_collections.ConfigDict, dict]:
    """Read a HF Llama / Qwen2 / Qwen3 / Mistral / Mixtral / Qwen3-MoE / InternLM2 / Gemma 3 (text) checkpoint ->
    (full maxlm config, params).

    Tensors are read lazily, one at a time (`_LazyTensors`), converted to `dtype` (float32 by default; the
    config's `model.param_dtype` says which) and written into the parameter tree, so the host's peak memory is
    the tree itself plus one tensor, never the files' contents on top.

    `shardings`: where the parameters go -- a pytree of `jax.sharding.Sharding` shaped like the parameter
    tree, or a callable `config -> such a tree` (the config is known only once config.json is read, e.g.
    `lambda c: trainer_shardings(c)`). Each leaf is then read, placed with `jax.make_array_from_callback`
    (every device receives only its shard) and dropped from the host before the next: the host holds one
    leaf at a time, never the model. Returns jax.Arrays then, numpy arrays otherwise.
    """
    dtype = np.dtype(dtype)
    folder, files = _resolve(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise HFError(f"{folder}: no config.json next to the weights")
    hf = records.read_json_object(config_path, HFError)
    missing = [k for k in _REQUIRED_HF_KEYS if hf.get(k) is None]
    if missing:
        raise HFError(f"{config_path} lacks {', '.join(missing)}")
    arch = _architecture(hf)
    act = hf.get("hidden_act", "silu")
    if arch != "gemma3" and act not in ("silu", "swish"):
        raise HFError(f"unsupported hidden_act {act!r}: maxlm's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise HFError("mlp_bias=True is not supported: maxlm's MLP has no biases")
    if arch in ("qwen2", "qwen3", "qwen3_moe"):
        layer_types = hf.get("layer_types")
        sliding = (any(t != "full_attention" for t in layer_types) if layer_types
                   else hf.get("use_sliding_window", False)
                   and hf.get("max_window_layers", 0) < hf["num_hidden_layers"])
        if sliding:
            raise HFError(f"{_ARCHITECTURES[arch]} sliding-window attention layers are not supported by maxlm")

    n_layers = int(hf["num_hidden_layers"])
    d = int(hf["hidden_size"])
    n = int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or n)
    h = int(hf.get("head_dim") or (256 if arch == "gemma3" else d // n)) if arch != "internlm2" else d // n
    gemma = _gemma3_from_hf(hf, n_layers) if arch == "gemma3" else {}
    rope = {} if gemma else _rope_from_hf(hf)

    tensors = _LazyTensors(files)
    names = _hf_names(arch)
    fused = "layers/attn/wqkv" in names  # the InternLM2 layout
    qkv_bias = names["layers/attn/bqkv" if fused else "layers/attn/q_bias"].format(i=0) in tensors
    qk_norm = arch in ("qwen3", "qwen3_moe")
    window = int(hf.get("sliding_window") or 0) if arch in ("mistral", "mixtral") else 0
    tie = bool(hf.get("tie_word_embeddings", arch == "gemma3" or names["lm_head"] not in tensors))
    if not tie and names["lm_head"] not in tensors:
        raise HFError(f"{path}: tie_word_embeddings is false but there is no {names['lm_head']}")

    config = config_lib.override(config_lib.default_config(), **{
        "model.vocab_size": int(hf["vocab_size"]),
        "model.num_layers": n_layers,
        "model.d_model": d,
        "model.num_heads": n,
        "model.num_kv_heads": kv,
        "model.head_dim": h,
        "model.mlp_dim": int(hf["intermediate_size"]),
        **rope,
        "model.norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "model.tie_embeddings": tie,
        "model.qkv_bias": qkv_bias,
        "model.qk_norm": qk_norm,
        "model.sliding_window": window,
        "model.fused_qkv": fused,
        "model.init_std": float(hf.get("initializer_range", 0.02)),
        "model.param_dtype": dtype.name,
        "model.compute_dtype": "float32",
        **gemma,
        **(_moe_from_hf(hf, arch) if arch in _MOE else {}),
    })
    config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
    config_lib.validate(config)

    for i in range(n_layers):
        o_bias = names["layers/attn/o_bias"].format(i=i)
        _require_zero(tensors, o_bias, "output-projection bias")
        tensors.pop(o_bias, None)
    if tie:
        tensors.pop(names["lm_head"], None)  # some tied checkpoints store the (identical) head anyway

    layout = _hf_layout(config.model)

    def get(key: str, leaf: str) -> np.ndarray:
        # The shape the config implies, checked (from the file's header) before anything is read: a
        # transposed or mis-sized tensor has the right element count often enough (gate_proj [F, D] vs
        # [D, F]) to load silently otherwise.
        if key not in tensors:
            raise HFError(f"{path}: missing tensor {key!r} for {_ARCHITECTURES[arch]}")
        expected = tuple(layout[leaf][0])
        if tensors.shape(key) != expected:
            raise HFError(f"{path}: tensor {key} has shape {list(tensors.shape(key))}, expected {list(expected)} "
                          "from config.json")
        return _from_hf_layout(tensors.pop(key), layout[leaf])

    def read(leaf_path: tuple, like: jax.ShapeDtypeStruct) -> np.ndarray:
        leaf = _leaf_name(leaf_path)
        if not leaf.startswith("layers/"):
            return np.ascontiguousarray(get(names[leaf], leaf), dtype)
        out = np.empty(like.shape, dtype)  # filled layer by layer: no list of L arrays to stack
        for i in range(n_layers):
            if "{j}" in names[leaf]:  # one tensor per expert
                for j in range(like.shape[1]):
                    out[i, j] = get(names[leaf].format(i=i, j=j), leaf)
            else:
                out[i] = get(names[leaf].format(i=i), leaf)
        return out

    # Every leaf `maxlm.model.init` builds for this config (q/k/v or wqkv, biases, lm_head unless tied), in
    # the order of the tree; with shardings, each leaf goes to its devices before the next is read.
    abstract = model_lib.abstract_params(config)
    if shardings is None:
        params = jax.tree_util.tree_map_with_path(read, abstract)
    else:
        if callable(shardings):
            shardings = shardings(config)

        def place(leaf_path: tuple, like: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding) -> jax.Array:
            host = read(leaf_path, like)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        params = jax.tree_util.tree_map_with_path(place, abstract, shardings)
    leftover = sorted(k for k in tensors if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise HFError(f"{path}: tensors not understood by the {_ARCHITECTURES[arch]} mapping: {leftover[:8]}"
                      + (" ..." if len(leftover) > 8 else ""))
    _check_tree(config, params, f"from_hf({path})")
    return config, params


def _check_tree(config: ml_collections.ConfigDict, params: dict, where: str) -> None:
    """Same tree structure and leaf shapes as `maxlm.model.init(config)` would produce."""
    expected = model_lib.abstract_params(config)
    exp_paths = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    got_paths = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if exp_paths.keys() != got_paths.keys():
        raise HFError(f"{where}: parameter tree mismatch; missing {sorted(exp_paths.keys() - got_paths.keys())}, "
                      f"unexpected {sorted(got_paths.keys() - exp_paths.keys())}")
    bad = {k: (got_paths[k], exp_paths[k]) for k in exp_paths if tuple(exp_paths[k]) != got_paths[k]}
    if bad:
        raise HFError(f"{where}: shape mismatch (got, expected): {bad}")


# ----------------------------------------------------------------------------------------------------------
# Writing


def _normalize_arch(architecture: str | None, m: ml_collections.ConfigDict) -> str:
    if architecture is None:
        if m.num_experts:
            return "qwen3_moe" if m.qk_norm else "mixtral"
        if m.post_norms or m.norm_zero_centered:
            return "gemma3"
        if m.sliding_window:
            return "mistral"
        return "internlm2" if m.fused_qkv else "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias else "llama"
    key = architecture.lower()
    if key in _ARCHITECTURES:
        return key
    if key in _BY_CLASS:
        return _BY_CLASS[key]
    raise HFError(f"unsupported architecture {architecture!r}; choose one of "
                  f"{sorted(_ARCHITECTURES)} or {sorted(_ARCHITECTURES.values())}")


def _gemma_only(m: ml_collections.ConfigDict) -> list[str]:
    """The model switches set in `m` that only the Gemma 3 layout carries."""
    h = config_lib.head_dim(m)
    return [f"model.{key}" for key, on in (
        ("norm_zero_centered", m.norm_zero_centered), ("post_norms", m.post_norms),
        ("mlp_activation", m.mlp_activation != "silu"), ("scale_embeddings", m.scale_embeddings),
        ("query_pre_attn_scalar", m.query_pre_attn_scalar not in (0, h)), ("global_every", m.global_every),
        ("local_rope_theta", m.local_rope_theta), ("final_logit_softcap", m.final_logit_softcap)) if on]


def _gemma_needs(m: ml_collections.ConfigDict) -> list[str]:
    """The model switches Gemma 3 always has that `m` lacks."""
    return [f"model.{key}" for key, on in (
        ("norm_zero_centered", m.norm_zero_centered), ("post_norms", m.post_norms),
        ("mlp_activation=gelu_tanh", m.mlp_activation == "gelu_tanh"), ("scale_embeddings", m.scale_embeddings),
        ("qk_norm", m.qk_norm)) if not on]


def _number(x: float) -> int | float:
    """An integral float as an int (Gemma3TextConfig types query_pre_attn_scalar as int)."""
    return int(x) if float(x).is_integer() else float(x)


def _fuse_qkv(a: dict, n_layers: int, d: int, kv: int, g: int, h: int) -> dict:
    """Split q/k/v (+ q/k/v biases) -> the InternLM2 grouping wqkv [L, D, K, G+2, H] (+ bqkv [L, K, G+2, H])."""
    fused = {"wqkv": np.concatenate([a["q"].reshape(n_layers, d, kv, g, h), a["k"][:, :, :, None],
                                     a["v"][:, :, :, None]], axis=3)}
    if "q_bias" in a:
        fused["bqkv"] = np.concatenate([a["q_bias"].reshape(n_layers, kv, g, h), a["k_bias"][:, :, None],
                                        a["v_bias"][:, :, None]], axis=2)
    return fused


def _split_qkv(a: dict, n_layers: int, d: int, n: int, g: int, h: int) -> dict:
    """The inverse of `_fuse_qkv`: wqkv (+ bqkv) -> q/k/v (+ q/k/v biases)."""
    w = a["wqkv"]
    split = {"q": w[:, :, :, :g].reshape(n_layers, d, n, h), "k": w[:, :, :, g], "v": w[:, :, :, g + 1]}
    if "bqkv" in a:
        b = a["bqkv"]
        split.update(q_bias=b[:, :, :g].reshape(n_layers, n, h), k_bias=b[:, :, g], v_bias=b[:, :, g + 1])
    return split


def to_hf(config: ml_collections.ConfigDict, params: dict, path: str, architecture: str | None = None, *,
          dtype: Any = None, max_shard_size: int | str = "5GB") -> None:
    """Write `path`/config.json + the weights for Llama, Qwen2, Qwen3, Mistral, Gemma 3 (text)
    or the InternLM2 layout.

    `dtype`: the weights' dtype on disk (default: the parameters' own; "bfloat16" is what open checkpoints
    ship). Weights over `max_shard_size` (transformers' default, 5GB) are split into shards with an index,
    as `save_pretrained` does.
    """
    m = model_lib.model_config(config)
    arch = _normalize_arch(architecture, m)
    _check_tree(config, params, "to_hf")
    n_layers, d, n, kv = m.num_layers, m.d_model, m.num_heads, m.num_kv_heads
    h, g = config_lib.head_dim(m), m.num_heads // m.num_kv_heads

    theta, rope_scaling, max_pos = float(m.rope_theta), None, m.max_seq_len
    if m.rope_scaling in ("linear", "dynamic", "yarn", "llama3"):
        rope_scaling = {"rope_type": m.rope_scaling, "type": m.rope_scaling, "factor": float(m.rope_factor)}
    if m.rope_scaling == "dynamic":  # HF grows past max_position_embeddings, maxlm past rope_original_max_len
        max_pos = m.rope_original_max_len or m.max_seq_len
    elif m.rope_scaling == "yarn":
        rope_scaling.update({"original_max_position_embeddings": m.rope_original_max_len or m.max_seq_len,
                             "beta_fast": float(m.rope_beta_fast), "beta_slow": float(m.rope_beta_slow)})
        if m.rope_attention_factor:
            rope_scaling["attention_factor"] = float(m.rope_attention_factor)
    elif m.rope_scaling == "llama3":
        rope_scaling.update({"original_max_position_embeddings": m.rope_original_max_len or m.max_seq_len,
                             "low_freq_factor": float(m.rope_low_freq_factor),
                             "high_freq_factor": float(m.rope_high_freq_factor)})
    elif m.rope_scaling == "ntk":
        theta = theta * m.rope_factor ** (h / (h - 2))  # exactly what maxlm.attention.rope computes
    elif m.rope_scaling not in ("none", "linear"):
        raise HFError(f"unsupported rope_scaling {m.rope_scaling!r}")
    if arch == "gemma3" and _gemma_needs(m):
        raise HFError(f"Gemma3ForCausalLM needs {', '.join(_gemma_needs(m))}, which this model lacks")
    if m.attn_logit_softcap:
        raise HFError(f"model.attn_logit_softcap={m.attn_logit_softcap}: no architecture maxlm exports soft-caps "
                      "attention logits (transformers' Gemma3ForCausalLM ignores attn_logit_softcapping)")
    if arch != "gemma3" and _gemma_only(m):
        raise HFError(f"{_ARCHITECTURES[arch]} has no {', '.join(_gemma_only(m))} (set in this model); export as "
                      "gemma3")
    if bool(m.num_experts) != (arch in _MOE):
        raise HFError(f"{_ARCHITECTURES[arch]} is {'a mixture of experts' if arch in _MOE else 'dense'} and this "
                      f"model {'is not' if arch in _MOE else 'is'} (model.num_experts={m.num_experts}); export as "
                      f"{'mixtral or qwen3_moe' if m.num_experts else 'a dense architecture'}")
    if arch != "gemma3" and m.qk_norm != (arch in ("qwen3", "qwen3_moe")):
        raise HFError(f"{_ARCHITECTURES[arch]} {'has no' if m.qk_norm else 'needs'} QK-norm, and this model "
                      f"{'has' if m.qk_norm else 'has none'} (model.qk_norm={m.qk_norm}); export as "
                      f"{('qwen3_moe' if m.num_experts else 'qwen3') if m.qk_norm else 'llama, qwen2 or mixtral'}")
    if arch == "mixtral" and not m.router_renormalize:
        raise HFError("MixtralForCausalLM always renormalises the top-k router weights; this model has "
                      "model.router_renormalize=False (export as qwen3_moe: norm_topk_prob)")
    if m.sliding_window and arch not in ("mistral", "mixtral", "gemma3"):
        raise HFError(f"model.sliding_window={m.sliding_window}: only the mistral, mixtral and gemma3 architectures "
                      "carry one here")
    local = model_lib.local_layers(m)
    if arch == "gemma3" and any(local) and not m.local_rope_theta and m.rope_scaling not in ("none", "ntk"):
        raise HFError(f"Gemma3ForCausalLM's sliding-window layers have unscaled RoPE, but this model's use "
                      f"rope_scaling={m.rope_scaling!r} (model.local_rope_theta=0); set model.local_rope_theta")
    if arch in ("mistral", "mixtral") and (m.qkv_bias or m.qk_norm or m.fused_qkv):
        raise HFError(f"{_ARCHITECTURES[arch]} has no q/k/v biases, QK-norm or fused wqkv")
    if arch == "internlm2" and h * n != d:
        raise HFError(f"the InternLM2 layout needs head_dim * num_heads == d_model, got {h} * {n} != {d}")

    names, layout = _hf_names(arch), _hf_layout(m)
    p = jax.tree_util.tree_map(np.asarray, params)
    dtype = np.dtype(dtype or p["embedding"].dtype)
    # Bring the attention weights into the layout the target needs (fused <-> split q/k/v) ...
    a = p["layers"]["attn"]
    if "layers/attn/wqkv" in names and "wqkv" not in a:
        a = {"o": a["o"], **_fuse_qkv(a, n_layers, d, kv, g, h)}
    elif "layers/attn/wqkv" not in names and "wqkv" in a:
        a = {"o": a["o"], **_split_qkv(a, n_layers, d, n, g, h)}
    # ... and add the zero biases it expects: Qwen2 always has q/k/v biases, while Llama's attention_bias and
    # InternLM2's bias put one on the output projection as well.
    has_bias = "q_bias" in a or "bqkv" in a
    zeros = lambda *shape: np.zeros(shape, a["o"].dtype)
    if arch == "qwen2" and not has_bias:
        a = {**a, "q_bias": zeros(n_layers, n, h), "k_bias": zeros(n_layers, kv, h), "v_bias": zeros(n_layers, kv, h)}
    elif arch != "qwen2" and has_bias:
        a = {**a, "o_bias": zeros(n_layers, d)}
    p = {**p, "layers": {**p["layers"], "attn": a}}

    def hf_tensors():  # (HF name, tensor in the export dtype), one at a time, in the tree's order
        for leaf_path, x in jax.tree_util.tree_leaves_with_path(p):
            leaf = _leaf_name(leaf_path)
            if leaf.startswith("layers/") and "{j}" in names[leaf]:  # one tensor per expert
                for i in range(n_layers):
                    for j in range(x.shape[1]):
                        yield names[leaf].format(i=i, j=j), _to_hf_layout(x[i, j], layout[leaf])
            elif leaf.startswith("layers/"):
                for i in range(n_layers):
                    yield names[leaf].format(i=i), _to_hf_layout(x[i], layout[leaf])
            else:
                yield names[leaf], _to_hf_layout(x, layout[leaf])


    dtype_name = np.dtype(dtype).name
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": _MODEL_TYPES.get(arch, arch),
        "vocab_size": m.vocab_size,
        "hidden_size": d,
        "intermediate_size": m.mlp_dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n,
        "num_key_value_heads": kv,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
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
        hf.update(bias=has_bias, attn_implementation="eager")
    else:
        hf.update(head_dim=h, attention_dropout=0.0)
        if arch in ("llama", "qwen3", "qwen3_moe"):
            hf.update(attention_bias=has_bias, mlp_bias=False)
        if arch in ("mistral", "mixtral"):
            hf.update(sliding_window=m.sliding_window or None)
        if arch in ("qwen2", "qwen3", "qwen3_moe"):
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=n_layers)
        if arch in _MOE:
            hf.update(num_experts_per_tok=m.experts_per_token, router_aux_loss_coef=float(m.router_aux_coef),
                      output_router_logits=False)
        if arch == "mixtral":  # its experts' hidden size is intermediate_size
            hf.update(num_local_experts=m.num_experts, intermediate_size=moe.expert_dim(m),
                      router_jitter_noise=0.0)
        if arch == "qwen3_moe":
            hf.update(num_experts=m.num_experts, moe_intermediate_size=moe.expert_dim(m),
                      norm_topk_prob=bool(m.router_renormalize), decoder_sparse_step=1, mlp_only_layers=[])
        if arch == "gemma3":
            del hf["hidden_act"]
            # sliding_window_pattern: the same layers for transformers releases that predate layer_types. Without
            # local layers, sliding_window is max_pos: transformers builds the sliding mask even then (unused).
            pattern = m.global_every if m.global_every and not all(local) else n_layers + 1 if all(local) else 1
            hf.update(hidden_activation="gelu_pytorch_tanh", attention_bias=has_bias,
                      query_pre_attn_scalar=_number(m.query_pre_attn_scalar or h),
                      sliding_window=m.sliding_window or max_pos, sliding_window_pattern=pattern,
                      layer_types=["sliding_attention" if x else "full_attention" for x in local],
                      rope_local_base_freq=float(m.local_rope_theta or theta),
                      attn_logit_softcapping=None, final_logit_softcapping=float(m.final_logit_softcap) or None,
                      use_bidirectional_attention=False)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
    _write_safetensors(((k, np.ascontiguousarray(x, dtype)) for k, x in hf_tensors()), path,
                       _parse_size(max_shard_size))


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB" (transformers' `max_shard_size` form)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[:-len(unit)]) * scale)
            except ValueError:
                break
    raise HFError(f"max_shard_size {size!r}: expected bytes or a size such as '5GB' or '500MB'")


def _write_safetensors(tensors: Any, path: str, max_shard_bytes: int) -> None:
    """Write (name, array) pairs as `model.safetensors`, or, past `max_shard_bytes`, as
    `model-0000i-of-0000N.safetensors` shards with `model.safetensors.index.json` -- the layout of
    transformers' `save_pretrained`, which `from_pretrained` and `from_hf` both read.

    Each shard is written as soon as it is full, so at most one shard's tensors are held beyond `params`.
    Weight files of an earlier export in `path` are removed first: a stale `model.safetensors` beside a new
    index would be read instead of it.
    """
    for stale in glob.glob(os.path.join(path, "model*.safetensors")) + [os.path.join(path, INDEX)]:
        if os.path.exists(stale):
            os.remove(stale)
    written: list[tuple[str, list[str]]] = []  # (temporary file, its tensor names)
    current: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        name = os.path.join(path, f".shard-{len(written):05d}.safetensors")
        save_file(current, name, metadata={"format": "pt"})
        written.append((name, list(current)))

    for key, x in tensors:
        if current and size + x.nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[key] = x
        size += x.nbytes
        total += x.nbytes
    if current or not written:
        flush()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for i, (name, keys) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(name, os.path.join(path, final))
        weight_map.update({key: final for key in keys})
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
