"""Training-step throughput of maxlm (JAX) against Hugging Face transformers (PyTorch) at the same shape.

    python experiments/bench_train.py --config=configs/tiny.py [--steps=10] [--config.model.num_layers=2 ...]

What is measured, for each framework in turn on the same machine: one full optimizer step (forward,
backward, global-norm clipping, AdamW update) on a fixed batch of `data.batch_size` x `data.seq_len` uniformly
random tokens already on the device, so no tokenizer, data loading or host-to-device copy is timed.
`--warmup` (at least 1) untimed steps run first (for JAX the lower + compile time is measured and reported apart), then
`--steps` steps are timed back to back and closed with a device synchronisation; step time is their mean.

The baseline is `transformers.LlamaForCausalLM` with the maxlm model's shape (SDPA attention, float32 or
autocast to the maxlm compute dtype), `torch.optim.AdamW` (fused on CUDA) and the same clipping, on one device.

MFU (model FLOPs utilisation, Chowdhery et al. 2022, PaLM, appendix B) = model FLOPs per token x tokens/s /
peak FLOP/s. Model FLOPs per token are `maxlm.config.flops_per_token`: 6 x the matmul parameters plus the
causal attention term, i.e. what the model needs, not what an implementation executes (rematerialisation
and padding don't count). The peak is `maxlm.metrics.peak_flops_per_device` (dense bf16 datasheet figure of
an accelerator, an fp32 FMA estimate for a CPU) x the devices used.

Peak memory: on GPU/TPU the allocator's peak (JAX `memory_stats`, `torch.cuda.max_memory_allocated`), and
XLA's static analysis of the compiled JAX step. On CPU, a coarse figure: the peak RSS during the timed steps
minus the RSS before that framework built its model (Linux `/proc/self/status`).
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any, Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for the PyTorch run

import jax
import ml_collections
import numpy as np
from absl import flags

from maxlm import cli
from maxlm.training import sharding
from maxlm import config as config_lib
from maxlm.training.metrics import peak_flops_per_device
from maxlm.training.pretrain import Trainer

flags.DEFINE_integer("steps", 5, "Timed training steps per framework.")
flags.DEFINE_integer("warmup", 1, "Untimed steps before timing, at least 1 (after compilation).")
flags.DEFINE_bool("torch", True, "Also time the Hugging Face transformers LlamaForCausalLM baseline.")
flags.DEFINE_bool("torch_compile", False, "Wrap the PyTorch model in torch.compile.")
FLAGS = flags.FLAGS
MIB = 2**20


def _proc_status_kib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def _reset_rss_peak() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
    b, t, v = config.data.batch_size, config.data.seq_len, config.model.vocab_size
    tokens = np.random.default_rng(seed).integers(0, v, size=(b, t + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "loss_weights": np.ones((b, t), np.float32)}


def time_steps(step: Callable[[], Any], sync: Callable[[Any], None], warmup: int, steps: int,
               reset_peaks: Callable[[], None]) -> tuple[float, Any]:
    """Run `warmup` (at least 1) untimed steps, `reset_peaks()`, then `steps` timed ones.

    Returns (mean seconds per timed step, the first step's output).
    """
    first = out = step()
    for _ in range(warmup - 1):
        out = step()
    sync(out)
    reset_peaks()
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync(out)
    return (time.perf_counter() - start) / steps, first


def bench_jax(config: ml_collections.ConfigDict, warmup: int, steps: int) -> dict[str, Any]:
    rss0 = _proc_status_kib("VmRSS")
    trainer = Trainer(config)
    state = trainer.init_state(jax.random.key(config.train.seed))
    batch = trainer.device_batch(random_batch(config))
    start = time.perf_counter()
    with sharding.activation_rules(config, trainer.mesh):
        compiled = trainer._step.lower(state, batch).compile()
    result: dict[str, Any] = {"compile_s": time.perf_counter() - start}
    analysis = compiled.memory_analysis()
    for key in ("argument", "output", "alias", "temp"):
        result[f"xla_{key}_mib"] = getattr(analysis, f"{key}_size_in_bytes") / MIB if analysis else None

    def step() -> dict[str, jax.Array]:
        nonlocal state
        state, metrics = compiled(state, batch)
        return metrics

    result["step_s"], first = time_steps(step, jax.block_until_ready, warmup, steps, _reset_rss_peak)
    result["first_loss"] = float(first["loss"])
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        result["peak_mem_mib"], result["peak_mem_kind"] = stats["peak_bytes_in_use"] / MIB, "device peak"
    else:
        result["peak_mem_mib"] = (_proc_status_kib("VmHWM") - rss0) / 1024
        result["peak_mem_kind"] = "peak RSS growth"
        result["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def bench_torch(config: ml_collections.ConfigDict, warmup: int, steps: int, compile_model: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    m, o = config.model, config.optim
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    rss0 = _proc_status_kib("VmRSS")
    hf_config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=config_lib.head_dim(m),
        rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        max_position_embeddings=m.max_seq_len, attention_bias=m.qkv_bias, initializer_range=m.init_std)
    torch.manual_seed(config.train.seed)
    model = LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed_tokens" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.peak_lr, betas=(o.b1, o.b2), eps=o.eps, fused=cuda or None)
    forward = torch.compile(model) if compile_model else model
    batch = {k: torch.from_numpy(v).to(device) for k, v in random_batch(config).items()}
    inputs, targets = batch["inputs"].long(), batch["targets"].long()
    autocast = torch.autocast(device.type, dtype=getattr(torch, m.compute_dtype), enabled=m.compute_dtype != "float32")

    def step() -> torch.Tensor:
        with autocast:
            logits = forward(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().view(-1, m.vocab_size), targets.view(-1))
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync(_: Any) -> None:
        if cuda:
            torch.cuda.synchronize()

    def reset_peaks() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        _reset_rss_peak()

    step_s, first_loss = time_steps(step, sync, warmup, steps, reset_peaks)
    result = {"step_s": step_s, "first_loss": float(first_loss), "threads": torch.get_num_threads()}
    if cuda:
        result["peak_mem_mib"], result["peak_mem_kind"] = torch.cuda.max_memory_allocated() / MIB, "device peak"
    else:
        result["peak_mem_mib"], result["peak_mem_kind"] = (_proc_status_kib("VmHWM") - rss0) / 1024, "peak RSS growth"
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    config = config_lib.validate(FLAGS.config)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_token = config_lib.flops_per_token(config, config.data.seq_len)
    peak_per_device = peak_flops_per_device(config.train.peak_tflops)
    peak_source = "train.peak_tflops" if config.train.peak_tflops > 0 else "device-kind lookup (maxlm.metrics)"
    device = jax.devices()[0]
    print(f"model: {config_lib.describe(config)}; compute {config.model.compute_dtype}")
    print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform}); jax {jax.__version__}")
    print(f"peak: {peak_per_device / 1e12:.3f} TFLOP/s per device from {peak_source}; "
          f"model FLOPs/token {flops_per_token / 1e6:.2f}M (PaLM app. B)")

    rows = {"maxlm (JAX)": bench_jax(config, FLAGS.warmup, FLAGS.steps)}
    rows["maxlm (JAX)"]["peak_flops"] = peak_per_device * jax.device_count()
    j = rows["maxlm (JAX)"]
    print(f"jax: compile {j['compile_s']:.2f}s")
    if j["xla_temp_mib"] is not None:
        print(f"jax: XLA memory analysis: arguments {j['xla_argument_mib']:.1f} MiB, outputs {j['xla_output_mib']:.1f}"
              f" MiB (aliased {j['xla_alias_mib']:.1f}), temp {j['xla_temp_mib']:.1f} MiB")
    if "process_peak_rss_mib" in j:
        print(f"jax: process peak RSS {j['process_peak_rss_mib']:.0f} MiB (getrusage)")
    if FLAGS.torch:
        try:
            import torch
            import transformers
        except ImportError as e:
            print(f"torch baseline skipped: {e}")
        else:
            rows["transformers (PyTorch)"] = bench_torch(config, FLAGS.warmup, FLAGS.steps, FLAGS.torch_compile)
            where = "cuda" if torch.cuda.is_available() else f"cpu, {rows['transformers (PyTorch)']['threads']} threads"
            print(f"torch {torch.__version__} ({where}), transformers {transformers.__version__}, "
                  f"torch.compile {'on' if FLAGS.torch_compile else 'off'}")
            rows["transformers (PyTorch)"]["peak_flops"] = peak_per_device

    print(f"\n{'':24}{'tokens/s':>12}{'step ms':>10}{'MFU %':>8}{'peak MiB':>10}  memory figure")
    for name, r in rows.items():
        r["tokens_per_s"] = tokens_per_step / r["step_s"]
        r["mfu"] = flops_per_token * r["tokens_per_s"] / r["peak_flops"]
        print(f"{name:24}{r['tokens_per_s']:>12,.0f}{1e3 * r['step_s']:>10.1f}{100 * r['mfu']:>8.2f}"
              f"{r['peak_mem_mib']:>10.1f}  {r['peak_mem_kind']}")
    summary: dict[str, Any] = {
        "config": config_lib.describe(config), "device_kind": device.device_kind, "device_count": jax.device_count(),
        "jax_version": jax.__version__, "steps": FLAGS.steps, "warmup": FLAGS.warmup,
        "tokens_per_step": tokens_per_step, "flops_per_token": flops_per_token,
        "peak_flops_per_device": peak_per_device, "peak_source": peak_source, "jax": j}
    if "transformers (PyTorch)" in rows:
        t = rows["transformers (PyTorch)"]
        summary.update(torch=t, torch_version=torch.__version__, transformers_version=transformers.__version__,
                       torch_compile=FLAGS.torch_compile, ratio_tokens_per_s=j["tokens_per_s"] / t["tokens_per_s"])
        print(f"\nmaxlm / transformers tokens/s: {summary['ratio_tokens_per_s']:.2f}x "
              f"(first-step losses {j['first_loss']:.3f} vs {t['first_loss']:.3f}, "
              f"ln(V) = {np.log(config.model.vocab_size):.3f})")
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.define_config_flag()
    cli.run(main)
