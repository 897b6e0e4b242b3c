"""Forward and forward+backward speed of maxlm's Pallas flash attention against XLA and cuDNN attention.

    python experiments/bench_attention.py [--seqs=512,1k,2k,4k,8k,16k] [--head_dims=64,128] [--tokens=16384]
        [--impls=pallas,xla,cudnn] [--nocausal] [--dtype=bfloat16] [--kv_heads=N] [--iters=10] [--json_out=PATH]

The shapes follow the benchmark protocol of the FlashAttention-2 paper (Dao 2023, section 4.1): sequence
lengths 512 to 16k, the batch chosen so that batch x seq stays at `--tokens` (16k) tokens (batch =
tokens // seq, at least 1), hidden dimension 2048 split into heads of dimension 64 or 128 (32 or 16 query
heads), causal masking by default, bfloat16 by default. `--kv_heads` sets fewer key/value heads for
grouped-query attention (default: as many as query heads, i.e. multi-head attention).

Implementations (`--impls`), all on inputs q [B,T,N,H], k/v [B,S,K,H] from the same random draw:
  pallas  `kernels.flash_attention` (on a CPU it runs in the Pallas interpreter);
  xla     `kernels.mha_reference` with every segment id 1, the plain XLA attention that materialises the
          [T,S] logits in float32;
  cudnn   `jax.nn.dot_product_attention(..., implementation="cudnn")`, a GPU-only path; where it raises
          (any other platform, an unsupported shape or cuDNN version) its cells read "n/a".

What is timed, per implementation and shape: the jitted forward f(q, k, v), and the jitted forward+backward
jax.grad(sum(f(q, k, v).astype(float32))) with respect to q, k and v. Each is lowered and compiled, run once
untimed, then run `--iters` times, each call closed with block_until_ready; the table shows the median.
A failure in one cell (out of memory: "oom", anything else: "error") is recorded and the run goes on.

FLOPs are counted as in the FlashAttention papers: forward = 4 x B x N x T x S x H (the two matmuls QK^T and
PV, two FLOPs per multiply-add, N the query heads), halved when causal, counting the causal half only;
backward = 2.5 x forward (five matmuls against two), so forward+backward = 3.5 x forward. These are the
FLOPs attention needs, not those an implementation executes (the XLA reference computes the masked half
too), so TFLOP/s compares implementations at equal work.

Memory, per compiled function: XLA's static analysis of the executable (argument + output + temp bytes),
and, where the device allocator reports `peak_bytes_in_use` (GPU, TPU), the allocator's peak. That peak
is the process's high-water mark since start-up (JAX cannot reset it), so it belongs to the largest cell
run so far, not necessarily to the row it is printed on.

On a CPU backend the kernel runs in the Pallas interpreter, so the numbers are interpreter timings, not
kernel performance; unless --seqs, --tokens or --iters are given, small sizes are used there.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import app, flags

from kernels import flash_attention, mha_reference

HIDDEN = 2048  # the FlashAttention-2 benchmark's hidden dimension: heads = HIDDEN // head_dim
IMPLS = ("pallas", "xla", "cudnn")
CPU_DEFAULTS = {"seqs": ["128", "256"], "tokens": 512, "iters": 2}
SUMMARY_SEQS = (4096, 16384)
SUMMARY_HEAD_DIM = 128
MIB = 2**20

flags.DEFINE_list("seqs", ["512", "1k", "2k", "4k", "8k", "16k"],
                  "Sequence lengths (T = S), comma separated; a 'k' suffix multiplies by 1024.")
flags.DEFINE_list("head_dims", ["64", "128"], "Head dimensions H; query heads = 2048 // H.")
flags.DEFINE_integer("tokens", 16384, "Tokens per batch: batch = tokens // seq, at least 1.")
flags.DEFINE_integer("kv_heads", None, "Key/value heads K (grouped-query attention); default: the query heads.")
flags.DEFINE_list("impls", list(IMPLS), f"Implementations to time, any of {', '.join(IMPLS)}.")
flags.DEFINE_integer("iters", 10, "Timed calls per measurement; the median is reported.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "dtype of q, k and v.")
flags.DEFINE_bool("causal", True, "Causal masking (--nocausal for full attention).")
flags.DEFINE_string("json_out", None, "Also write every row, with the run's settings, as JSON to this path.")
FLAGS = flags.FLAGS

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def parse_length(text: str) -> int:
    """'512' -> 512, '4k' -> 4096."""
    text = text.strip().lower()
    value = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    if value < 1:
        raise ValueError(f"lengths must be positive, got {text!r}")
    return value


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs under the FlashAttention-2 convention."""
    forward = 4.0 * batch * heads * seq_q * seq_k * head_dim / (2 if causal else 1)
    return forward, 3.5 * forward


