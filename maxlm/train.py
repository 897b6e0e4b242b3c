"""Pretraining: a pure jitted train step and the loop that owns data, logging and checkpoints.

    python -m maxlm.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.num_steps=N ...]

Logged `loss`, `grad_norm` and `tokens` are means over the steps since the previous log line (as Hugging
Face's Trainer reports them); `lr` is the rate of the last of those steps. Rerunning the same command
resumes from the newest checkpoint in the workdir, data position included, so the resumed run computes
exactly the steps an uninterrupted run would have. A config with `train.stages` (InternLM2's 4k -> 32k)
trains stage by stage, each resuming the previous one's checkpoint (see `train`).

The step is `(state, batch) -> (state, metrics)` with `state = {"step", "params", "opt_state"}` donated to
jit. The loss is the mean cross-entropy over the *real* target tokens of the whole global batch (sum of
per-token losses / number of weighted tokens), so gradient accumulation over micro-batches gives the same
gradient as one large batch, however the padding falls.
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
from absl import flags
from jax.experimental import multihost_utils

from maxlm import checkpoint as checkpoint_lib
from maxlm import cli, data, distributed, lora, model, optim, sharding
from maxlm import config as config_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.metrics import MetricsWriter, format_bytes, log_line, peak_flops_per_device

State = dict[str, Any]
Batch = dict[str, jax.Array]
# (params, config, batch, frozen base or None) -> (sum of per-example losses, sums: {"weight": the number of
# examples or tokens they cover, other metrics as sums}): sums, so that micro-batches and hosts add up exactly.
LossFn = Callable[[dict, ml_collections.ConfigDict, Batch, Any], tuple[jax.Array, dict[str, jax.Array]]]


def loss_fn(params: dict, config: ml_collections.ConfigDict, batch: Batch, base: dict | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token cross-entropies, sum of weights) for one (micro-)batch.

    With a frozen `base`, `params` are LoRA adapters, merged into it for the forward pass.
    """
    if base is not None:
        params = lora.merge(config, base, params)
    logits = model.apply(config, params, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weights = batch["loss_weights"].astype(jnp.float32)
    return jnp.sum(ce * weights), jnp.sum(weights)


def lm_loss(params: dict, config: ml_collections.ConfigDict, batch: Batch, base: dict | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`loss_fn` in the `LossFn` shape: the weight is the number of target tokens."""
    loss_sum, tokens = loss_fn(params, config, batch, base)
    return loss_sum, {"weight": tokens}


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a `Trainer` optimises: a loss and the parameter tree it is defined on (its abstract shapes,
    logical axis names and random init). Language modelling is the default; LoRA, the reward model and PPO
    bring their own, and share the step, the sharding, the loop and the checkpoints."""
    loss: LossFn
    abstract_params: Callable[[ml_collections.ConfigDict], Any]
    logical_axes: Callable[[ml_collections.ConfigDict], Any] | None  # None: the decoder's own
    init: Callable[[ml_collections.ConfigDict, jax.Array], Any]


LM = Objective(lm_loss, model.abstract_params, None, model.init)
LORA = Objective(lm_loss, lora.abstract, lora.logical_axes, lora.init)


def train_step(config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation, state: State,
               batch: Batch, grad_shardings: Any = None, loss: LossFn = lm_loss
               ) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer update, accumulating gradients over `optim.grad_accum_steps` micro-batches.

    `grad_shardings` pins the layout of the (accumulated) gradients: sharded over fsdp for ZeRO-2/3,
    which makes the data-parallel gradient reduction a reduce-scatter; whole for ZeRO-1 (all-reduce).

    `state` may carry a frozen "base" (LoRA): it is passed through unchanged and never differentiated.

    A bad step -- non-finite loss or gradient norm -- keeps parameters and optimizer state as they were
    (the step counter still advances: its batch is consumed) and reports `bad_step` = 1, so one spike
    costs one batch, not the run (the loop reloads a checkpoint after `train.max_bad_steps` in a row).
    """
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    params = state["params"]
    accum = config.optim.grad_accum_steps

    def pin(grads):
        return grads if grad_shardings is None else jax.lax.with_sharding_constraint(grads, grad_shardings)

    def micro_step(carry, micro_batch):
        (loss_sum, sums), grads = grad_fn(params, config, micro_batch, state.get("base"))
        return jax.tree.map(jnp.add, carry, (pin(grads), loss_sum, sums)), None

    micro_batches = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    shapes = jax.eval_shape(lambda b: loss(params, config, b, state.get("base")),
                            jax.tree.map(lambda x: x[0], micro_batches))
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
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(good, n, o), new, old)
    new_state = {"step": state["step"] + 1, "params": keep(optax.apply_updates(params, updates), params),
                 "opt_state": keep(opt_state, state["opt_state"])}
    if "base" in state:
        new_state["base"] = state["base"]
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "lr": optim.schedule(config)(state["step"]),
               "tokens": tokens, "bad_step": 1.0 - good.astype(jnp.float32),
               **{k: v / denom for k, v in sums.items() if k != "weight"}}
    return new_state, metrics


class Trainer:
    """Builds the mesh, the sharded state and the jitted step for a config (everything but the loop).

    `objective` defaults to language modelling (`LM`), or `LORA` when `lora.rank > 0`: then the trainable
    "params" are LoRA adapters (sharded by their own logical axes) and the state also holds the frozen
    "base" parameters, laid out like parameters at the ZeRO stage.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                 objective: Objective | None = None):
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config)
        self.lora = config.lora.rank > 0
        if objective is None:
            objective = LORA if self.lora else LM
        self.objective = objective
        logical = objective.logical_axes(config) if objective.logical_axes is not None else None
        abstract_params = objective.abstract_params(config)
        self.optimizer = optim.make_optimizer(config, abstract_params)
        param_sh, self.grad_shardings = sharding.zero_shardings(config, self.mesh, logical)
        abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
        opt_sh = optax.tree_map_params(self.optimizer, lambda _, s: s, abstract_opt,
                                       sharding.param_shardings(config, self.mesh, logical=logical),
                                       transform_non_params=lambda _: sharding.replicated(self.mesh))
        self.state_shardings = {"step": sharding.replicated(self.mesh), "params": param_sh, "opt_state": opt_sh}
        abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": abstract_opt}
        base_sh = None
        if self.lora:
            base_sh = self.state_shardings["base"] = sharding.zero_shardings(config, self.mesh)[0]
            abstract["base"] = model.abstract_params(config)
        self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           abstract, self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(config, self.mesh)
        self._compiled = None
        with sharding.activation_rules(config, self.mesh):
            self._step = jax.jit(functools.partial(train_step, config, self.optimizer,
                                                   grad_shardings=self.grad_shardings, loss=objective.loss),
                                 in_shardings=(self.state_shardings, self.batch_sharding),
                                 out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                                 donate_argnums=0)
            self._eval = jax.jit(lambda params, base, batch: objective.loss(params, config, batch, base),
                                 in_shardings=(param_sh, base_sh, self.batch_sharding))

    def init_state(self, rng: jax.Array, params: dict | None = None, base: dict | None = None) -> State:
        """Fresh optimizer state and parameters, created directly with their shardings: `params` when given
        (fine-tuning), else random ones (LoRA: fresh adapters, `base` required)."""
        if self.lora and base is None:
            raise ValueError("a LoRA trainer needs the frozen base parameters")
        if params is not None:
            params = jax.device_put(params, self.state_shardings["params"])

        def make(rng, params):
            if params is None:
                params = self.objective.init(self.config, rng)
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.optimizer.init(params)}

        shardings = {k: v for k, v in self.state_shardings.items() if k != "base"}
        with sharding.activation_rules(self.config, self.mesh):
            state = jax.jit(make, out_shardings=shardings)(rng, params)
        if self.lora:  # placed, not copied: the frozen base is the largest thing in memory
            state["base"] = jax.device_put(base, self.state_shardings["base"])
        return state

    def device_batch(self, local: dict[str, np.ndarray]) -> Batch:
        return sharding.global_batch(local, self.batch_sharding)

    def compile(self, state: State, batch: Batch) -> None:
        """Compile the step ahead of time, so that step timings never include compilation."""
        with sharding.activation_rules(self.config, self.mesh):
            self._compiled = self._step.lower(state, batch).compile()

    def memory_report(self) -> dict[str, float]:
        """Bytes per device: parameters, optimizer state and gradients from their shardings; XLA's
        compiled-memory analysis of the step (arguments, outputs, temporaries = activations and other
        scratch) once `compile` has run; beside the practitioners' estimate of 16 bytes per parameter
        (weights, gradients and AdamW's two moments, as in the ZeRO paper's mixed-precision count)
        divided by the parameter-sharding degree fsdp x tensor."""
        params = self.abstract_state["params"]
        grads = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                             self.grad_shardings)
        report = {"params": sharding.bytes_per_device(params),
                  "opt_state": sharding.bytes_per_device(self.abstract_state["opt_state"]),
                  "grads": sharding.bytes_per_device(grads)}
        if self.lora:
            report["frozen_base"] = sharding.bytes_per_device(self.abstract_state["base"])
        degree = self.mesh.shape["fsdp"] * self.mesh.shape["tensor"]
        report["estimate_16B_per_param"] = 16 * config_lib.num_params(self.config) / degree
        if self._compiled is not None:
            analysis = self._compiled.memory_analysis()
            if analysis is not None:
                report.update(arguments=analysis.argument_size_in_bytes, outputs=analysis.output_size_in_bytes,
                              temporaries=analysis.temp_size_in_bytes)
        return report

    def step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        if self._compiled is not None:
            return self._compiled(state, batch)
        with sharding.activation_rules(self.config, self.mesh):
            return self._step(state, batch)

    def evaluate(self, state: State, batches: list[Batch]) -> dict[str, float]:
        """The objective on held-out batches: {"loss": ..., and its other metrics}, each a mean over the
        total weight of all the batches (tokens, or examples), not a mean of per-batch means."""
        with sharding.activation_rules(self.config, self.mesh):
            outs = [self._eval(state["params"], state.get("base"), b) for b in batches]
        loss_sum = sum(float(s) for s, _ in outs)
        sums = {k: sum(float(o[1][k]) for o in outs) for k in outs[0][1]} if outs else {"weight": 0.0}
        denom = max(sums.pop("weight"), 1.0)
        return {"loss": loss_sum / denom, **{k: v / denom for k, v in sums.items()}}

    def eval_loss(self, state: State, batches: list[Batch]) -> float:
        return self.evaluate(state, batches)["loss"]


