"""maxlm.sample: greedy decoding against Hugging Face, batching, the KV cache, and the logits processors."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import config as config_lib
from maxlm.model import decoder as model, sampler as sample

VOCAB, D, N, K, F, L = 256, 64, 4, 2, 128, 2
MAX_NEW = 32


@pytest.fixture(autouse=True, scope="module")
def _exact_matmuls():
    """float32 matmuls at full precision on accelerators too (TF32 would break the 1e-5 comparisons)."""
    with jax.default_matmul_precision("highest"):
        yield


def small_config(**overrides):
    c = config_lib.override(config_lib.default_config(), **{
        "model.vocab_size": VOCAB, "model.d_model": D, "model.num_heads": N, "model.num_kv_heads": K,
        "model.mlp_dim": F, "model.num_layers": L, "model.max_seq_len": 128, "model.compute_dtype": "float32",
        "model.param_dtype": "float32", "model.norm_eps": 1e-6, "model.rope_theta": 10000.0, "data.seq_len": 64,
        **overrides})
    return config_lib.validate(c)


def hf_to_maxlm(hf_model) -> dict:
    """A Hugging Face LlamaForCausalLM's weights in maxlm's layout (kept local: no dependency on convert.py)."""
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    h = D // N

    def stack(fmt, fn):
        return jnp.asarray(np.stack([fn(sd[fmt.format(i)]) for i in range(L)]))

    pre = "model.layers.{}."
    return {
        "embedding": jnp.asarray(sd["model.embed_tokens.weight"]),
        "final_norm": {"scale": jnp.asarray(sd["model.norm.weight"])},
        "lm_head": jnp.asarray(sd["lm_head.weight"].T),
        "layers": {
            "attn": {
                "q": stack(pre + "self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, h)),
                "k": stack(pre + "self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, h)),
                "v": stack(pre + "self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, h)),
                "o": stack(pre + "self_attn.o_proj.weight", lambda w: w.T.reshape(N, h, D)),
            },
            "attn_norm": {"scale": stack(pre + "input_layernorm.weight", lambda w: w)},
            "mlp_norm": {"scale": stack(pre + "post_attention_layernorm.weight", lambda w: w)},
            "mlp": {
                "gate": stack(pre + "mlp.gate_proj.weight", lambda w: w.T),
                "up": stack(pre + "mlp.up_proj.weight", lambda w: w.T),
                "down": stack(pre + "mlp.down_proj.weight", lambda w: w.T),
            },
        },
    }


@pytest.fixture(scope="module")
def hf():
    """(hf_model, config, params): a random GQA Llama and the same weights as maxlm params."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=N,
        num_key_value_heads=K, max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0,
        attn_implementation="eager")
    hf_model = transformers.LlamaForCausalLM(hf_config).float().eval()
    config = small_config()
    params = hf_to_maxlm(hf_model)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), params, model.abstract_params(config))
    return hf_model, config, params


@pytest.fixture(scope="module")
def random_model():
    """A maxlm-only random model (normal(0.2) matrices, unit norms), built from shapes without model.init."""
    config = small_config()
    rng = np.random.default_rng(1)

    def leaf(path, s):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0.0, 0.2, s.shape).astype(s.dtype))

    return config, jax.tree_util.tree_map_with_path(leaf, model.abstract_params(config))


def hf_greedy(hf_model, prompt, max_new_tokens, **kwargs):
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


PROMPT = [1, 17, 200, 45, 3, 99, 150]


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_matches_hugging_face(hf, repetition_penalty):
    hf_model, config, params = hf
    expected = hf_greedy(hf_model, PROMPT, MAX_NEW, repetition_penalty=repetition_penalty)
    assert len(expected) == MAX_NEW and len(set(expected)) > 4  # a non-degenerate continuation
    got = sample.generate(config, params, [PROMPT], max_new_tokens=MAX_NEW, greedy=True,
                          repetition_penalty=repetition_penalty)
    assert got == [expected]