def attention_fn(impl: str, causal: bool) -> AttentionFn:
    if impl == "pallas":
        return lambda q, k, v: flash_attention(q, k, v, causal=causal)
    if impl == "xla":
        def xla(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            q_seg = jnp.ones(q.shape[:2], jnp.int32)
            kv_seg = jnp.ones(k.shape[:2], jnp.int32)
            return mha_reference(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal)
        return xla
    if impl == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    raise ValueError(f"unknown implementation {impl!r}")


def forward_backward(fn: AttentionFn) -> Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, ...]]:
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))


def xla_memory_bytes(compiled: Any) -> int | None:
    """Argument + output + temp bytes from XLA's analysis of a compiled executable, None if unavailable."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # some backends do not implement the analysis
        return None
    if analysis is None:
        return None
    return analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes


def device_peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return stats.get("peak_bytes_in_use") if stats else None


def measure(fn: Callable, args: tuple[jax.Array, ...], iters: int) -> tuple[float, int | None]:
    """Compile `fn`, run it once untimed, then time `iters` calls; returns (median seconds, XLA memory bytes)."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), xla_memory_bytes(compiled)


def failure_label(impl: str, error: Exception) -> str:
    text = str(error)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom"
    return "n/a" if impl == "cudnn" else "error"


def describe_error(error: Exception) -> str:
    """The exception's type and the first line of its message, for the failure notes under the table."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def bench_cell(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, iters: int,
               errors: dict[str, str]) -> dict[str, Any]:
    """Forward and forward+backward of one implementation at one shape; a failure fills its fields with a label."""
    fn = attention_fn(impl, causal)
    result: dict[str, Any] = {}
    for kind, target in (("fwd", fn), ("fwd_bwd", forward_backward(fn))):
        try:
            seconds, memory = measure(target, (q, k, v), iters)
        except Exception as e:  # one size failing (OOM, unsupported shape) must not end the run
            label = failure_label(impl, e)
            errors.setdefault(f"{impl} {kind}", describe_error(e))
            result.update({f"{kind}_ms": label, f"{kind}_tflops": label, f"{kind}_xla_mem_bytes": label})
        else:
            result.update({f"{kind}_ms": 1e3 * seconds, f"{kind}_xla_mem_bytes": memory})
        gc.collect()
    result["device_peak_bytes"] = device_peak_bytes()
    return result


def format_bytes(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value / MIB:.1f} MiB" if value < 1024 * MIB else f"{value / 1024 / MIB:.2f} GiB"


def format_number(value: Any, spec: str) -> str:
    return value if isinstance(value, str) else format(value, spec)


COLUMNS = (("hdim", 5), ("seq", 7), ("batch", 6), ("heads", 7), ("impl", 8), ("fwd ms", 11), ("fwd TF/s", 9),
           ("f+b ms", 11), ("f+b TF/s", 9), ("fwd mem", 12), ("f+b mem", 12), ("device peak", 12))


def format_row(row: dict[str, Any]) -> str:
    heads = str(row["heads"]) if row["kv_heads"] == row["heads"] else f"{row['heads']}/{row['kv_heads']}"
    cells = (row["head_dim"], row["seq"], row["batch"], heads, row["impl"],
             format_number(row["fwd_ms"], ".3f"), format_number(row["fwd_tflops"], ".1f"),
             format_number(row["fwd_bwd_ms"], ".3f"), format_number(row["fwd_bwd_tflops"], ".1f"),
             format_bytes(row["fwd_xla_mem_bytes"]), format_bytes(row["fwd_bwd_xla_mem_bytes"]),
             format_bytes(row["device_peak_bytes"]))
    return "".join(f"{str(c):>{w}}" if i > 0 else f"{str(c):<{w}}" for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))


def summary_line(rows: list[dict[str, Any]], causal: bool) -> str | None:
    """Pallas forward+backward TFLOP/s as a fraction of cuDNN's at seq 4k and 16k, head dim 128."""
    by_key = {(r["impl"], r["head_dim"], r["seq"]): r for r in rows}
    parts = []
    for seq in SUMMARY_SEQS:
        pallas = by_key.get(("pallas", SUMMARY_HEAD_DIM, seq))
        cudnn = by_key.get(("cudnn", SUMMARY_HEAD_DIM, seq))
        if pallas and cudnn and all(isinstance(r["fwd_bwd_tflops"], float) for r in (pallas, cudnn)):
            parts.append(f"seq {seq}: {pallas['fwd_bwd_tflops'] / cudnn['fwd_bwd_tflops']:.2f}")
    if not parts:
        return None
    mode = "causal" if causal else "non-causal"
    return f"pallas / cudnn fwd+bwd TFLOP/s (head dim {SUMMARY_HEAD_DIM}, {mode}): " + ", ".join(parts)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    on_cpu = jax.default_backend() == "cpu"
    defaulted = [name for name in CPU_DEFAULTS if on_cpu and not FLAGS[name].present]
    for name in defaulted:
        setattr(FLAGS, name, CPU_DEFAULTS[name])
    try:
        seqs = [parse_length(s) for s in FLAGS.seqs]
        head_dims = [parse_length(h) for h in FLAGS.head_dims]
    except ValueError as e:
        raise app.UsageError(f"--seqs/--head_dims: {e}") from e
    impls = [i.strip() for i in FLAGS.impls]
    if unknown := sorted(set(impls) - set(IMPLS)):
        raise app.UsageError(f"--impls: unknown {unknown}; choose from {', '.join(IMPLS)}")
    if FLAGS.tokens < 1 or FLAGS.iters < 1:
        raise app.UsageError("--tokens and --iters must be at least 1")
    for h in head_dims:
        heads = max(1, HIDDEN // h)
        if FLAGS.kv_heads is not None and (FLAGS.kv_heads < 1 or heads % FLAGS.kv_heads):
            raise app.UsageError(f"--kv_heads={FLAGS.kv_heads} must divide the {heads} query heads of head dim {h}")
    dtype = jnp.dtype(FLAGS.dtype)
    causal = FLAGS.causal

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}")
    if on_cpu:
        note = f" (small CPU defaults for --{', --'.join(defaulted)})" if defaulted else ""
        print(f"cpu backend: the Pallas kernel runs in the interpreter, so these are interpreter timings, "
              f"not kernel performance{note}")
    kv_note = "as many as query heads (MHA)" if FLAGS.kv_heads is None else f"{FLAGS.kv_heads} (GQA)"
    print(f"{'causal' if causal else 'non-causal'}, {dtype.name}, {FLAGS.tokens} tokens per batch, hidden {HIDDEN}, "
          f"kv heads {kv_note}, median of {FLAGS.iters} timed calls; FLOPs: fwd 4BNTSH (/2 causal), fwd+bwd 3.5 x fwd")
    header = "".join(f"{n:>{w}}" if i > 0 else f"{n:<{w}}" for i, (n, w) in enumerate(COLUMNS))
    print(f"\n{header}\n{'-' * len(header)}", flush=True)

    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for head_dim in head_dims:
        heads = max(1, HIDDEN // head_dim)
        kv_heads = FLAGS.kv_heads or heads
        for seq in seqs:
            batch = max(1, FLAGS.tokens // seq)
            fwd_flops, fwd_bwd_flops = attention_flops(batch, heads, seq, seq, head_dim, causal)
            keys = jax.random.split(jax.random.key(0), 3)
            try:
                q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
                k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
                v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
                jax.block_until_ready((q, k, v))
            except Exception as e:  # the inputs themselves do not fit
                label = failure_label("inputs", e)
                errors.setdefault("inputs", describe_error(e))
                q = k = v = None
            for impl in impls:
                row: dict[str, Any] = {"impl": impl, "head_dim": head_dim, "seq": seq, "batch": batch,
                                       "heads": heads, "kv_heads": kv_heads, "causal": causal,
                                       "dtype": dtype.name, "fwd_flops": fwd_flops, "fwd_bwd_flops": fwd_bwd_flops}
                if q is None:
                    row.update({f"{kind}_{field}": label for kind in ("fwd", "fwd_bwd")
                                for field in ("ms", "tflops", "xla_mem_bytes")}, device_peak_bytes=None)
                else:
                    row.update(bench_cell(impl, q, k, v, causal, FLAGS.iters, errors))
                for kind, flops in (("fwd", fwd_flops), ("fwd_bwd", fwd_bwd_flops)):
                    if isinstance(row[f"{kind}_ms"], float):
                        row[f"{kind}_tflops"] = flops / (row[f"{kind}_ms"] / 1e3) / 1e12
                rows.append(row)
                print(format_row(row), flush=True)
            del q, k, v
            gc.collect()

    if errors:
        print("\nfirst failure of each kind:")
        for where, message in errors.items():
            print(f"  {where}: {message}")
    if "pallas" in impls and "cudnn" in impls and (line := summary_line(rows, causal)):
        print(f"\n{line}")
    if FLAGS.json_out:
        meta = {"device_kind": device.device_kind, "platform": device.platform, "jax_version": jax.__version__,
                "tokens": FLAGS.tokens, "iters": FLAGS.iters, "hidden": HIDDEN, "interpreted": on_cpu}
        with open(FLAGS.json_out, "w", encoding="utf-8") as f:
            json.dump({**meta, "rows": rows, "errors": errors}, f, indent=1)
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    app.run(main)
