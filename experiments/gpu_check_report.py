"""Collects what `experiments/gpu_check.sh` wrote into OUT/gpu_check.md and OUT/gpu_check.json.

    python experiments/gpu_check_report.py OUT

Reads env.txt, flash_tests.log, attention.json and the last JSON line of train_*.log and decode.log; a part
that failed or timed out is reported as missing, with the tail of its log, rather than stopping the report.
Prints the markdown, then one JSON line.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys


def _last_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    for line in reversed(open(path, encoding="utf-8", errors="replace").read().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _tail(path: str, n: int = 3) -> str:
    if not os.path.exists(path):
        return "(no log)"
    return " / ".join(open(path, encoding="utf-8", errors="replace").read().strip().splitlines()[-n:])


def report(out: str) -> tuple[list[str], dict]:
    md, summary = ["# GPU check", ""], {}
    env = open(os.path.join(out, "env.txt")).read().strip() if os.path.exists(os.path.join(out, "env.txt")) else ""
    md += ["```", env, "```", ""]
    summary["env"] = env

    flash = os.path.join(out, "flash_tests.log")
    text = open(flash).read() if os.path.exists(flash) else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text)}
    summary["flash_tests"] = counts
    md += [f"**Flash kernels compiled for the GPU vs the reference:** {counts or _tail(flash)}", ""]

    attention = os.path.join(out, "attention.json")
    if os.path.exists(attention):
        data = json.load(open(attention))
        rows = data["rows"]
        md += [f"**Attention** ({data.get('device_kind')}, causal, head dim 128, bf16; ms and TFLOP/s)", "",
               "| T | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |", "|---|---|---|---|---|---|"]
        fmt = lambda x, spec: format(x, spec) if isinstance(x, float) else str(x)
        for r in rows:
            md.append(f"| {r['seq']} | {r['impl']} | {fmt(r['fwd_ms'], '.3f')} | {fmt(r['fwd_tflops'], '.0f')} | "
                      f"{fmt(r['fwd_bwd_ms'], '.3f')} | {fmt(r['fwd_bwd_tflops'], '.0f')} |")
        ratios = {}
        for seq in sorted({r["seq"] for r in rows}):
            by = {r["impl"]: r for r in rows if r["seq"] == seq}
            if all(isinstance(by.get(i, {}).get("fwd_bwd_ms"), float) for i in ("pallas", "cudnn")):
                ratios[str(seq)] = by["pallas"]["fwd_bwd_ms"] / by["cudnn"]["fwd_bwd_ms"]
        summary["attention"] = {"rows": rows, "pallas_over_cudnn_fwd_bwd_time": ratios}
        if ratios:
            md.append("")
            md.append("Pallas / cuDNN fwd+bwd time: " + ", ".join(f"T={k}: {v:.2f}x" for k, v in ratios.items()))
        md.append("")
    else:
        md += [f"**Attention:** missing ({_tail(os.path.join(out, 'attention.log'))})", ""]

    md += ["**Train step** (JAX, bf16)", "", "| remat | tokens/s | step ms | MFU % | compile s |", "|---|---|---|---|---|"]
    summary["train"] = {}
    for path in sorted(glob.glob(os.path.join(out, "train_*.log"))):
        remat = os.path.basename(path)[len("train_"):-len(".log")]
        data = _last_json(path)
        if data is None:
            md.append(f"| {remat} | missing: {_tail(path, 1)} | | | |")
            continue
        j = data["jax"]
        summary["train"][remat] = {"tokens_per_s": j["tokens_per_s"], "mfu": j["mfu"], "step_s": j["step_s"],
                                   "compile_s": j["compile_s"], "config": data["config"]}
        md.append(f"| {remat} | {j['tokens_per_s']:,.0f} | {1e3 * j['step_s']:.1f} | {100 * j['mfu']:.1f} | "
                  f"{j['compile_s']:.1f} |")
    md.append("")

    decode = _last_json(os.path.join(out, "decode.log"))
    if decode is None:
        md += [f"**Decode:** missing ({_tail(os.path.join(out, 'decode.log'))})"]
    else:
        summary["decode"] = decode
        md += [f"**Decode** ({decode['dtype']}, prompt {decode['prompt_len']}, {decode['new_tokens']} new tokens; "
               f"copy bandwidth {decode['copy_bandwidth'] / 1e9:.0f} GB/s)", "",
               "| batch | tokens/s | ms/step | roofline tokens/s | of roofline |", "|---|---|---|---|---|"]
        for r in decode["rows"]:
            md.append(f"| {r['batch']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
                      f"{r['roofline_tokens_per_s']:,.0f} | {100 * r['fraction_of_roofline']:.0f}% |")
    return md, summary


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu_check"
    md, summary = report(out)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(md))
    print(json.dumps({k: v for k, v in summary.items() if k != "env"}, default=str)[:20000])


if __name__ == "__main__":
    main()
