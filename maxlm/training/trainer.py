"""The one trainer under every stage: a pure jitted step, the sharded state, and the loop.

Pretraining, SFT (full or LoRA), the reward model and PPO -- and the stages to come -- each supply an
`Objective` (the loss, the tree it trains, the trees it holds frozen, where its policy sits) and a `Feed`
(where batches come from: a data iterator, or a collect phase such as PPO's rollouts). Everything else is
here, once: one step counter and learning-rate schedule, metrics / TensorBoard / progress with ETA, async
atomic checkpoints, SIGTERM / SIGINT save-and-exit-0, bad-step skip and reload, exact resume (the feed's
position is checkpointed beside the parameters), multi-host (Levanter's one-`Trainer`-with-hooks design).

The step is `(state, batch) -> (state, metrics)` with `state = {"step", "params", "opt_state"[, "frozen"]}`
donated to jit. A loss returns sums -- `(sum of per-item losses, {"weight": items covered, other sums})` --
so that micro-batches and hosts add up exactly and the step divides once by the global weight.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from maxlm import config as config_lib
from maxlm import data
from maxlm.model import lora, pipeline, quant, trees
from maxlm.training import checkpoint as checkpoint_lib
from maxlm.training import optim, profiling, sharding
from maxlm.training import workdir as workdir_lib
from maxlm.training.metrics import MetricsWriter, format_bytes, log_line, peak_flops_per_device

State = dict[str, Any]
Batch = dict[str, jax.Array]
# (params, config, batch, frozen trees: a dict, {} when none) -> (sum of per-example losses, sums:
# {"weight": the number of examples or tokens they cover, other metrics as sums}).
LossFn = Callable[[Any, ml_collections.ConfigDict, Batch, dict], tuple[jax.Array, dict[str, jax.Array]]]


def _no_frozen(config: ml_collections.ConfigDict) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a stage optimises.

    name: the stage, recorded in every checkpoint it writes ("pretrain", "sft", "reward", "ppo", ...).
    loss: a `LossFn`; it receives the frozen trees as its last argument.
    params: the trained tree's layout (`maxlm.trees`): its shapes, logical axes and checkpoint format.
    init: random parameters of that layout (a run from scratch).
    frozen: config -> {name: layout} of trees held fixed beside the parameters -- a LoRA base, PPO's
        reference policy and reward model. They are sharded like parameters, passed to the loss, never
        differentiated nor checkpointed (the stage loads them again on resume).
    policy: where a language-model policy sits in the trained tree: "" the tree itself, "actor" a member
        of it, None for trees that are not policies (a reward model); `maxlm.pretrained.load_workdir`
        follows it, so sampling, evaluation and export work on every stage's workdir.
    """
    name: str
    loss: LossFn
    params: trees.Layout
    init: Callable[[ml_collections.ConfigDict, jax.Array], Any]
    frozen: Callable[[ml_collections.ConfigDict], dict] = _no_frozen
    policy: str | None = ""


