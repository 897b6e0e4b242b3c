"""XProf traces of chosen training steps (`train.profile_steps=(first, last)`).

The trace starts before step `first` is dispatched and stops once step `last` has finished on the devices
(steps are dispatched asynchronously, so stopping earlier would cut the device timeline short). Each step is
wrapped in a `StepTraceAnnotation`, which is what XProf's step-time view groups by. The trace lands in
`<workdir>/tensorboard/plugins/profile/<timestamp>/<host>.xplane.pb` -- beside the TensorBoard scalars, so
`tensorboard --logdir <workdir>/tensorboard` (with the profile plugin) or `xprof --logdir ...` opens both.
Skip the first steps: step 1 of an invocation pays for compilation-adjacent work (autotuning, first
transfers) that says nothing about the steady state.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import jax
import ml_collections

from maxlm.training.metrics import log_line


class StepProfiler:
    """Starts and stops `jax.profiler` around the configured steps; a no-op when none are configured."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.first, self.last = tuple(config.train.profile_steps) or (0, -1)
        self.logdir = os.path.join(workdir, "tensorboard")
        self.active = False

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around the dispatch of `step` (1-based): starts the trace at the first profiled step."""
        if not self.active and self.first <= step <= self.last:
            jax.profiler.start_trace(self.logdir)
            self.active = True
            log_line(f"profiling steps {step}..{self.last} into {self.logdir}")
        if self.active:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                yield
        else:
            yield

    def after(self, step: int, state: Any) -> None:
        """After `step` was dispatched: at the last profiled step, wait for the devices and write the trace."""
        if self.active and step >= self.last:
            self.stop(state)

    def stop(self, state: Any) -> None:
        """Write the trace now (the loop ended inside the profiled range: a signal, a short run)."""
        if not self.active:
            return
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        log_line(f"profile written under {os.path.join(self.logdir, 'plugins', 'profile')}")