def test_sliding_window_decoding_matches_hugging_face_mistral(tmp_path):
    """A Mistral with a 6-token window, read by `from_hf`: greedy decoding through the KV cache (the window
    over cache slots, left-padded batch rows included) equals transformers' generate token for token."""
    from maxlm.interop.hf import from_hf
    from tests.helpers import build_hf

    hf_model = build_hf("MistralForCausalLM", seed=2, num_key_value_heads=2, sliding_window=6, vocab_size=VOCAB,
                        bos_token_id=1, eos_token_id=None, pad_token_id=0)
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = from_hf(str(tmp_path))
    assert config.model.sliding_window == 6
    expected = hf_greedy(hf_model, PROMPT, 20)
    assert sample.generate(config, params, [PROMPT], max_new_tokens=20, greedy=True) == [expected]
    longer = PROMPT + [7, 8, 9, 10, 11]
    batched = sample.generate(config, params, [PROMPT, longer], max_new_tokens=20, greedy=True)
    assert batched == [expected, hf_greedy(hf_model, longer, 20)]


def test_gemma3_decoding_matches_hugging_face(tmp_path):
    """Gemma 3 (Gemma Team 2025) read by `from_hf`: local layers with a 6-token window and their own RoPE base
    between global ones, through the KV cache -- prefill and one-token steps, left-padded batch rows included
    -- against transformers' generate (its hybrid sliding/full cache), token for token; and the cached
    logits equal to a full forward pass of each row."""
    from maxlm.interop.hf import from_hf
    from tests.helpers import build_hf

    hf_model = build_hf("Gemma3ForCausalLM", seed=3, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                        sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        query_pre_attn_scalar=24, vocab_size=VOCAB, bos_token_id=1, eos_token_id=None,
                        pad_token_id=0)
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = from_hf(str(tmp_path))
    assert (config.model.sliding_window, config.model.global_every) == (6, 2)
    expected = hf_greedy(hf_model, PROMPT, 20)
    longer = PROMPT + [7, 8, 9, 10, 11]
    batched = sample.generate(config, params, [PROMPT, longer], max_new_tokens=20, greedy=True)
    assert batched == [expected, hf_greedy(hf_model, longer, 20)]
    _check_cache_against_full_forward(config, params)


def test_batch_of_different_lengths_equals_each_alone(hf):
    _, config, params = hf
    rng = np.random.default_rng(0)
    # All within one length bucket (16), so the single-prompt runs reuse the program compiled above.
    prompts = [PROMPT, [1] + rng.integers(2, VOCAB, 10).tolist(), [1] + rng.integers(2, VOCAB, 15).tolist()]
    batched = sample.generate(config, params, prompts, max_new_tokens=MAX_NEW, greedy=True,
                              repetition_penalty=1.3)
    for prompt, row in zip(prompts, batched):
        alone = sample.generate(config, params, [prompt], max_new_tokens=MAX_NEW, greedy=True,
                                repetition_penalty=1.3)[0]
        assert row == alone


def test_kv_cache_matches_full_forward(random_model):
    _check_cache_against_full_forward(*random_model)


