"""Decode throughput of maxlm's KV-cached sampler, against the memory-bandwidth roofline of this device.

    python experiments/bench_decode.py --config=configs/llama_1b.py [--batch_sizes=1,32] [--prompt_len=128]
        [--new_tokens=128] [--config.model.compute_dtype=bfloat16 ...]

Random weights of the config's shape, cast to the compute dtype (what a server holds), greedy decoding with
no stop token, so every row decodes exactly `--new_tokens` tokens. For each batch size: the whole call
(prefill + decode loop, one compiled program) is timed, and so is a call that decodes one token; their
difference over (new_tokens - 1) x batch is the decode rate, so prefill does not flatter or hurt it.

The roofline: one decode step reads every weight once plus the KV cache written so far (on average half of
prompt + new tokens), so at batch b it cannot beat b / ((weight bytes + cache bytes) / bandwidth) tokens/s
(Pope et al. 2022, "Efficiently Scaling Transformer Inference", section 2). The bandwidth is measured here:
a device copy of a large array, bytes read + written per second.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from maxlm import cli
from maxlm import config as config_lib
from maxlm.inference.roofline import copy_bandwidth, decode_tokens_per_s, kv_bytes_per_token
from maxlm.model import decoder as model
from maxlm.model import sampler

flags.DEFINE_list("batch_sizes", ["1", "32"], "Sequences decoded together.")
flags.DEFINE_integer("prompt_len", 128, "Tokens in every prompt.")
flags.DEFINE_integer("new_tokens", 128, "Tokens decoded per sequence.")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement; the fastest is kept.")


def _best(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    config = f.config
    config_lib.validate(config)
    dtype = jnp.dtype(config.model.compute_dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), jax.jit(lambda key: model.init(config, key))(jax.random.key(0)))
    weight_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
    m = config.model
    kv_per_token = kv_bytes_per_token(config)
    on_cpu = jax.devices()[0].platform == "cpu"
    bandwidth = copy_bandwidth(1 << 28 if on_cpu else 1 << 30)
    rng = np.random.default_rng(0)
    print(f"{config_lib.describe(config)}\n{jax.devices()[0].device_kind}: weights {weight_bytes / 2**20:.0f} MiB in "
          f"{dtype.name}, KV cache {kv_per_token / 1024:.1f} KiB/token, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for b in (int(x) for x in f.batch_sizes):
        prompts = rng.integers(1, m.vocab_size, (b, f.prompt_len)).tolist()
        run = lambda n: sampler.generate(config, params, prompts, max_new_tokens=n, greedy=True)
        full = _best(lambda: run(f.new_tokens), f.repeats)
        prefill = _best(lambda: run(1), f.repeats)
        decode_s = max(full - prefill, 1e-9)
        tokens = b * (f.new_tokens - 1)
        mean_context = f.prompt_len + f.new_tokens / 2
        roofline = decode_tokens_per_s(weight_bytes, kv_per_token, b, mean_context, bandwidth)
        rows.append({"batch": b, "tokens_per_s": tokens / decode_s, "ms_per_step": 1e3 * decode_s / (f.new_tokens - 1),
                     "prefill_s": prefill, "roofline_tokens_per_s": roofline,
                     "fraction_of_roofline": tokens / decode_s / roofline})
    print(f"\n{'batch':>6}{'tokens/s':>12}{'ms/step':>10}{'roofline tok/s':>16}{'of roofline':>13}")
    for r in rows:
        print(f"{r['batch']:>6}{r['tokens_per_s']:>12,.0f}{r['ms_per_step']:>10.2f}{r['roofline_tokens_per_s']:>16,.0f}"
              f"{100 * r['fraction_of_roofline']:>12.0f}%")
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "weight_bytes": weight_bytes,
                      "copy_bandwidth": bandwidth, "prompt_len": f.prompt_len, "new_tokens": f.new_tokens,
                      "dtype": dtype.name, "rows": rows}))


if __name__ == "__main__":
    cli.define_config_flag()
    cli.run(main)
