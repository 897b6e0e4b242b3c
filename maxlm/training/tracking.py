"""Weights & Biases beside TensorBoard and metrics.jsonl (`train.wandb_project`; the `wandb` extra).

The run logs the same scalars at the same steps, the whole config, and the samples a stage prints at its end.
W&B run ids are kept in `<workdir>/wandb_id`: a resumed run -- and every stage of a staged run -- continues
the one W&B run of its workdir rather than starting another (W&B drops points at steps it has already seen,
as when a run resumes from a checkpoint older than its last log line). `WANDB_MODE=offline` writes the run
under `<workdir>/wandb` without a network; `wandb sync` uploads it later. `maxlm.sweep` sets the group (one
per sweep) and the name (the trial), so a sweep's trials sit together in the W&B UI.
"""

from __future__ import annotations

import os
import secrets
import string
from typing import Any

import ml_collections


class WandbRun:
    """One W&B run for a workdir (process 0 only: `MetricsWriter` creates it)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, stage: str = ""):
        import wandb  # an optional extra: imported only when a project is configured

        self._wandb = wandb
        t = config.train
        id_path = os.path.join(workdir, "wandb_id")
        if os.path.exists(id_path):
            run_id = open(id_path, encoding="utf-8").read().strip()
        else:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            with open(id_path, "w", encoding="utf-8") as f:
                f.write(run_id + "\n")
        self.run = wandb.init(project=t.wandb_project, entity=t.wandb_entity or None, group=t.wandb_group or None,
                              name=t.wandb_name or os.path.basename(os.path.abspath(workdir)), id=run_id,
                              resume="allow", dir=workdir, job_type=stage or None, config=config.to_dict(),
                              settings=wandb.Settings(quiet=True, console="off"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=int(step))

    def table(self, key: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]], step: int) -> None:
        self.run.log({key: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=int(step))

    def close(self) -> None:
        self.run.finish()