def train_step(config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation, loss: LossFn,
               state: State, batch: Batch, grad_shardings: Any = None, opt_device_shardings: Any = None
               ) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer update, accumulating gradients over `optim.grad_accum_steps` micro-batches.

    `grad_shardings` pins the layout of the (accumulated) gradients: sharded over fsdp for ZeRO-2/3,
    which makes the data-parallel gradient reduction a reduce-scatter; whole for ZeRO-1 (all-reduce).

    `state["frozen"]` (when present) is passed through unchanged and never differentiated.

    `opt_device_shardings` (optimizer offload): the optimizer state arrives in host memory and is brought to
    the device with these shardings for the update; the step's output shardings send it back.

    A bad step -- non-finite loss or gradient norm -- keeps parameters and optimizer state as they were
    (the step counter still advances: its batch is consumed) and reports `bad_step` = 1, so one spike
    costs one batch, not the run (the loop reloads a checkpoint after `train.max_bad_steps` in a row).
    """
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    params = state["params"]
    frozen = state.get("frozen", {})
    accum = config.optim.grad_accum_steps

    def pin(grads):
        return grads if grad_shardings is None else jax.lax.with_sharding_constraint(grads, grad_shardings)

    def micro_step(carry, micro_batch):
        (loss_sum, sums), grads = grad_fn(params, config, micro_batch, frozen)
        return jax.tree.map(jnp.add, carry, (pin(grads), loss_sum, sums)), None

    micro_batches = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    shapes = jax.eval_shape(lambda b: loss(params, config, b, frozen), jax.tree.map(lambda x: x[0], micro_batches))
    zeros = (pin(jax.tree.map(jnp.zeros_like, params)), *jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes))
    (grads, loss_sum, sums), _ = jax.lax.scan(micro_step, zeros, micro_batches)
    tokens = sums["weight"]
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    if config.train.inject_nan_at:
        poisoned = jnp.isin(state["step"] + 1, jnp.asarray(config.train.inject_nan_at))
        grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)
    grad_norm = optax.global_norm(grads)
    good = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    old_opt = state["opt_state"]
    if opt_device_shardings is not None:
        old_opt = jax.device_put(old_opt, opt_device_shardings)
    updates, opt_state = optimizer.update(grads, old_opt, params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(good, n, o), new, old)
    new_state = {"step": state["step"] + 1, "params": keep(optax.apply_updates(params, updates), params),
                 "opt_state": keep(opt_state, old_opt)}
    if "frozen" in state:
        new_state["frozen"] = state["frozen"]
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "lr": optim.schedule(config)(state["step"]),
               "tokens": tokens, "bad_step": 1.0 - good.astype(jnp.float32),
               **{k: v / denom for k, v in sums.items() if k != "weight"}}
    return new_state, metrics


def _with_frozen(trained: State, frozen: dict | None) -> State:
    return trained if frozen is None else {**trained, "frozen": frozen}


def _without_frozen(out: tuple[State, dict]) -> tuple[State, dict]:
    state, metrics = out
    return {k: v for k, v in state.items() if k != "frozen"}, metrics


class Trainer:
    """Builds the mesh, the sharded state and the jitted step of an `Objective` (everything but the loop).

    Trainable parameters are sharded by their layout's logical axes at the ZeRO stage; frozen trees are
    laid out like parameters (not copied per device: a frozen base is the largest thing in memory).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                 objective: Objective | None = None):
        if objective is None:
            raise TypeError("Trainer needs an objective (maxlm.train.Trainer defaults to language modelling)")
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config)
        self.objective = objective
        self.lora = objective.params == "lora"
        logical = trees.logical_axes(config, objective.params)
        abstract_params = trees.abstract(config, objective.params)
        self.optimizer = optim.make_optimizer(config, abstract_params)
        param_sh, self.grad_shardings = sharding.zero_shardings(config, self.mesh, logical)
        abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
        opt_sh = optax.tree_map_params(self.optimizer, lambda _, s: s, abstract_opt,
                                       sharding.param_shardings(config, self.mesh, logical=logical),
                                       transform_non_params=lambda _: sharding.replicated(self.mesh))
        opt_device_sh = None
        if config.optim.offload:  # the optimizer state in host memory between steps
            opt_device_sh, opt_sh = opt_sh, sharding.in_host_memory(opt_sh, self.mesh)
        self.state_shardings = {"step": sharding.replicated(self.mesh), "params": param_sh, "opt_state": opt_sh}
        abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": abstract_opt}
        self.frozen_layouts = objective.frozen(config)
        frozen_sh = None
        if self.frozen_layouts:
            frozen_sh = self.state_shardings["frozen"] = {
                name: sharding.zero_shardings(config, self.mesh, trees.logical_axes(config, layout))[0]
                for name, layout in self.frozen_layouts.items()}
            abstract["frozen"] = {name: trees.abstract(config, layout) for name, layout in self.frozen_layouts.items()}
        self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           abstract, self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(config, self.mesh)
        self._compiled = None
        self._call_compiled = True
        with sharding.activation_rules(config, self.mesh):
            step = functools.partial(train_step, config, self.optimizer, objective.loss,
                                     grad_shardings=self.grad_shardings, opt_device_shardings=opt_device_sh)
            trained_sh = {k: v for k, v in self.state_shardings.items() if k != "frozen"}
            # The frozen trees are an argument of their own, neither donated nor returned: they never change.

            def trained_step(trained: State, frozen: dict | None, batch: Batch) -> tuple[State, dict]:
                return _without_frozen(step(_with_frozen(trained, frozen), batch))

            self._step = jax.jit(trained_step,
                                 in_shardings=(trained_sh, frozen_sh, self.batch_sharding),
                                 out_shardings=(trained_sh, sharding.replicated(self.mesh)),
                                 donate_argnums=0)
            self._eval = jax.jit(lambda params, frozen, batch: objective.loss(params, config, batch, frozen or {}),
                                 in_shardings=(param_sh, frozen_sh, self.batch_sharding))

    def place_frozen(self, frozen: dict) -> dict:
        """Host (or device) frozen trees -> placed with their shardings (every declared tree required)."""
        missing = set(self.frozen_layouts) - set(frozen)
        if missing:
            raise ValueError(f"the {self.objective.name} objective needs the frozen trees {sorted(missing)}")
        # Copies, never aliases: the state is donated to the step, and a frozen tree sharing a buffer with the
        # parameters or with another frozen tree (a reference policy that is also the actor's start) would
        # be donated twice.
        out = {}
        for name, layout in self.frozen_layouts.items():
            shardings = self.state_shardings["frozen"][name]
            tree = frozen[name]
            if trees.needs_prepare(layout):  # e.g. QLoRA's base: quantised here, unless it already is
                # A copy made by a computation, not `device_put`: a device_put int4 array carries an explicit
                # layout that the compiled, donating step refuses (jax 0.10 on CPU).
                prepare = (lambda t: jax.tree.map(jnp.copy, t)) if quant.any_quantized(tree) else \
                    functools.partial(trees.prepare, self.config, layout)
                with sharding.activation_rules(self.config, self.mesh):
                    out[name] = jax.jit(prepare, out_shardings=shardings)(tree)
            else:
                out[name] = jax.device_put(tree, shardings, may_alias=False)
        return out

    def init_state(self, rng: jax.Array, params: Any = None, base: dict | None = None,
                   frozen: dict | None = None) -> State:
        """Fresh optimizer state and parameters, created directly with their shardings: `params` when given
        (fine-tuning), else random ones; `frozen` holds the objective's frozen trees (`base`: LoRA's)."""
        if base is not None:
            frozen = {**(frozen or {}), "base": base}
        if params is not None:
            params = jax.device_put(params, self.state_shardings["params"])

        def make(rng, params):
            if params is None:
                params = self.objective.init(self.config, rng)
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.optimizer.init(params)}

        shardings = {k: v for k, v in self.state_shardings.items() if k != "frozen"}
        with sharding.activation_rules(self.config, self.mesh):
            state = jax.jit(make, out_shardings=shardings)(rng, params)
        if self.frozen_layouts:
            state["frozen"] = self.place_frozen(frozen or {})
        return state

    def device_batch(self, local: dict[str, np.ndarray]) -> Batch:
        return sharding.global_batch(local, self.batch_sharding)

    def compile(self, state: State, batch: Batch) -> None:
        """Compile the step ahead of time, so that step timings never include compilation."""
        self._compiled = self.lower(state, batch).compile()
        # XLA:CPU wants int4 arguments packed two to a byte but makes int4 arrays unpacked, and a compiled
        # executable refuses committed arguments in another layout; the jitted step lays them out itself.
        wanted = jax.tree.leaves(self._compiled.input_formats[0][1])
        have = jax.tree.leaves(state.get("frozen"))
        self._call_compiled = all(getattr(a, "format", None) is None or a.format.layout == f.layout
                                  for a, f in zip(have, wanted))

    def memory_report(self) -> dict[str, float]:
        """Bytes per device: parameters, optimizer state and gradients from their shardings; XLA's
        compiled-memory analysis of the step (arguments, outputs, temporaries = activations and other
        scratch) once `compile` has run; beside the practitioners' estimate of 16 bytes per parameter
        (weights, gradients and AdamW's two moments, as in the ZeRO paper's mixed-precision count)
        divided by the parameter-sharding degree fsdp x tensor x pipeline (the layers are split over the
        pipeline's stages; the embeddings, a small share, are not)."""
        params = self.abstract_state["params"]
        grads = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                             self.grad_shardings)
        report = {"params": sharding.bytes_per_device(params),
                  "opt_state": sharding.bytes_per_device(self.abstract_state["opt_state"]),
                  "grads": sharding.bytes_per_device(grads)}
        for name, tree in self.abstract_state.get("frozen", {}).items():
            report[f"frozen_{name}"] = sharding.bytes_per_device(tree)
        degree = self.mesh.shape["fsdp"] * self.mesh.shape["tensor"] * self.mesh.shape["pipeline"]
        report["estimate_16B_per_param"] = sharding.estimate_16b_per_param(self.config, degree)
        if self._compiled is not None:
            analysis = self._compiled.memory_analysis()
            if analysis is not None:
                report.update(arguments=analysis.argument_size_in_bytes, outputs=analysis.output_size_in_bytes,
                              temporaries=analysis.temp_size_in_bytes)
                if analysis.host_argument_size_in_bytes:  # optim.offload: what lives in host memory
                    report.update(host_arguments=analysis.host_argument_size_in_bytes,
                                  host_temporaries=analysis.host_temp_size_in_bytes)
        return report

    def lower(self, state: State, batch: Batch) -> jax.stages.Lowered:
        """The jitted step lowered for `state` and `batch` (arrays or sharded ShapeDtypeStructs)."""
        trained = {k: v for k, v in state.items() if k != "frozen"}
        with sharding.activation_rules(self.config, self.mesh):
            return self._step.lower(trained, state.get("frozen"), batch)

    def step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        trained, frozen = {k: v for k, v in state.items() if k != "frozen"}, state.get("frozen")
        if self._compiled is not None and self._call_compiled:
            new, metrics = self._compiled(trained, frozen, batch)
        else:
            with sharding.activation_rules(self.config, self.mesh):
                new, metrics = self._step(trained, frozen, batch)
        return _with_frozen(new, frozen), metrics

    def evaluate(self, state: State, batches: list[Batch]) -> dict[str, float]:
        """The objective on held-out batches: {"loss": ..., and its other metrics}, each a mean over the
        total weight of all the batches (tokens, or examples), not a mean of per-batch means."""
        with sharding.activation_rules(self.config, self.mesh):
            outs = [self._eval(state["params"], state.get("frozen"), b) for b in batches]
        loss_sum = sum(float(s) for s, _ in outs)
        sums = {k: sum(float(o[1][k]) for o in outs) for k in outs[0][1]} if outs else {"weight": 0.0}
        denom = max(sums.pop("weight"), 1.0)
        return {"loss": loss_sum / denom, **{k: v / denom for k, v in sums.items()}}

    def eval_loss(self, state: State, batches: list[Batch]) -> float:
        return self.evaluate(state, batches)["loss"]