def _check_cache_against_full_forward(config, params):
    """Two left-padded prompts prefilled, then four one-token steps: every logit equals an uncached forward
    pass of the row from position 0."""
    vocab = config.model.vocab_size
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, vocab, 5).tolist(), rng.integers(0, vocab, 9).tolist()]
    steps = rng.integers(0, vocab, (2, 4))
    padded = 12
    decode = jax.jit(lambda tok, cache, pos, seg: model.decode(config, params, tok, cache, positions=pos,
                                                                 segment_ids=seg))
    tokens, positions, segment_ids = sample.left_pad(prompts, padded)
    cache = model.init_cache(config, 2, padded + steps.shape[1])
    logits, cache = decode(jnp.asarray(tokens), cache, jnp.asarray(positions), jnp.asarray(segment_ids))
    per_row = [[logits[i, padded - len(p):]] for i, p in enumerate(prompts)]
    for s in range(steps.shape[1]):
        pos = np.array([[len(p) + s] for p in prompts], np.int32)
        step_logits, cache = decode(jnp.asarray(steps[:, s:s + 1]), cache, jnp.asarray(pos),
                                    jnp.ones((2, 1), jnp.int32))
        for i in range(2):
            per_row[i].append(step_logits[i])
    assert int(cache["index"]) == padded + steps.shape[1]
    # The reference: each row unpadded from position 0 (right padding is invisible to causal attention).
    full_rows = [p + steps[i].tolist() for i, p in enumerate(prompts)]
    width = max(map(len, full_rows))
    full_tokens = np.zeros((2, width), np.int32)
    full_segments = np.zeros((2, width), np.int32)
    for i, row in enumerate(full_rows):
        full_tokens[i, :len(row)] = row
        full_segments[i, :len(row)] = 1
    full = jax.jit(lambda tok, seg: model.apply(config, params, tok, segment_ids=seg))(
        jnp.asarray(full_tokens), jnp.asarray(full_segments))
    for i, row in enumerate(full_rows):
        np.testing.assert_allclose(np.concatenate(per_row[i]), full[i, :len(row)], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Logits processors against a direct numpy transcription of Hugging Face's definitions.


def np_process(logits, seen, *, temperature, top_k, top_p, repetition_penalty):
    x = logits.astype(np.float64).copy()
    pen = np.where(x > 0, x / repetition_penalty, x * repetition_penalty)
    x = np.where(seen, pen, x)
    x = x / temperature
    if top_k > 0:
        for row in x:
            kth = np.sort(row)[::-1][min(top_k, row.size) - 1]
            row[row < kth] = -np.inf
    if top_p < 1.0:
        for row in x:
            order = np.argsort(-row, kind="stable")
            p = np.exp(row[order] - row[order[0]])
            p /= p.sum()
            above = np.cumsum(p) - p
            keep = above < top_p
            keep[0] = True
            row[order[~keep]] = -np.inf
    return x


FIXED = np.random.default_rng(2).normal(0.0, 2.0, (4, 40)).astype(np.float32)
SEEN = np.random.default_rng(3).random((4, 40)) < 0.2
CASES = [
    dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=5, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=0, top_p=0.8, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.5),
    dict(temperature=1.3, top_k=10, top_p=0.6, repetition_penalty=1.2),
    dict(temperature=0.5, top_k=1, top_p=0.9, repetition_penalty=2.0),
    dict(temperature=2.0, top_k=100, top_p=0.05, repetition_penalty=0.8),
]


def _same(got, want):
    got = np.asarray(got)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hp", CASES)
def test_process_logits_matches_numpy(hp):
    want = np_process(FIXED, SEEN, **hp)
    _same(sample.process_logits(jnp.asarray(FIXED), jnp.asarray(SEEN), **hp), want)
    # generate passes the hyper-parameters as traced scalars: same result.
    traced = {"temperature": jnp.float32(hp["temperature"]), "top_k": jnp.int32(hp["top_k"]),
              "top_p": jnp.float32(hp["top_p"]), "repetition_penalty": jnp.float32(hp["repetition_penalty"])}
    _same(jax.jit(sample.process_logits)(jnp.asarray(FIXED), jnp.asarray(SEEN), **traced), want)


@pytest.mark.parametrize("hp", CASES[1:])
def test_process_logits_matches_hugging_face_processors(hp):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers.generation import logits_process as lp

    # Repetition penalty reads the ids in the text; any order of the seen ids will do.
    rows, cols = np.nonzero(SEEN)
    width = max(np.bincount(rows, minlength=4))
    ids = np.zeros((4, width), np.int64)
    for r in range(4):
        c = cols[rows == r]
        ids[r, :len(c)] = c
        ids[r, len(c):] = c[0] if len(c) else 0
    assert all(SEEN[r, ids[r]].all() for r in range(4))
    processors = [lp.RepetitionPenaltyLogitsProcessor(hp["repetition_penalty"]),
                  lp.TemperatureLogitsWarper(hp["temperature"])]
    if hp["top_k"]:
        processors.append(lp.TopKLogitsWarper(hp["top_k"]))
    if hp["top_p"] < 1.0:
        processors.append(lp.TopPLogitsWarper(hp["top_p"]))
    scores = torch.tensor(FIXED)
    for proc in processors:
        scores = proc(torch.tensor(ids), scores)
    del transformers
    _same(sample.process_logits(jnp.asarray(FIXED), jnp.asarray(SEEN), **hp), scores.numpy())


