"""The README's memory table: `python -m maxlm.aot` for each model on each TPU slice, compiled on this CPU.

    pip install -e '.[tpu]'
    python experiments/aot_table.py [--configs=llama_1b,llama2_7b] [--topologies=v5e-8,v5p-8]

Every row is one run of the stable command (a subprocess, so each starts clean), with the state sharded over
every chip (`--config.mesh.data=1 --config.mesh.fsdp=-1`, ZeRO-3) and the Pallas flash kernels; the remat
policy is each config's own. When a config's micro-batch does not fit, `maxlm.aot` reports the largest
power-of-two micro-batch per rank that does, with the gradient accumulation that keeps the configured batch.
Prints a markdown table, then one JSON line with every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("llama_1b", "llama2_7b", "internlm2_7b", "llama2_70b")
TOPOLOGIES = ("v5e-8", "v5p-8", "v6e-8", "v5p-128")
GiB = 1024 ** 3


def row(config: str, topology: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "maxlm.aot", f"--config=configs/{config}.py", f"--topology={topology}",
           "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.model.attention_impl=pallas", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_STDERR_LOG_LEVEL": "3", "TPU_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"{' '.join(cmd)} printed no JSON (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out.update(config=config, exit_code=proc.returncode, wall_seconds=time.perf_counter() - start)
    return out


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | slice (chips) | fits | compiled GiB/chip | 16 B/param GiB/chip | ratio | micro-batch/rank x accum "
             "| remat | ZeRO | roofline bound | MFU <= |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ranks = r["chips"]
        micro = r["batch_size"] // r["grad_accum_steps"] // ranks
        lines.append(
            f"| {r['config']} | {r['topology']} ({r['chips']}) | {'yes' if r['fits'] else '**no**'} | "
            f"{r['compiled_bytes_per_chip'] / GiB:.1f} / {r['hbm_bytes_per_chip'] / GiB:.0f} | "
            f"{r['estimate_16B_per_param_bytes'] / GiB:.1f} | {r['compiled_bytes_per_chip'] / r['estimate_16B_per_param_bytes']:.2f} | "
            f"{micro} x {r['grad_accum_steps']} | {r['remat_policy']} | {r['zero_stage']} | "
            + (f"{r['bound']} | {100 * r['estimated_mfu']:.0f}% |" if r["fits"] else "- | - |"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("extra", nargs="*", help="more flags for maxlm.aot, after --")
    args = parser.parse_args()
    rows = []
    for config in args.configs.split(","):
        for topology in args.topologies.split(","):
            rows.append(row(config, topology, args.extra))
            r = rows[-1]
            print(f"{config} on {topology}: fits={r['fits']} {r['compiled_bytes_per_chip'] / GiB:.1f} GiB/chip "
                  f"({r['wall_seconds']:.0f} s)", flush=True)
    print("\n".join(table(rows)), flush=True)
    print(json.dumps({"rows": rows}), flush=True)


if __name__ == "__main__":
    main()
