"""Run logging: `metrics.jsonl`, TensorBoard events (and W&B: `maxlm.training.tracking`), a console progress
line with ETA, a loss-curve PNG.

Only process 0 writes (multi-host runs would otherwise write N copies). MFU (model FLOPs utilisation, PaLM,
Chowdhery et al. 2022) is achieved model FLOPs per second over the peak of the devices used; the peak is the
dense bf16 tensor-core / MXU figure of the accelerator (what MFU is conventionally quoted against), or for a
CPU an estimate of its fp32 FMA throughput. `train.peak_tflops` overrides the lookup.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections

from maxlm.training import tracking

# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity).
PEAK_TFLOPS = {
    "h100": 989.0,
    "h200": 989.0,
    "h800": 989.0,
    "a100": 312.0,
    "a800": 312.0,
    "l40s": 362.0,
    "v100": 125.0,
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,
    "tpu v6 lite": 918.0,
    "tpu v6e": 918.0,
}
# CPU estimate: cores x 2.5 GHz x 32 fp32 FLOP/cycle (two 8-lane AVX2 FMA units).
CPU_FLOPS_PER_CORE = 2.5e9 * 32


def peak_flops_per_device(override_tflops: float = 0.0) -> float:
    if override_tflops > 0:
        return override_tflops * 1e12
    device = jax.devices()[0]
    if device.platform == "cpu":
        # All host "devices" (e.g. --xla_force_host_platform_device_count) share the cores this process may
        # run on (its affinity: a sweep's trial gets its share of the machine).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return (cores or 1) * CPU_FLOPS_PER_CORE / jax.local_device_count()
    kind = device.device_kind.lower()
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return float("nan")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    """Where a run's metrics go: metrics.jsonl, TensorBoard, and Weights & Biases when the config names a
    project (`train.wandb_project`). With a config, the config itself is logged too (TensorBoard text, W&B
    run config); `text` logs tables such as the samples a stage prints at its end."""

    def __init__(self, workdir: str, *, enabled: bool = True, config: ml_collections.ConfigDict | None = None,
                 stage: str = ""):
        self.enabled = enabled
        self.workdir = workdir
        self.history: list[dict[str, Any]] = []
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            if config is not None:
                self._tb.add_text("config", "```\n" + str(config) + "\n```")
                if config.train.wandb_project:
                    self._wandb = tracking.WandbRun(config, workdir, stage)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}, "time": time.time()}
        self.history.append(record)
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            self._tb.add_scalar(key, float(value), int(step))
        if self._wandb is not None:
            self._wandb.log(step, {k: float(v) for k, v in metrics.items()})

    def text(self, key: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]], step: int) -> None:
        """A table of text (e.g. prompt, sample) at `step`: a markdown table in TensorBoard, a W&B Table."""
        if not self.enabled or not rows:
            return
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        self._tb.add_text(key, "\n".join(lines), int(step))
        if self._wandb is not None:
            self._wandb.table(key, columns, rows, step)

    def progress(self, step: int, total: int, metrics: dict[str, float], eta_seconds: float,
                 extra: tuple[str, ...] = ()) -> None:
        """One log line; `extra` names a stage's own metrics to show after the loss (when present)."""
        if not self.enabled:
            return
        parts = [f"step {step}/{total}", f"loss {metrics['loss']:.4f}"]
        if "eval_loss" in metrics:
            parts.append(f"eval {metrics['eval_loss']:.4f}")
        parts += [f"{k} {metrics[k]:.4g}" for k in extra if k in metrics]
        parts += [f"lr {metrics['lr']:.2e}", f"gnorm {metrics['grad_norm']:.3f}",
                  f"{metrics['tokens_per_sec']:,.0f} tok/s", f"mfu {100 * metrics['mfu']:.2f}%",
                  f"eta {format_duration(eta_seconds)}"]
        print(" | ".join(parts), flush=True)

    def plot(self, filename: str = "loss.png", keys: tuple[str, ...] = ("loss", "eval_loss"),
             ylabel: str = "cross-entropy (nats/token)") -> str | None:
        """`keys` (default: loss and eval loss) against step, from every record this run and earlier runs
        wrote; a key is drawn wherever a record has it (with markers when it is sparse)."""
        if not self.enabled:
            return None
        path = os.path.join(self.workdir, "metrics.jsonl")
        records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        by_step = {r["step"]: r for r in records}  # a resumed run rewrites some steps: keep the latest
        steps = sorted(by_step)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            have = [s for s in steps if key in by_step[s]]
            if have:
                ax.plot(have, [by_step[s][key] for s in have], "o-" if len(have) < len(steps) else "-",
                        label=key.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        out = os.path.join(self.workdir, filename)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.close()


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def log_line(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stdout, flush=True)