def test_samples_stay_in_the_allowed_set():
    hp = dict(temperature=0.9, top_k=8, top_p=0.7, repetition_penalty=1.3)
    allowed = np.isfinite(np_process(FIXED, SEEN, **hp))
    processed = sample.process_logits(jnp.asarray(FIXED), jnp.asarray(SEEN), **hp)
    draws = np.asarray(jax.random.categorical(jax.random.key(0), processed, axis=-1, shape=(4000, 4)))
    for r in range(4):
        drawn = set(draws[:, r].tolist())
        assert drawn <= set(np.nonzero(allowed[r])[0].tolist())
        assert len(drawn) == allowed[r].sum()  # every allowed token turns up in 4000 draws here


# ----------------------------------------------------------------------------------------------------------
# generate(): randomness, eos, errors, CLI


# Three prompts in one length bucket, 32 new tokens: the shapes of the tests above, so the programs compiled
# for them are reused (one more compilation, for sampling).
PROMPTS3 = [[1, 5, 9], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


def test_sampling_is_deterministic_in_the_rng(random_model):
    config, params = random_model
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, top_k=50)  # top_k > 0: the same program as top_k=1
    a = sample.generate(config, params, PROMPTS3, rng=jax.random.key(7), **kw)
    b = sample.generate(config, params, PROMPTS3, rng=jax.random.key(7), **kw)
    c = sample.generate(config, params, PROMPTS3, rng=jax.random.key(8), **kw)
    assert a == b
    assert a != c
    assert all(len(row) == MAX_NEW for row in a)
    # Filters are honoured end to end: with top_k=1 sampling is greedy.
    g = sample.generate(config, params, PROMPTS3, max_new_tokens=MAX_NEW, greedy=True)
    assert sample.generate(config, params, PROMPTS3, rng=jax.random.key(9), max_new_tokens=MAX_NEW, top_k=1) == g


def test_eos_stops_the_row_and_is_excluded(random_model):
    config, params = random_model
    full = sample.generate(config, params, PROMPTS3, max_new_tokens=MAX_NEW, greedy=True)
    eos = full[0][4]
    got = sample.generate(config, params, PROMPTS3, max_new_tokens=MAX_NEW, greedy=True, eos_id=eos, pad_id=-1)
    for f, g in zip(full, got):
        assert g == (f[:f.index(eos)] if eos in f else f)
    assert len(got[0]) <= 4


def test_invalid_requests_raise(random_model):
    config, params = random_model
    with pytest.raises(ValueError, match="max_seq_len"):
        sample.generate(config, params, [[1] * 100], max_new_tokens=29, greedy=True)
    with pytest.raises(ValueError, match="empty"):
        sample.generate(config, params, [[1], []], max_new_tokens=4, greedy=True)
    with pytest.raises(ValueError, match="temperature"):
        sample.generate(config, params, [[1]], max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="outside"):
        sample.generate(config, params, [[VOCAB]], max_new_tokens=4, greedy=True)


def test_buckets_and_the_max_seq_len_clamp():
    assert [sample.bucket_length(n) for n in (1, 16, 17, 200, 257, 600)] == [16, 16, 32, 256, 512, 768]
    assert sample.padded_length(7, 32, 128) == 16
    assert sample.padded_length(100, 28, 128) == 100  # the bucket (128) would not fit; the prompt does
    assert sample.padded_length(90, 28, 128) == 100
    with pytest.raises(ValueError, match="max_seq_len"):
        sample.padded_length(100, 29, 128)


def test_cli_missing_workdir_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "maxlm.sample", f"--workdir={tmp_path / 'nope'}", "--prompt=hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    empty = subprocess.run([sys.executable, "-m", "maxlm.sample", f"--workdir={tmp_path}", "--prompt=hi"],
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "Traceback" not in empty.stderr, empty.stderr