def _iterator(config, tok, split: str, seed: int) -> data.PackedIterator:
    source = data.make_source(config, split)
    if hasattr(source, "describe") and split == "train":
        log_line(source.describe())  # the realised data mixture beside the requested weights
    return data.PackedIterator(source, tok, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                               seed=seed, host_id=jax.process_index(), num_hosts=jax.process_count())


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, float]]:
    """Train (or resume) to the end of the last stage (`train.num_steps` for a run without `train.stages`);
    returns the metrics records logged by this invocation.

    Staged runs (InternLM2's 4k -> 32k) go stage by stage: each stage builds its own trainer (sequence
    length, rope, attention and mesh may change) and a fresh data iterator, and resumes the newest
    checkpoint -- the previous stage's last step when it starts. Which stage to run is read from the newest
    checkpoint's step, so a killed run resumes in the right stage, mid-stage with its data position.
    """
    config_lib.validate(config)
    plan = config_lib.stage_plan(config)
    for stage in plan:  # every stage's mesh must fit the devices: fail now, not after the first stage
        try:
            sharding.mesh_shape(stage.config, jax.device_count())
        except config_lib.ConfigError as e:
            raise stage.error(e) from None
    os.makedirs(workdir, exist_ok=True)
    log_line(f"maxlm.train: {config_lib.describe(config)}")
    tok = tokenizer_lib.load_or_train(config, workdir)
    history: list[dict[str, float]] = []
    while True:
        done = checkpoint_lib.latest_step(workdir) or 0
        stage = next((s for s in plan if s.start <= done < s.end), plan[-1])
        if len(plan) > 1:
            m = stage.config.model
            rope = f"rope theta {m.rope_theta:g}" + (f", {m.rope_scaling} x{m.rope_factor:g} from "
                                                     f"{m.rope_original_max_len}" if m.rope_scaling != "none" else "")
            log_line(f"stage {stage.index + 1}/{len(plan)} '{stage.name}': steps {stage.start + 1}..{stage.end}, "
                     f"T={stage.config.data.seq_len} B={stage.config.data.batch_size}, {rope}, "
                     f"attention {m.attention_impl}")
        history += _train_stage(stage.config, workdir, tok, stage_start=stage.start, last=stage is plan[-1])
        after = checkpoint_lib.latest_step(workdir) or 0
        if after < stage.start:  # a damaged checkpoint was set aside: an earlier stage is unfinished
            continue
        if stage is plan[-1] or after < stage.end:  # done, or stopped by a signal (a rerun resumes here)
            break
    return history


