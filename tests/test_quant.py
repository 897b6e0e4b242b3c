"""Weight-only quantisation (maxlm/model/quant.py), QLoRA and optimizer offload, against numpy written here.

The oracle: symmetric absmax scaling as the module docstring states it -- a scale per output channel (int8)
or per group of `g` consecutive input elements (int4), scale = absmax / (qmax + 1/2), q = clip(round(w /
scale), -qmax - 1, qmax) -- computed with numpy on the weight's own axes, not through Qwix.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import config as C
from maxlm.errors import ConfigError
from maxlm.interop import pretrained
from maxlm.model import decoder, lora, quant, trees
from tests.helpers import ROOT


def _numpy_quant(w: np.ndarray, contract: tuple[int, ...], bits: int, group: int = 0, dequantize: bool = True):
    """Per-channel absmax over `contract` (group 0) or groups of `group` along the last contracting axis (each
    other contracting element its own scale), in float64: the dequantised weight, or (w / scale, scale), both
    shaped like w."""
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(w, np.float64)
    if not group:
        scale = np.broadcast_to(np.max(np.abs(w), axis=contract, keepdims=True) / (qmax + 0.5), w.shape)
    else:
        axis = contract[-1]
        moved = np.moveaxis(w, axis, -1)
        grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // group, group)
        scale = np.broadcast_to(np.max(np.abs(grouped), axis=-1, keepdims=True) / (qmax + 0.5), grouped.shape)
        scale = np.moveaxis(scale.reshape(moved.shape), -1, axis)
    if not dequantize:
        return w / scale, scale
    return np.clip(np.round(w / scale), -qmax - 1, qmax) * scale


def _broadcast_scale(qw) -> np.ndarray:
    scale = np.asarray(qw.scale)
    for axis, (n, m) in enumerate(zip(qw.qvalue.shape, scale.shape)):
        scale = np.repeat(scale, n // m, axis=axis)
    return scale


@pytest.fixture(scope="module")
def cfg():
    return C.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))


@pytest.fixture(scope="module")
def params(cfg):
    return decoder.init(cfg, jax.random.key(0))


# (path, contracting axes of the stacked weight [L, ...]) -- the layouts the docstring names.
_WEIGHTS = [(("layers", "attn", "q"), (1,)), (("layers", "attn", "o"), (1, 2)), (("layers", "mlp", "down"), (1,)),
            (("embedding",), (1,))]


@pytest.mark.parametrize("mode,bits,group", [("int8", 8, 0), ("int4", 4, 32)])
def test_quantize_matches_numpy(cfg, params, mode, bits, group):
    q = quant.quantize(params, decoder.logical_axes(cfg), mode, group_size=32)
    for path, contract in _WEIGHTS:
        w, qw = params, q
        for k in path:
            w, qw = w[k], qw[k]
        assert quant.is_quantized(qw) and qw.qvalue.dtype == jnp.dtype(mode)
        ratio, scale = _numpy_quant(np.asarray(w), contract, bits, group, dequantize=False)
        np.testing.assert_allclose(_broadcast_scale(qw), scale, rtol=1e-6)
        # Each integer is w / scale rounded half to even, within the range; a value within float32 noise of
        # a half (the absmax element sits at qmax + 1/2 by construction) may round either way.
        got = np.asarray(qw.qvalue, np.int32)
        qmax = 2 ** (bits - 1) - 1
        want = np.clip(np.round(ratio), -qmax - 1, qmax)
        tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
        assert np.all((got == want) | (tie & (np.abs(got - want) == 1))), mode
        assert np.mean(got == want) > 0.95
    # Norm scales stay float, untouched.
    assert q["final_norm"]["scale"] is params["final_norm"]["scale"]


def test_logits_and_bytes(cfg, params):
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.model.vocab_size)
    ref = np.asarray(decoder.apply(cfg, params, tokens))
    float_bytes = quant.weight_bytes(params)
    errors = {}
    for mode in ("int8", "int4"):
        q = quant.quantize(params, decoder.logical_axes(cfg), mode)
        out = np.asarray(jax.jit(lambda p, t: decoder.apply(cfg, p, t))(q, tokens))
        errors[mode] = np.abs(out - ref).max() / np.abs(ref).max()
        ratio = quant.weight_bytes(q) / float_bytes
        assert ratio <= {"int8": 0.30, "int4": 0.17}[mode], (mode, ratio)
        # The bytes claimed are the bytes XLA holds: the compiled forward's arguments (int4 packed).
        compiled = jax.jit(lambda p: decoder.apply(cfg, p, tokens)).lower(q).compile()
        assert compiled.memory_analysis().argument_size_in_bytes == pytest.approx(quant.weight_bytes(q), rel=0.01)
    assert errors["int8"] < 0.03 and errors["int4"] < 0.4 and errors["int8"] < errors["int4"] / 4, errors


def test_bad_mode_and_group_size(cfg, params):
    with pytest.raises(ConfigError, match="quant"):
        quant.quantize(params, decoder.logical_axes(cfg), "int3")
    with pytest.raises(ConfigError, match="group size"):
        quant.quantize(params, decoder.logical_axes(cfg), "int4", group_size=48)
    with pytest.raises(ConfigError, match="lora.base_quant"):
        C.validate(C.override(cfg, **{"lora.base_quant": "int4"}))  # no adapters to train
    with pytest.raises(ConfigError, match="lora.base_quant"):
        C.validate(C.override(cfg, **{"lora.rank": 4, "lora.base_quant": "fp4"}))


def test_qlora_merge_is_lora_on_the_dequantised_base(cfg, params):
    """QLoRA's forward and gradient equal plain LoRA's on the base dequantised up front (a plain float tree;
    the integers themselves are checked against numpy above)."""
    c = C.override(cfg, **{"lora.rank": 4, "lora.targets": ("q", "o", "down"), "lora.base_quant": "int4",
                           "lora.token_ids": (3, 7)})
    adapters = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape),
                            lora.init(c, jax.random.key(1)))
    qbase = trees.prepare(c, trees.lora_base(c), params)
    assert jax.tree.structure(jax.eval_shape(lambda: qbase)) == jax.tree.structure(trees.abstract(c, "lm_quant"))
    dense = quant.dense(qbase, jnp.float32)  # every weight dequantised: a plain float tree
    assert not quant.any_quantized(dense) and quant.any_quantized(qbase)
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, cfg.model.vocab_size)

    def loss(base, a):
        return jnp.mean(decoder.apply(c, lora.merge(c, base, a), tokens) ** 2)

    got, got_grad = jax.value_and_grad(loss, argnums=1)(qbase, adapters)
    want, want_grad = jax.value_and_grad(loss, argnums=1)(dense, adapters)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(g, w, rtol=2e-3, atol=1e-6)


def _sft_config(base, **extra):
    c = C.load_config_file(os.path.join(ROOT, "configs", "sft_tiny.py"))
    return C.override(c, **{
        "sft.base": base, "sft.tasks": ("sort",), "sft.task_train_size": 30, "sft.task_eval_size": 8,
        "sft.eval_items": 0, "data.seq_len": 192, "data.batch_size": 4, "train.num_steps": 3, "train.log_every": 1,
        "train.eval_every": 0, "checkpoint.every_steps": 3, "optim.warmup_steps": 1, "lora.rank": 4, **extra})


def test_qlora_sft_holds_the_base_in_int4_and_exports_what_it_trained(hf_base, tmp_path):
    from maxlm.posttrain import sft

    work = str(tmp_path / "qlora")
    history = sft.finetune(_sft_config(hf_base, **{"lora.base_quant": "int4", "lora.base_quant_group_size": 8}), work)
    assert np.isfinite(history[-1]["loss"])
    memory = json.load(open(os.path.join(work, "memory.json")))
    _, base, _ = pretrained.load_base(hf_base)
    # Half a byte per weight + a float32 scale per 8 (this base's head_dim): 1 byte in 4, plus the norms.
    assert memory["frozen_base"] < 0.27 * quant.weight_bytes(base)
    # The exported model is the adapters merged into the int4 base: its logits are the trained model's.
    config, merged, _ = pretrained.load_workdir(work)
    assert not quant.any_quantized(merged)
    from maxlm.training import checkpoint

    _, adapters, _ = checkpoint.load_latest(work)
    base = pretrained.resize_vocab(base, config.model.vocab_size, seed=config.train.seed)
    qbase = trees.prepare(config, "lm_quant", base)
    tokens = np.arange(12, dtype=np.int32)[None] % config.model.vocab_size
    trained = decoder.apply(config, lora.merge(config, qbase, adapters), tokens)
    np.testing.assert_allclose(decoder.apply(config, merged, tokens), trained, rtol=1e-4, atol=1e-5)


def test_evaluate_with_quant_reports_weight_bytes(hf_base, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps({"text": "def f(x):\n    return x * 2\n" * 4}) for _ in range(3)) + "\n")
    summaries = {}
    for mode in ("", "int8"):
        done = subprocess.run([sys.executable, "-m", "maxlm.evaluate", f"--hf={hf_base}", "--task=ppl",
                               f"--data={data}", f"--out={tmp_path / ('ev' + mode)}", f"--quant={mode}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        summaries[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert summaries[""]["quant"] == "none" and summaries["int8"]["quant"] == "int8"
    assert summaries["int8"]["weight_bytes"] < 0.3 * summaries[""]["weight_bytes"]
    assert summaries["int8"]["ppl"] == pytest.approx(summaries[""]["ppl"], rel=0.01)
    done = subprocess.run([sys.executable, "-m", "maxlm.evaluate", f"--hf={hf_base}", "--task=ppl", f"--data={data}",
                           f"--out={tmp_path / 'bad'}", "--quant=int4", "--quant_group_size=5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "group size" in done.stderr and "Traceback" not in done.stderr


def test_optimizer_offload_trains_as_without_and_keeps_adamw_in_host_memory():
    """Three steps with `optim.offload` equal three without (XLA:CPU has a pinned_host memory kind too);
    a backend without one is refused naming the key."""
    import types

    from maxlm.training import pretrain, sharding

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 200, (4, 33)).astype(np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.tile(np.arange(32, dtype=np.int32), (4, 1)), "segment_ids": np.ones((4, 32), np.int32),
             "loss_weights": np.ones((4, 32), np.float32)}
    losses = {}
    for offload in (False, True):
        c = C.override(C.load_config_file(os.path.join(ROOT, "configs", "tiny.py")), **{
            "optim.offload": offload, "mesh.data": 1, "data.batch_size": 4, "data.seq_len": 32,
            "optim.warmup_steps": 1})
        trainer = pretrain.Trainer(c)
        state = trainer.init_state(jax.random.key(0))
        kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state["opt_state"])}
        assert kinds == ({sharding.HOST_MEMORY} if offload else {"device"})
        batch = trainer.device_batch(local)
        trainer.compile(state, batch)
        losses[offload] = []
        for _ in range(3):
            state, metrics = trainer.step(state, batch)
            losses[offload].append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)
    assert losses[True][2] < losses[True][0]

    class NoHost:
        platform = "metal"

        def addressable_memories(self):
            return [types.SimpleNamespace(kind="device")]

    with pytest.raises(ConfigError, match="optim.offload.*no 'pinned_host'"):
        sharding.in_host_memory({}, types.SimpleNamespace(devices=np.array([NoHost()])))


def test_engine_generates_from_quantised_weights_as_from_their_dequantised_copy(cfg, params):
    """The generation engine (sample, serve) keeps a quantised tree's integers and dequantises in the step:
    greedy tokens equal those of the same weights dequantised up front, and prompt log-probs agree."""
    from maxlm.inference import engine as engine_lib

    prompts = [[5, 17, 40, 99], [7, 8]]
    q = quant.quantize(params, decoder.logical_axes(cfg), "int4")
    got = engine_lib.generate(cfg, q, prompts, max_new_tokens=6, greedy=True, slots=2)
    want = engine_lib.generate(cfg, quant.dense(q, jnp.float32), prompts, max_new_tokens=6, greedy=True, slots=2)
    assert got == want and all(len(t) == 6 for t in got)
    quantised, dense = (engine_lib.Engine(cfg, p, slots=2) for p in (q, quant.dense(q, jnp.float32)))
    assert quant.any_quantized(quantised.params)
    np.testing.assert_allclose(quantised.prompt_logprobs(prompts[0])[0], dense.prompt_logprobs(prompts[0])[0],
                               rtol=1e-4, atol=1e-5)
