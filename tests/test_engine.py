"""maxlm.inference.engine: continuous batching against the static sampler, transformers and full forward passes."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import config as config_lib
from maxlm.inference.engine import Engine, SamplingParams
from maxlm.model import decoder as model
from maxlm.model import sampler
from maxlm.model.sampler import SampleError
from tests.helpers import ROOT, random_params

VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def _exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def small_config(**overrides):
    return config_lib.validate(config_lib.override(config_lib.default_config(), **{
        "model.vocab_size": VOCAB, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.mlp_dim": 128, "model.num_layers": 2, "model.max_seq_len": 96, "model.compute_dtype": "float32",
        "data.seq_len": 64, **overrides}))


@pytest.fixture(scope="module")
def tiny():
    config = small_config()
    params = jax.tree.map(jnp.asarray, random_params(model.abstract_params(config), 0, 0.2))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones_like(x) if jax.tree_util.keystr(p).endswith("['scale']") else x, params)
    return config, params


def _prompts(n, seed=0, low=1, high=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, int(rng.integers(low, high))).tolist() for _ in range(n)]


@pytest.mark.parametrize("schedule", [dict(prefill_rows=2), dict(prefill_rows=4, refill_at=2, prefill_block=2)])
def test_greedy_with_refills_and_chunks_equals_the_static_sampler(tiny, schedule):
    """10 ragged requests through 3 slots (so slots are refilled mid-run), prompts in up to 3 chunks of 16,
    mixed per-request settings (repetition penalty on some), under two schedules (refill as soon as a slot
    frees, one decode step per prefill; or wait for two and interleave two): each reply equals
    `sampler.generate` on that prompt alone."""
    config, params = tiny
    prompts = _prompts(10)
    lengths = [3, 17, 1, 30, 8, 12, 25, 5, 40, 2]
    penalties = [1.0, 1.3] * 5
    engine = Engine(config, params, slots=3, chunk=16, block=4, **schedule)
    done = engine.generate(prompts, [SamplingParams(max_tokens=n, temperature=0, repetition_penalty=r)
                                     for n, r in zip(lengths, penalties)])
    assert engine.steps["prefill"] >= 6 and max(len(p) for p in prompts) > 32
    for req, prompt, n, r in zip(done, prompts, lengths, penalties):
        want = sampler.generate(config, params, [prompt], max_new_tokens=n, greedy=True, repetition_penalty=r)[0]
        assert req.tokens == want and req.finish_reason == "length"
        assert req.first_token is not None and req.finished >= req.first_token


def test_greedy_equals_transformers(tmp_path):
    """A transformers Llama read by `from_hf`, three prompts through two slots: token for token."""
    import torch

    from maxlm.interop.hf import from_hf
    from tests.helpers import build_hf

    hf_model = build_hf("LlamaForCausalLM", seed=4, num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1,
                        eos_token_id=None, pad_token_id=0)
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = from_hf(str(tmp_path))
    prompts = [[1, 17, 200, 45, 3, 99, 150], [1, 5], [1] + list(range(30, 60))]
    engine = Engine(config, params, slots=2, chunk=16, block=8, max_len=64)
    done = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0))
    for req, prompt in zip(done, prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                    min_new_tokens=20, eos_token_id=None, pad_token_id=0)
        assert req.tokens == out[0, len(prompt):].tolist()


def test_gemma3_windowed_layers_equal_the_static_sampler(tmp_path):
    """Local (6-token window) and global layers mixed: the per-row decode mask applies the window per slot."""
    config = small_config(**{"model.sliding_window": 6, "model.global_every": 2, "model.num_layers": 3,
                             "model.qk_norm": True, "model.local_rope_theta": 1000.0})
    params = jax.tree.map(jnp.asarray, random_params(model.abstract_params(config), 5, 0.2))
    prompts = _prompts(4, seed=5, low=3, high=30)
    done = Engine(config, params, slots=2, chunk=16).generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    for req, prompt in zip(done, prompts):
        assert req.tokens == sampler.generate(config, params, [prompt], max_new_tokens=12, greedy=True)[0]


def test_logprobs_are_the_full_forward_pass_log_softmax(tiny):
    """Sampled (temperature 0.8, top-k 5) replies with logprobs=3: each token's log-prob and the top 3
    alternatives equal log_softmax of one uncached forward pass over prompt + reply; every sampled token is
    among the 5 most likely."""
    config, params = tiny
    prompts = _prompts(4, seed=1)
    done = Engine(config, params, slots=2, chunk=16).generate(
        prompts, SamplingParams(max_tokens=10, temperature=0.8, top_k=5, seed=3, logprobs=3))
    for req, prompt in zip(done, prompts):
        seq = jnp.asarray([prompt + req.tokens])
        lp = np.asarray(jax.nn.log_softmax(model.apply(config, params, seq)[0], axis=-1))
        steps = lp[len(prompt) - 1:len(prompt) - 1 + len(req.tokens)]
        np.testing.assert_allclose(req.logprobs, steps[np.arange(len(req.tokens)), req.tokens], atol=1e-4)
        for row, top, token in zip(steps, req.top_logprobs, req.tokens):
            order = np.argsort(-row)
            assert [t for t, _ in top] == order[:3].tolist()
            np.testing.assert_allclose([v for _, v in top], row[order[:3]], atol=1e-4)
            assert token in order[:5]


def test_a_seeded_request_does_not_depend_on_its_neighbours(tiny):
    config, params = tiny
    prompt = _prompts(1, seed=2)[0]
    mine = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=11)
    alone = Engine(config, params, slots=1).generate([prompt], mine)[0].tokens
    crowd = _prompts(5, seed=3)
    others = [SamplingParams(max_tokens=n, temperature=t, top_k=k) for n, t, k in
              [(3, 0.5, 0), (20, 0, 0), (7, 1.5, 4), (1, 1.0, 0), (9, 0.7, 2)]]
    mixed = Engine(config, params, slots=3, block=2).generate(crowd[:2] + [prompt] + crowd[2:],
                                                              others[:2] + [mine] + others[2:])
    assert mixed[2].tokens == alone and len(set(alone)) > 3
    other_seed = Engine(config, params, slots=1).generate([prompt], SamplingParams(
        max_tokens=15, temperature=1.0, top_p=0.9, seed=12))[0].tokens
    assert other_seed != alone


def test_stop_ids_eos_and_stop_strings(tiny):
    """The first greedy token used as eos ends the reply at once (excluded, reason "stop"); a later token as
    a stop id cuts there; a stop string cuts the text and stops; ignore_eos runs to max_tokens."""
    config, params = tiny
    prompt = _prompts(1, seed=4)[0]
    free = sampler.generate(config, params, [prompt], max_new_tokens=12, greedy=True)[0]
    third = free[2]
    cut = free.index(third)
    letters = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    engine = Engine(config, params, slots=2, eos_id=free[0], detokenize=letters)
    eos, stop_id, stop_str, ignored = engine.generate([prompt] * 4, [
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=(third,)),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(letters(free[3:5]),)),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)])
    assert (eos.tokens, eos.finish_reason, eos.stop_reason) == ([], "stop", free[0])
    assert (stop_id.tokens, stop_id.finish_reason, stop_id.stop_reason) == (free[:cut], "stop", third)
    assert stop_str.finish_reason == "stop" and stop_str.text == letters(free)[:letters(free).find(letters(free[3:5]))]
    assert (ignored.tokens, ignored.finish_reason) == (free, "length")


def test_streaming_updates_and_cancel(tiny):
    config, params = tiny
    seen = []
    engine = Engine(config, params, slots=2, block=3)
    prompts = _prompts(3, seed=6)
    a = engine.submit(prompts[0], SamplingParams(max_tokens=20, temperature=0),
                      on_update=lambda r: seen.append((len(r.tokens), r.done)))
    b = engine.submit(prompts[1], SamplingParams(max_tokens=40, temperature=0))
    c = engine.submit(prompts[2], SamplingParams(max_tokens=40, temperature=0))
    engine.step()
    engine.step()
    engine.cancel(b)
    engine.cancel(c)  # still queued behind two busy slots
    engine.run()
    assert seen[-1] == (20, True) and len(seen) > 3 and [n for n, _ in seen] == sorted(n for n, _ in seen)
    assert b.finish_reason == c.finish_reason == "cancelled" and c.tokens == [] and 0 < len(b.tokens) < 40
    assert engine.idle and sorted(engine.free) == [0, 1]
    again = engine.generate([prompts[0]], SamplingParams(max_tokens=20, temperature=0))[0]
    assert again.tokens == a.tokens  # a freed (and cancelled) slot serves the next request correctly


@pytest.mark.parametrize("bad, message", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=[VOCAB]), "outside"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=94), "exceeds the context length"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop=("x",)), "detokenize"),
    (dict(logprobs=9), "logprobs"),
    (dict(stop_token_ids=tuple(range(9))), "stop token ids"),
])
def test_bad_requests_are_refused_before_queueing(tiny, bad, message):
    config, params = tiny
    engine = Engine(config, params, slots=1)
    prompt = bad.pop("prompt", [1, 2, 3])
    with pytest.raises(SampleError, match=message):
        engine.submit(prompt, SamplingParams(**bad))
    assert engine.idle


MESH_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from maxlm import config as config_lib
from maxlm.inference.engine import Engine, SamplingParams
from maxlm.model import decoder as model
from maxlm.training import sharding
c = config_lib.validate(config_lib.override(config_lib.default_config(), **{
    "model.vocab_size": 256, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.mlp_dim": 128, "model.num_layers": 2, "model.max_seq_len": 96, "model.compute_dtype": "float32",
    "model.init_std": 0.2, "data.seq_len": 64, "mesh.data": 4, "mesh.tensor": 2}))
params = model.init(c, jax.random.key(0))
rng = np.random.default_rng(0)
prompts = [rng.integers(1, 256, int(rng.integers(2, 40))).tolist() for _ in range(6)]
sp = [SamplingParams(max_tokens=int(n), temperature=t, seed=1) for n, t in zip(rng.integers(2, 20, 6), [0, 0.8] * 3)]
one = Engine(c, params, slots=4, chunk=16).generate(prompts, sp)
mesh = sharding.make_mesh(c)
eng = Engine(c, params, slots=4, chunk=16, mesh=mesh)
assert eng.params["layers"]["attn"]["q"].sharding.spec != jax.sharding.PartitionSpec()
assert eng.state["cache"]["k"].sharding.shard_shape(eng.state["cache"]["k"].shape)[3] == 1
eight = eng.generate(prompts, sp)
print("SAME", [a.tokens for a in one] == [b.tokens for b in eight])
"""