def _train_stage(config: ml_collections.ConfigDict, workdir: str, tok, *, stage_start: int, last: bool
                 ) -> list[dict[str, float]]:
    train_iter = _iterator(config, tok, "train", config.data.shuffle_seed)
    trainer = Trainer(config)
    eval_batches = []
    if config.train.eval_every and config.data.eval_fraction > 0:
        eval_iter = _iterator(config, tok, "eval", seed=0)
        eval_batches = [trainer.device_batch(next(eval_iter)) for _ in range(config.train.eval_batches)]

    def finish(state: State) -> None:
        if last and config.train.num_samples > 0:
            # Every process joins the gather (parameters may be sharded across hosts); process 0 samples.
            params = host_params(config, state)
            if jax.process_index() == 0:
                _print_samples(config, params, tok)

    return run(config, workdir, trainer, train_iter, init_state=lambda: trainer.init_state(
        jax.random.key(config.train.seed)), eval_batches=eval_batches, finish=finish, stage_start=stage_start)


def host_params(config: ml_collections.ConfigDict, state: State) -> dict:
    """The full parameters (LoRA: adapters merged into the base) as host arrays; a collective on
    multi-host runs (every process must call it)."""
    params = state["params"]
    if "base" in state:
        params = jax.jit(functools.partial(lora.merge, config))(state["base"], params)
    return (multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1
            else jax.device_get(params))


