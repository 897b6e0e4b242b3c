"""Multi-host start-up on JAX's own distributed runtime (`jax.distributed`).

One process per host (per GPU node, per TPU VM) runs the same program; `jax.distributed.initialize`
connects them through a coordinator so that `jax.devices()` lists every device of the job and one mesh
spans them all. Each process then feeds only its own rows of the global batch
(`jax.make_array_from_process_local_data`), and only process 0 writes logs and metrics; Orbax
coordinates checkpoint writes itself.

The coordinator comes from `--coordinator_address / --num_processes / --process_id`, else from the
`JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` environment variables, else — with
`--distributed` — from the cluster's own environment, which JAX detects (SLURM, Open MPI, Cloud TPU pod
slices, GKE). On CPU the collectives run over gloo, so the same code is testable on one machine with
several processes on 127.0.0.1.
"""

from __future__ import annotations

import os

import jax
from absl import flags


def define_flags() -> None:
    """The multi-process flags of an entry point (`python -m maxlm.train ...`)."""
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0's coordinator for a multi-process "
                        "run (default: $JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", 0, "Number of processes in a multi-process run "
                         "(default: $JAX_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", -1, "This process's index in a multi-process run "
                         "(default: $JAX_PROCESS_ID).")
    flags.DEFINE_bool("distributed", False, "Initialise jax.distributed from the cluster environment (SLURM, "
                      "Open MPI, TPU pod slices, GKE) even without a coordinator address.")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               auto: bool = False) -> bool:
    """Start the distributed runtime if a coordinator is given (arguments, then environment) or `auto`.
    Must run before anything touches a device. Returns whether it started."""
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    pid = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if not address and not auto:
        return False
    # CPU processes exchange collectives over gloo (the default CPU client has no cross-process ones).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address or None, num_processes=num or None,
                               process_id=pid if pid >= 0 else None)
    return True


def initialize_from_flags() -> bool:
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id, auto=f.distributed)
