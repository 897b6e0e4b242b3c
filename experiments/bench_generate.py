"""Continuous batching against static batching and `transformers.generate`, on a ragged workload.

    python experiments/bench_generate.py [--config=configs/tiny.py] [--requests=256] [--slots=32]
        [--hf=True] [--hf_requests=N]

The workload (seeded, so every run is the same): `--requests` prompts of uniformly random token ids and
lengths uniform in [16, 512]. Output lengths are "most short, a few long": 90% of the requests are uniform
in [8, 32] tokens and 10% uniform in [128, 256]. That is the shape of chat and RL replies, where a few long
answers hold a static batch up. Every reply runs to its length, with no eos (vLLM's `ignore_eos`), so all
three systems do the same work: the same tokens, greedy.

* continuous: `maxlm.inference.engine.Engine` with `--slots` slots, every request submitted at t=0.
* static: `maxlm.model.sampler.generate`, the left-padded batch path that maxlm used before the engine.
  It takes batches of `--slots` requests in arrival order, and each batch decodes until its longest reply.
* transformers: `LlamaForCausalLM.generate` on the same weights (exported by `maxlm.interop.hf.to_hf`),
  left-padded batches of `--slots`, in float32 on the same threads.

tokens/s counts generated tokens over wall time, compilation excluded: both maxlm paths run the workload
once untimed first, which compiles every program it needs; transformers compiles nothing. Time to first token (TTFT) is the time from t=0 until a request's first token exists.
For the engine it is measured. For the batch paths it is the batch's start plus a separate timing of
that batch's prefill with one new token. The roofline is `maxlm.inference.roofline`: the engine's
batch of slots at the workload's mean context, over this machine's measured copy bandwidth.
Greedy equality compares every reply token for token with the static path, and with transformers on
its requests.

Last line: one JSON object with `speedup_vs_static`, `speedup_vs_hf`, `greedy_equal` and the figures.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import flags

from maxlm import cli
from maxlm import config as config_lib
from maxlm.inference import roofline
from maxlm.inference.engine import Engine, SamplingParams
from maxlm.interop import hf as hf_lib
from maxlm.model import decoder as model
from maxlm.model import sampler

flags.DEFINE_integer("requests", 256, "Requests in the workload.")
flags.DEFINE_integer("slots", 32, "Engine slots, and the batch size of the static paths.")
flags.DEFINE_integer("seed", 0, "Seed of the workload and of the random weights.")
flags.DEFINE_float("init_std", 0.2, "Std of the random weights (large enough that greedy picks are clear).")
flags.DEFINE_list("prompt_range", ["16", "512"], "Prompt lengths, uniform in [low, high].")
flags.DEFINE_list("short_range", ["8", "32"], "Lengths of the short replies, uniform in [low, high].")
flags.DEFINE_list("long_range", ["128", "256"], "Lengths of the long replies, uniform in [low, high].")
flags.DEFINE_float("long_fraction", 0.1, "Fraction of long replies.")
flags.DEFINE_bool("hf", True, "Also run transformers.generate.")
flags.DEFINE_integer("hf_requests", 0, "Requests given to transformers (0: all); its tokens/s is over these.")

FLAGS = flags.FLAGS


def workload(n: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """(prompts, reply lengths) as described in the module docstring."""
    rng = np.random.default_rng(seed)
    lo, hi = (int(x) for x in FLAGS.prompt_range)
    prompts = [rng.integers(1, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]
    short, long = [int(x) for x in FLAGS.short_range], [int(x) for x in FLAGS.long_range]
    is_long = rng.random(n) < FLAGS.long_fraction
    lengths = [int(rng.integers(*(long if big else short)) + 0) for big in is_long]
    return prompts, lengths


def run_engine(config, params, prompts, lengths) -> dict[str, Any]:
    engine = Engine(config, params, slots=FLAGS.slots)
    requests = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    engine.generate(prompts, requests)  # compile every program this workload uses (as the static path does)
    engine.steps = dict.fromkeys(engine.steps, 0)
    start = time.perf_counter()
    done = engine.generate(prompts, requests)
    wall = time.perf_counter() - start
    return {"outputs": [r.tokens for r in done], "wall_s": wall,
            "ttft_s": [r.first_token - start for r in done], "steps": dict(engine.steps)}


def run_static(config, params, prompts, lengths) -> dict[str, Any]:
    b = FLAGS.slots

    def call(ps, n):
        return sampler.generate(config, params, ps, max_new_tokens=n, greedy=True)

    batches = [(prompts[i:i + b], lengths[i:i + b]) for i in range(0, len(prompts), b)]
    for ps, ls in batches:  # compile every (padded length, max_new_tokens) program first
        call(ps, max(ls))
        call(ps, 1)
    return timed_batches(call, batches)


def timed_batches(call, batches) -> dict[str, Any]:
    """A static path over its batches, one after another: each batch decodes to its longest reply (timed),
    and its time to first token is the batches before it plus its own prefill (a 1-token call, timed apart)."""
    outputs, ttft, wall = [], [], 0.0
    for ps, ls in batches:
        t = time.perf_counter()
        out = call(ps, max(ls))
        elapsed = time.perf_counter() - t
        t = time.perf_counter()
        call(ps, 1)
        prefill = time.perf_counter() - t
        ttft += [wall + prefill] * len(ps)
        wall += elapsed
        outputs += [o[:n] for o, n in zip(out, ls)]
    return {"outputs": outputs, "wall_s": wall, "ttft_s": ttft}


def run_hf(config, params, prompts, lengths) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as folder:
        hf_lib.to_hf(config, jax.tree.map(np.asarray, params), folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    b = FLAGS.slots

    def call(ps, n):
        width = max(len(p) for p in ps)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              eos_token_id=None, pad_token_id=0)
        return out[:, width:].tolist()

    call(prompts[:2], 2)  # warm-up
    batches = [(prompts[i:i + b], lengths[i:i + b]) for i in range(0, len(prompts), b)]
    return timed_batches(call, batches) | {"torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    config = config_lib.validate(config_lib.override(FLAGS.config, **{"model.init_std": FLAGS.init_std}))
    m = config.model
    params = jax.jit(lambda key: model.init(config, key))(jax.random.key(FLAGS.seed))
    prompts, lengths = workload(FLAGS.requests, m.vocab_size, FLAGS.seed)
    if max(len(p) + n for p, n in zip(prompts, lengths)) > m.max_seq_len:
        raise config_lib.ConfigError("model.max_seq_len", f"{m.max_seq_len} is shorter than the longest request")
    total = sum(lengths)
    print(f"model: {config_lib.describe(config)}; {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"workload: {len(prompts)} requests, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens "
          f"(mean {np.mean([len(p) for p in prompts]):.0f}), replies {min(lengths)}-{max(lengths)} tokens "
          f"(mean {np.mean(lengths):.1f}, {sum(n >= int(FLAGS.long_range[0]) for n in lengths)} long), "
          f"{total} generated tokens; batch width {FLAGS.slots}", flush=True)

    rows = {"continuous (maxlm engine)": run_engine(config, params, prompts, lengths)}
    print("engine done", flush=True)
    rows["static (maxlm sampler.generate)"] = run_static(config, params, prompts, lengths)
    print("static done", flush=True)
    hf_n = FLAGS.hf_requests or len(prompts)
    if FLAGS.hf:
        rows["transformers.generate"] = run_hf(config, params, prompts[:hf_n], lengths[:hf_n])
    for r in rows.values():
        r["tokens"] = sum(len(o) for o in r["outputs"])
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
    engine, static = rows["continuous (maxlm engine)"], rows["static (maxlm sampler.generate)"]
    greedy_static = engine["outputs"] == static["outputs"]
    hf_row = rows.get("transformers.generate")
    greedy_hf = hf_row is not None and engine["outputs"][:hf_n] == hf_row["outputs"]

    weight_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
    bandwidth = roofline.copy_bandwidth(1 << 28)
    context = np.mean([len(p) for p in prompts]) + np.mean(lengths) / 2
    bound = roofline.decode_tokens_per_s(weight_bytes, roofline.kv_bytes_per_token(config), FLAGS.slots, context,
                                         bandwidth)
    print(f"\n{'':34}{'tokens':>8}{'wall s':>9}{'tokens/s':>11}{'TTFT p50 s':>12}{'TTFT p90 s':>12}")
    for name, r in rows.items():
        print(f"{name:34}{r['tokens']:>8}{r['wall_s']:>9.2f}{r['tokens_per_s']:>11,.0f}"
              f"{np.percentile(r['ttft_s'], 50):>12.2f}{np.percentile(r['ttft_s'], 90):>12.2f}")
    print(f"{'decode roofline (memory bandwidth)':34}{'':8}{'':9}{bound:>11,.0f}   "
          f"({weight_bytes / 2**20:.1f} MiB weights + {FLAGS.slots} x {context:.0f} tokens of KV per step at "
          f"{bandwidth / 1e9:.1f} GB/s copy bandwidth)")
    speedup_static = engine["tokens_per_s"] / static["tokens_per_s"]
    speedup_hf = engine["tokens_per_s"] / hf_row["tokens_per_s"] if hf_row else None
    print(f"\ncontinuous / static: {speedup_static:.2f}x; continuous / transformers: "
          f"{speedup_hf if speedup_hf is None else f'{speedup_hf:.1f}x'}; greedy equal to static: {greedy_static}, "
          f"to transformers ({hf_n if hf_row else 0} requests): {greedy_hf if hf_row else None}")
    summary = {
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "requests": len(prompts),
        "slots": FLAGS.slots, "generated_tokens": total, "engine_steps": engine["steps"],
        "rows": {name: {k: r[k] for k in ("tokens", "wall_s", "tokens_per_s")} |
                 {"ttft_p50_s": float(np.percentile(r["ttft_s"], 50)),
                  "ttft_p90_s": float(np.percentile(r["ttft_s"], 90))} for name, r in rows.items()},
        "roofline_tokens_per_s": bound, "copy_bandwidth": bandwidth, "hf_requests": hf_n if hf_row else 0,
        "speedup_vs_static": speedup_static, "speedup_vs_hf": speedup_hf,
        "greedy_equal": bool(greedy_static and (greedy_hf or hf_row is None)),
        "greedy_equal_static": greedy_static, "greedy_equal_hf": greedy_hf if hf_row else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.define_config_flag(default="configs/tiny.py")
    cli.run(main)