def run(config: ml_collections.ConfigDict, workdir: str, trainer: Trainer, train_iter: Any, *,
        init_state: Callable[[], State], frozen: dict | None = None, eval_batches: list[Batch] = (),
        finish: Callable[[State], None] | None = None, stage_start: int = 0) -> list[dict[str, float]]:
    """The training loop shared by pretraining and fine-tuning: resume or `init_state()`, step to
    `train.num_steps` with logging, evaluation, checkpoints, signal handling and bad-step recovery, then
    `finish(state)` (samples). `frozen` holds state entries that are not checkpointed (LoRA's base), added
    back to a restored state. Returns the metrics records logged by this invocation.

    `stage_start` > 0: this is a later stage of a staged run. A checkpoint at exactly that step is the
    previous stage's end: its parameters and optimizer state are resumed, its data position (another
    iterator's) is not. A checkpoint before it means the previous stage is unfinished: nothing is run."""
    primary = jax.process_index() == 0
    frozen = frozen or {}
    log_line(f"mesh {dict(trainer.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    ckpt = checkpoint_lib.Checkpointer(workdir, config)
    restored = _restore(ckpt, trainer, frozen)
    if restored is not None:
        state, data_state = restored
        resumed = int(state["step"])
        if resumed < stage_start:
            log_line(f"the newest usable checkpoint, step {resumed}, is before this stage's start {stage_start}")
            ckpt.close()
            return []
        if resumed > stage_start or stage_start == 0:
            train_iter.set_state(data_state)
            log_line(f"resumed from step {resumed} ({ckpt.directory})")
        else:
            log_line(f"starting the stage from step {resumed}'s parameters and optimizer state, with fresh data")
    elif stage_start > 0:
        raise FileNotFoundError(f"stage starting at step {stage_start}: no checkpoint under {ckpt.directory}")
    else:
        state = init_state()
    start = int(state["step"])

    writer = MetricsWriter(workdir, enabled=primary)
    flops_per_step = config_lib.flops_per_token(config, config.data.seq_len) * config.data.seq_len \
        * config.data.batch_size
    peak = peak_flops_per_device(config.train.peak_tflops) * jax.device_count()
    total = config.train.num_steps
    step = start
    if start < total:
        batch = trainer.device_batch(next(train_iter))
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
    interval_first = start
    interval_sum = None  # metrics summed on device since the last log line (no host sync per step)
    bad_streak = reloads = 0
    with _StopSignals() as stop:
        while step < total:
            state, metrics = trainer.step(state, batch)
            interval_sum = metrics if interval_sum is None else jax.tree.map(jnp.add, interval_sum, metrics)
            step += 1
            stopping = stop.requested  # read once: a signal may land at any point of this iteration
            if step % config.checkpoint.every_steps == 0 or step == total or stopping:
                ckpt.save(step, state["params"], state["opt_state"], data.gather_state(train_iter))
            if step < total and not stopping:
                batch = trainer.device_batch(next(train_iter))  # host work overlaps the device's step
            if step % config.train.log_every == 0 or step == total or stopping:
                n = step - interval_first
                record = {k: float(v) / n for k, v in jax.device_get(interval_sum).items()}
                record["bad_steps"] = round(record.pop("bad_step") * n)
                record["lr"] = float(metrics["lr"])
                now = time.perf_counter()
                step_time = (now - interval_start) / n
                record["tokens_per_sec"] = config.data.seq_len * config.data.batch_size / step_time
                record["mfu"] = flops_per_step / step_time / peak
                record["step_time"] = step_time
                record["data_skipped"] = float(sum(v for k, v in train_iter.stats.items()
                                                   if k.startswith("skipped")))
                record["reloads"] = reloads
                if eval_batches and (step % config.train.eval_every == 0 or step == total):
                    record.update({f"eval_{k}": v for k, v in trainer.evaluate(state, eval_batches).items()})
                writer.write(step, record)
                eta = (now - run_start) / max(step - start, 1) * (total - step)
                writer.progress(step, total, record, eta_seconds=eta)
                interval_start, interval_first, interval_sum = time.perf_counter(), step, None
            if stopping:
                log_line(f"{stopping}: saved step {step}; waiting for the checkpoint, then exiting")
                break
            bad_streak = bad_streak + 1 if float(metrics["bad_step"]) else 0
            if config.train.max_bad_steps and bad_streak >= config.train.max_bad_steps:
                restored = _restore(ckpt, trainer, {k: state[k] for k in frozen})
                if restored is None:
                    raise RuntimeError(f"{bad_streak} non-finite steps in a row and no checkpoint to go back to")
                state = restored[0]
                log_line(f"{bad_streak} non-finite steps in a row at step {step}: reloaded step "
                         f"{int(state['step'])}, continuing with the next data")
                step, bad_streak, reloads = int(state["step"]), 0, reloads + 1
                interval_start, interval_first, interval_sum = time.perf_counter(), step, None
    ckpt.close()
    if step > start:
        if primary:
            png = writer.plot()
            log_line(f"loss curve: {png}; metrics: {os.path.join(workdir, 'metrics.jsonl')}; "
                     f"data: {train_iter.stats}")
        if finish is not None:
            finish(state)
    writer.close()
    return writer.history


def _restore(ckpt: checkpoint_lib.Checkpointer, trainer: Trainer, frozen: dict) -> tuple[State, dict] | None:
    """(state, data state) of the newest usable checkpoint, laid out for this trainer's mesh, or None."""
    restored = ckpt.restore_latest(trainer.abstract_state["params"], trainer.abstract_state["opt_state"])
    if restored is None:
        return None
    params, opt_state, meta = restored
    step = jax.device_put(jnp.asarray(meta["step"], jnp.int32), trainer.state_shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state, **frozen}, meta["data"]


class _StopSignals:
    """SIGTERM / SIGINT (preemption, Ctrl-C) request a clean stop: the loop saves at the next step
    boundary, waits for the checkpoint and returns, so the process exits 0 and a rerun resumes there.
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


def _print_samples(config: ml_collections.ConfigDict, params: dict, tok) -> None:
    from maxlm import sample

    prompts = ["import ", "def ", "class ", "    for ", "    return "][: config.train.num_samples]
    outs = sample.generate(config, params, [[tok.bos_id] + tok.encode(p) for p in prompts],
                           max_new_tokens=config.train.sample_tokens, rng=jax.random.key(config.train.seed),
                           temperature=0.8, top_k=40, eos_id=tok.eos_id)
    for prompt, out in zip(prompts, outs):
        log_line(f"--- sample ({prompt!r}) ---\n{prompt}{tok.decode(out)}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    distributed.initialize_from_flags()
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_config_flag()
    flags.declare_key_flag("config")
    flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics.jsonl, TensorBoard, loss.png.")
    distributed.define_flags()
    cli.run(main)
