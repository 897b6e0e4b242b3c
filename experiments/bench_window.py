"""Sliding-window attention in maxlm's flash kernel: time against the same kernel with full causal attention
(the physical expectation: work falls as window / (T / 2), so a 1k window at 16k should cost ~1/8 of full
causal plus the diagonal tiles), and accuracy against the float32 reference.

    python experiments/bench_window.py [--seq=16384] [--windows=0,4096,1024] [--heads=16] [--kv_heads=8]

Prints a table and, last, one JSON line: {"seq", "rows": [{"window", "fwd_ms", "fwd_bwd_ms", "rel_err"}]}.
On a CPU it runs interpreted at a small size (a smoke test of the script, not a timing).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import flash_attention, mha_reference


def _median_ms(fn, *args, reps: int = 10) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--windows", default="0,4096,1024")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--check_seq", type=int, default=2048)
    args = p.parse_args()
    cpu = jax.default_backend() == "cpu"
    t, check_t = (256, 128) if cpu else (args.seq, args.check_seq)
    windows = [int(w) for w in args.windows.split(",")]
    if cpu:
        windows = [w // 64 for w in windows]
    n, k, h = args.heads, args.kv_heads, args.head_dim
    rows = []
    for w in windows:
        keys = jax.random.split(jax.random.PRNGKey(w), 4)
        q = jax.random.normal(keys[0], (1, t, n, h), jnp.bfloat16)
        kk = jax.random.normal(keys[1], (1, t, k, h), jnp.bfloat16)
        v = jax.random.normal(keys[2], (1, t, k, h), jnp.bfloat16)
        fwd = jax.jit(lambda q, kk, v, w=w: flash_attention(q, kk, v, causal=True, window=w))
        loss = jax.jit(jax.grad(lambda q, kk, v, w=w: flash_attention(q, kk, v, causal=True, window=w)
                                .astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        # Accuracy at a size the float32 reference handles comfortably, fresh random inputs.
        cq, ck, cv = (jax.random.normal(kx, (1, check_t, nh, h), jnp.bfloat16)
                      for kx, nh in zip(jax.random.split(keys[3], 3), (n, k, k)))
        ones = jnp.ones((1, check_t), jnp.int32)
        cw = min(w, check_t) if w else 0
        got = flash_attention(cq, ck, cv, causal=True, window=cw).astype(jnp.float32)
        want = mha_reference(*(x.astype(jnp.float32) for x in (cq, ck, cv)), q_segment_ids=ones,
                             kv_segment_ids=ones, causal=True, window=cw)
        rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        rows.append({"window": w, "fwd_ms": round(_median_ms(fwd, q, kk, v), 3),
                     "fwd_bwd_ms": round(_median_ms(loss, q, kk, v), 3), "rel_err": rel})
    full = rows[0]["fwd_ms"] if rows and rows[0]["window"] == 0 else None
    print(f"flash attention, T={t}, heads {n}/{k}, head dim {h}, bf16, {jax.devices()[0].device_kind}")
    print(f"{'window':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd vs full':>12} {'ideal':>7} {'rel err':>9}")
    for r in rows:
        ideal = f"{min(1.0, r['window'] / (t / 2)):.3f}" if r["window"] else "1"
        ratio = f"{r['fwd_ms'] / full:.3f}" if full else "-"
        print(f"{r['window']:>8} {r['fwd_ms']:>9.3f} {r['fwd_bwd_ms']:>11.3f} {ratio:>12} {ideal:>7} {r['rel_err']:>9.2e}")
    print(json.dumps({"seq": t, "rows": rows}))


if __name__ == "__main__":
    main()
