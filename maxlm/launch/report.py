"""A sweep's results: one row per trial (overrides, state, final and best metric, tokens/s, MFU, wall time) as
`results.csv` and `results.md`, and `sweep.png` -- every trial's metric curve overlaid, and the final metric
against each swept value. Everything is read from the trials' own files, so `--report` rebuilds it at any
time, while trials still run or after a scheduler ran them."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from typing import Any

from maxlm.launch.sweep import Plan, Trial, trial_record, trial_state


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in ("loss", "kl", "perplexity", "ppl", "error"))


def _records(workdir: str, trial: Trial) -> list[dict]:
    path = os.path.join(workdir, trial.name, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_step = {}
    for line in open(path, encoding="utf-8"):
        if line.strip():
            r = json.loads(line)
            by_step.setdefault(r["step"], {}).update(r)  # a resumed run rewrites some steps: the latest wins
    return [by_step[s] for s in sorted(by_step)]


def _metric_of(plan: Plan, records: list[dict]) -> str:
    """The plan's metric, or the training loss where no record has it (e.g. a run without evaluation)."""
    return plan.metric if any(plan.metric in r for r in records) else "loss"


def row(plan: Plan, workdir: str, trial: Trial) -> dict[str, Any]:
    records = _records(workdir, trial)
    metric = _metric_of(plan, records)
    values = [r[metric] for r in records if metric in r and math.isfinite(r[metric])]
    best = (min if lower_is_better(metric) else max)(values) if values else float("nan")
    timed = [r for r in records if "tokens_per_sec" in r]
    attempts = trial_record(workdir, trial)["attempts"]
    out = {"trial": trial.name, **{k: trial.overrides.get(k, "") for k in plan.swept_keys()},
           "state": trial_state(workdir, trial), "steps": records[-1]["step"] if records else 0, "metric": metric,
           "final": values[-1] if values else float("nan"), "best": best,
           "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed) if timed else float("nan"),
           "mfu": statistics.median(r["mfu"] for r in timed) if timed else float("nan"),
           "wall_s": sum(a["wall_s"] for a in attempts), "attempts": len(attempts)}
    return out


def trial_summary(plan: Plan, workdir: str, trial: Trial) -> str:
    """', eval_loss 4.21' for a progress line ('' before any metric)."""
    r = row(plan, workdir, trial)
    return f", {r['metric']} {r['final']:.4g}" if math.isfinite(r["final"]) else ""


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(map(str, v)) + ")"
    return str(v)


def write(plan: Plan, workdir: str) -> tuple[list[dict], str]:
    """Write results.csv, results.md and sweep.png under the sweep workdir; returns (rows, markdown)."""
    rows = [row(plan, workdir, t) for t in plan.trials]
    columns = list(rows[0])
    with open(os.path.join(workdir, "results.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) if isinstance(v, (tuple, list)) else v for k, v in r.items()})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    plot(plan, workdir, rows)
    return rows, markdown


def plot(plan: Plan, workdir: str, rows: list[dict]) -> str:
    """sweep.png: the metric against step for every trial, then one panel per swept key with the final
    metric against its value (one line per combination of the other keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = plan.swept_keys()
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(5 * (1 + len(keys)), 4), squeeze=False)
    curves = axes[0][0]
    for trial, r in zip(plan.trials, rows):
        records = [x for x in _records(workdir, trial) if r["metric"] in x]
        if records:
            curves.plot([x["step"] for x in records], [x[r["metric"]] for x in records], "o-" if len(records) < 8
                        else "-", label=trial.name, markersize=3)
    curves.set_xlabel("step")
    curves.set_ylabel(rows[0]["metric"] if rows else "")
    curves.grid(alpha=0.3)
    if plan.trials:
        curves.legend(fontsize=7)
    for ax, key in zip(axes[0][1:], keys):
        others = [k for k in keys if k != key]
        groups: dict[tuple, list[tuple[Any, float]]] = {}
        for r in rows:
            if r[key] != "" and math.isfinite(r["final"]):
                groups.setdefault(tuple(_cell(r[k]) for k in others), []).append((r[key], r["final"]))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for g in groups.values() for v, _ in g)
        labels = sorted({_cell(v) for g in groups.values() for v, _ in g})
        for group, points in groups.items():
            points.sort(key=lambda p: p[0] if numeric else labels.index(_cell(p[0])))
            xs = [p[0] if numeric else labels.index(_cell(p[0])) for p in points]
            name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, group)) or None
            ax.plot(xs, [p[1] for p in points], "o-", label=name)
        if numeric:
            values = sorted({v for g in groups.values() for v, _ in g})
            if values and min(values) > 0 and max(values) / min(values) >= 3:
                ax.set_xscale("log")
                ax.minorticks_off()
            ax.set_xticks(values, [_cell(float(v)) for v in values])  # the swept values themselves
        else:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {rows[0]['metric']}" if rows else "")
        ax.grid(alpha=0.3)
        if any(n for n in groups) and others:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(workdir, "sweep.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