# ----------------------------------------------------------------------------------------------------------
# Feeds: where the loop's batches come from.


class Feed:
    """The loop's source of host batches, and the position it checkpoints.

    `next(state)` returns this host's rows of the next batch; a feed with a collect phase (PPO's rollouts)
    runs it there, with the current parameters. `boundary` says whether the position is resumable now:
    the loop saves, stops on a signal and logs only at boundaries (a data iterator is always at one; PPO
    is at one between iterations, so a stop finishes the iteration's updates -- without new rollouts --
    before saving). `get_state` is a collective on multi-host runs (every process calls it).
    """
    boundary = True
    stats: dict = {}

    def next(self, state: State) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def get_state(self) -> dict:
        raise NotImplementedError

    def set_state(self, state: dict) -> None:
        raise NotImplementedError

    def discard(self) -> bool:
        """After a bad-step reload: drop anything made from the discarded parameters; True when the batch
        already fetched must be fetched again."""
        return False

    def log_record(self) -> dict[str, float]:
        """Host metrics for the log line at a boundary (e.g. a collect phase's rewards)."""
        return {}


class BatchFeed(Feed):
    """A data iterator (`next()`, `get_state`, `set_state`, `stats`) as a feed: pretraining, SFT, RM."""

    def __init__(self, iterator: Any):
        self.iterator = iterator

    @property
    def stats(self) -> dict:
        return getattr(self.iterator, "stats", {})

    def next(self, state: State) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict:
        return data.gather_state(self.iterator)

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    def log_record(self) -> dict[str, float]:
        return {"data_skipped": float(sum(v for k, v in self.stats.items() if k.startswith("skipped")))}