def test_tensor_parallel_engine_equals_one_device():
    """On 8 CPU devices (data 4 x tensor 2): weights split over heads and MLP, the cache's kv heads over
    `tensor`; greedy and seeded-sampled replies equal the single-device engine's."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MESH_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SAME True" in proc.stdout


def test_sampled_first_tokens_follow_the_softmax(tiny):
    """400 seeded one-token requests on one prompt at temperature 1.5 with top-k 8: the empirical token
    frequencies match softmax(logits / 1.5) renormalised over the 8 most likely (a total-variation distance
    under 0.1; sampling from the wrong distribution, or ignoring a filter, lands far above it)."""
    config, params = tiny
    prompt = _prompts(1, seed=5)[0]
    done = Engine(config, params, slots=8).generate([prompt] * 400, [
        SamplingParams(max_tokens=1, temperature=1.5, top_k=8, seed=s) for s in range(400)])
    logits = np.asarray(model.apply(config, params, jnp.asarray([prompt]))[0, -1], np.float64) / 1.5
    top = np.argsort(-logits)[:8]
    p = np.exp(logits[top] - logits[top].max())
    p /= p.sum()
    counts = np.bincount([r.tokens[0] for r in done], minlength=VOCAB)
    assert counts[top].sum() == 400
    assert 0.5 * np.abs(counts[top] / 400 - p).sum() < 0.1