# ----------------------------------------------------------------------------------------------------------
# The loop


def host_params(config: ml_collections.ConfigDict, state: State) -> Any:
    """The full parameters (LoRA: adapters merged into the frozen base) as host arrays; a collective on
    multi-host runs (every process must call it)."""
    params = state["params"]
    base = state.get("frozen", {}).get("base")
    if base is not None:
        params = jax.jit(lambda b, a: quant.dense(lora.merge(config, b, a), config.model.param_dtype))(base, params)
    return (multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1
            else jax.device_get(params))


def _crossed(every: int, before: int, after: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return bool(every) and after // every > before // every


def run(config: ml_collections.ConfigDict, workdir: str, trainer: Trainer, feed: Any, *,
        init_state: Callable[[], State], frozen: dict | None = None, eval_batches: list[Batch] = (),
        evaluate: Callable[[State], dict[str, float]] | None = None, eval_at_start: bool = False,
        finish: Callable[[State], dict | None] | None = None, stage_start: int = 0,
        plot: tuple[str, tuple[str, ...], str] | None = None, progress_keys: tuple[str, ...] = ()
        ) -> list[dict[str, float]]:
    """The training loop of every stage: resume or `init_state()`, step to `train.num_steps` with logging,
    evaluation, checkpoints, signal handling and bad-step recovery, then `finish(state)` (samples, scores).
    Returns the metrics records logged by this invocation.

    feed: a `Feed`, or a plain data iterator. frozen: the objective's frozen trees (placed), added back to a
        restored state. evaluate: state -> {metric: value} when `train.eval_every` is due (default: the
        objective on `eval_batches`, logged as eval_*); eval_at_start: also at step 0 of a fresh run.
    finish: state -> None, or {key: (columns, rows)} tables of text (samples) that are logged beside the
        metrics (TensorBoard text, W&B tables) at the last step.
    plot: (file name, metric keys, y label) of the curves drawn at the end (default: the loss).
    stage_start > 0: this is a later stage of a staged run. A checkpoint at exactly that step is the
        previous stage's end: its parameters and optimizer state are resumed, its data position (another
        iterator's) is not. A checkpoint before it means the previous stage is unfinished: nothing is run.
    """
    if not isinstance(feed, Feed):
        feed = BatchFeed(feed)
    if evaluate is None and eval_batches:
        evaluate = lambda s: {f"eval_{k}": v for k, v in trainer.evaluate(s, eval_batches).items()}  # noqa: E731
    frozen = frozen or {}
    with workdir_lib.hold(workdir):
        return _run(config, workdir, trainer, feed, init_state=init_state, frozen=frozen, evaluate=evaluate,
                    eval_at_start=eval_at_start, finish=finish, stage_start=stage_start, plot=plot,
                    progress_keys=progress_keys)


def _run(config: ml_collections.ConfigDict, workdir: str, trainer: Trainer, feed: Feed, *,
         init_state: Callable[[], State], frozen: dict, evaluate: Callable[[State], dict[str, float]] | None,
         eval_at_start: bool, finish: Callable[[State], dict | None] | None, stage_start: int,
         plot: tuple[str, tuple[str, ...], str] | None, progress_keys: tuple[str, ...]) -> list[dict[str, float]]:
    primary = jax.process_index() == 0
    log_line(f"mesh {dict(trainer.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    pipe = pipeline.from_config(config)
    if pipe is not None:
        rows = config.data.batch_size // config.optim.grad_accum_steps
        pipe = pipe.for_batch(rows)
        log_line(pipe.describe())
        degree = sharding.batch_degree(config, trainer.mesh)
        if (rows // pipe.microbatches) % degree:
            log_line(f"warning: a pipeline micro-batch of {rows // pipe.microbatches} row(s) does not split over the "
                     f"{degree} data-parallel ranks, so each stage's activations are re-laid out every iteration: "
                     f"use fewer train.microbatches or a larger batch")
    ckpt = checkpoint_lib.Checkpointer(workdir, config, stage=trainer.objective.name,
                                       layout=trainer.objective.params, policy=trainer.objective.policy)

    def check(step: int, saved: ml_collections.ConfigDict, meta: dict) -> None:
        # At or before a later stage's start the checkpoint is an earlier stage's: stage keys may differ.
        workdir_lib.check_resume(saved, meta.get("stage", ""), config, trainer.objective.name, workdir,
                                 stage_boundary=0 < stage_start and step <= stage_start)

    try:
        restored = restore(ckpt, trainer, frozen, check)
    except BaseException:
        ckpt.close()
        raise
    if restored is not None:
        state, data_state = restored
        resumed = int(state["step"])
        if resumed < stage_start:
            log_line(f"the newest usable checkpoint, step {resumed}, is before this stage's start {stage_start}")
            ckpt.close()
            return []
        if resumed > stage_start or stage_start == 0:
            feed.set_state(data_state)
            log_line(f"resumed from step {resumed} ({ckpt.directory})")
        else:
            log_line(f"starting the stage from step {resumed}'s parameters and optimizer state, with fresh data")
    elif stage_start > 0:
        raise FileNotFoundError(f"stage starting at step {stage_start}: no checkpoint under {ckpt.directory}")
    else:
        state = init_state()
    start = int(state["step"])

    writer = MetricsWriter(workdir, enabled=primary, config=config, stage=trainer.objective.name)
    profiler = profiling.StepProfiler(config, workdir)
    flops_per_step = config_lib.flops_per_token(config, config.data.seq_len) * config.data.seq_len \
        * config.data.batch_size
    peak = peak_flops_per_device(config.train.peak_tflops) * jax.device_count()
    total = config.train.num_steps
    step = start
    if start == 0 and eval_at_start and evaluate is not None:
        writer.write(0, evaluate(state))
    if start < total:
        batch = trainer.device_batch(feed.next(state))
        t0 = time.perf_counter()
        trainer.compile(state, batch)
        log_line(f"compiled the train step in {time.perf_counter() - t0:.1f}s; training steps {start + 1}..{total}")
        memory = trainer.memory_report()
        log_line("memory per device: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in memory.items())
                 + f" (zero_stage {config.mesh.zero_stage})")
        if primary:
            with open(os.path.join(workdir, "memory.json"), "w") as f:
                json.dump(memory, f, indent=1)
    run_start = interval_start = time.perf_counter()
    interval_first = last_saved = last_eval = start
    interval_sum = None  # metrics summed on device since the last log line (no host sync per step)
    bad_streak = reloads = 0
    stopping = None
    with _StopSignals() as stop:
        while step < total:
            with profiler.step(step + 1):
                state, metrics = trainer.step(state, batch)
            profiler.after(step + 1, state)
            interval_sum = metrics if interval_sum is None else jax.tree.map(jnp.add, interval_sum, metrics)
            step += 1
            stopping = stopping or stop.requested  # read once: a signal may land at any point of this iteration
            at_boundary = feed.boundary
            if at_boundary and (_crossed(config.checkpoint.every_steps, last_saved, step) or step == total
                                or stopping):
                ckpt.save(step, state["params"], state["opt_state"], feed.get_state())
                last_saved = step
            log_due = at_boundary and (_crossed(config.train.log_every, interval_first, step) or step == total
                                       or stopping)
            feed_record = feed.log_record() if log_due else {}  # before the next batch starts a new collect
            if step < total and not (stopping and at_boundary):
                batch = trainer.device_batch(feed.next(state))  # host work overlaps the device's step
            if log_due:
                n = step - interval_first
                record = {k: float(v) / n for k, v in jax.device_get(interval_sum).items()}
                record["bad_steps"] = round(record.pop("bad_step") * n)
                record["lr"] = float(metrics["lr"])
                now = time.perf_counter()
                step_time = (now - interval_start) / n
                record["tokens_per_sec"] = config.data.seq_len * config.data.batch_size / step_time
                record["mfu"] = flops_per_step / step_time / peak
                record["step_time"] = step_time
                record["reloads"] = reloads
                record.update(feed_record)
                if evaluate is not None and (_crossed(config.train.eval_every, last_eval, step) or step == total):
                    record.update(evaluate(state))
                    last_eval = step
                writer.write(step, record)
                eta = (now - run_start) / max(step - start, 1) * (total - step)
                writer.progress(step, total, record, eta_seconds=eta, extra=progress_keys)
                interval_start, interval_first, interval_sum = time.perf_counter(), step, None
            if stopping and at_boundary:
                log_line(f"{stopping}: saved step {step}; waiting for the checkpoint, then exiting")
                break
            bad_streak = bad_streak + 1 if float(metrics["bad_step"]) else 0
            if config.train.max_bad_steps and bad_streak >= config.train.max_bad_steps:
                restored = restore(ckpt, trainer, state.get("frozen", {}), check)
                if restored is None:
                    raise RuntimeError(f"{bad_streak} non-finite steps in a row and no checkpoint to go back to")
                state = restored[0]
                log_line(f"{bad_streak} non-finite steps in a row at step {step}: reloaded step "
                         f"{int(state['step'])}, continuing with the next data")
                step, bad_streak, reloads = int(state["step"]), 0, reloads + 1
                last_saved = last_eval = step
                if feed.discard() and step < total:
                    batch = trainer.device_batch(feed.next(state))
                interval_start, interval_first, interval_sum = time.perf_counter(), step, None
    profiler.stop(state)
    ckpt.close()
    if step > start:
        if primary:
            name, keys, ylabel = plot or ("loss.png", ("loss", "eval_loss"), "cross-entropy (nats/token)")
            png = writer.plot(name, keys=keys, ylabel=ylabel)
            log_line(f"curves: {png}; metrics: {os.path.join(workdir, 'metrics.jsonl')}; data: {feed.stats}")
        if finish is not None:
            for key, (columns, rows) in (finish(state) or {}).items():
                writer.text(key, columns, rows, step)
    writer.close()
    if primary:
        _write_status(workdir, trainer.objective.name, step, total)
    return writer.history


def _write_status(workdir: str, stage: str, step: int, total: int) -> None:
    """`<workdir>/status.json`: where this invocation left the run -- `complete` once it reached
    `train.num_steps` (a signal stops earlier, exit status 0 all the same). Orchestrators (`maxlm.sweep`)
    read it to tell a finished run from one to resume. Written atomically."""
    workdir_lib.write_json_atomic(os.path.join(workdir, "status.json"), {
        "stage": stage, "step": step, "num_steps": total, "complete": step >= total, "time": time.time()})


def restore(ckpt: checkpoint_lib.Checkpointer, trainer: Trainer, frozen: dict,
            check: Callable[[int, ml_collections.ConfigDict, dict], None] | None = None
            ) -> tuple[State, dict] | None:
    """(state, feed state) of the newest usable checkpoint, laid out for this trainer's mesh, or None;
    `check` may refuse a checkpoint of another run (`Checkpointer.restore_latest`)."""
    restored = ckpt.restore_latest(trainer.abstract_state["params"], trainer.abstract_state["opt_state"], check)
    if restored is None:
        return None
    params, opt_state, meta = restored
    step = jax.device_put(jnp.asarray(meta["step"], jnp.int32), trainer.state_shardings["step"])
    state = {"step": step, "params": params, "opt_state": opt_state}
    if trainer.frozen_layouts:
        state["frozen"] = frozen
    return state, meta["data"]


class _StopSignals:
    """SIGTERM / SIGINT (preemption, Ctrl-C) request a clean stop: the loop saves at the next resumable
    step boundary, waits for the checkpoint and returns, so the process exits 0 and a rerun resumes there.
    A second Ctrl-C aborts at once (the newest complete checkpoint stays valid)."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting for the save
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
