"""Pretraining: the language-modelling objective on `maxlm.trainer`'s step and loop.

    python -m maxlm.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.num_steps=N ...]

Logged `loss`, `grad_norm` and `tokens` are means over the steps since the previous log line (as Hugging
Face's Trainer reports them); `lr` is the rate of the last of those steps. Rerunning the same command
resumes from the newest checkpoint in the workdir, data position included, so the resumed run computes
exactly the steps an uninterrupted run would have. A config with `train.stages` (InternLM2's 4k -> 32k)
trains stage by stage, each resuming the previous one's checkpoint (see `train`).

The step (`maxlm.training.trainer.train_step`) is `(state, batch) -> (state, metrics)`, state donated.
The loss is the mean cross-entropy over the *real* target tokens of the whole global batch (sum of
per-token losses / number of weighted tokens), so gradient accumulation over micro-batches gives the same
gradient as one large batch, however the padding falls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import flags

from maxlm import cli, data
from maxlm import config as config_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.model import lora, decoder as model, sampler as sample, trees
from maxlm.training import checkpoint as checkpoint_lib
from maxlm.training import distributed, sharding
from maxlm.training import workdir as workdir_lib
from maxlm.training import trainer as trainer_lib
from maxlm.training.metrics import log_line
from maxlm.training.trainer import Batch, BatchFeed, Feed, LossFn, Objective, State, host_params, restore, run

_restore = restore  # the name before the trainer had its own module


def _cross_entropy(params: dict, config: ml_collections.ConfigDict, batch: Batch, base: dict | None
                   ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(sum of weighted token cross-entropies, sum of weights, the mixture of experts' router stats or {})."""
    if base is not None:
        params = lora.merge(config, base, params)
    logits, router = model.apply_with_aux(config, params, batch["inputs"], positions=batch["positions"],
                                          segment_ids=batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weights = batch["loss_weights"].astype(jnp.float32)
    return jnp.sum(ce * weights), jnp.sum(weights), router


def loss_fn(params: dict, config: ml_collections.ConfigDict, batch: Batch, base: dict | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token cross-entropies, sum of weights) for one (micro-)batch.

    With a frozen `base`, `params` are LoRA adapters, merged into it for the forward pass.
    """
    ce, tokens, _ = _cross_entropy(params, config, batch, base)
    return ce, tokens


def lm_loss(params: dict, config: ml_collections.ConfigDict, batch: Batch, base: dict | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`loss_fn` in the `LossFn` shape: the weight is the number of target tokens.

    A mixture of experts adds its router losses per token (`maxlm.model.moe`: router_aux_coef x load balance
    + router_z_coef x z-loss, as Hugging Face's Mixtral adds its aux loss), so `loss` is the objective and
    `cross_entropy` the language-modelling part; `moe_load_balance`, `moe_z_loss`, `moe_dropped` are logged."""
    ce, tokens, router = _cross_entropy(params, config, batch, base)
    metrics = {"weight": tokens}
    if not router:
        return ce, metrics
    extra, router_metrics = router_loss(config, router, tokens)
    metrics.update({"cross_entropy": ce, **router_metrics})
    return ce + extra, metrics


def router_loss(config: ml_collections.ConfigDict, router: dict[str, jax.Array], weight: jax.Array
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A mixture of experts' router losses (`model.apply_with_aux`'s stats; {} for a dense model) as a sum
    over `weight` units -- the objective's own denominator (tokens, pairs, replies), so the step's division
    leaves router_aux_coef x load balance + router_z_coef x z-loss -- and their `moe_*` metric sums."""
    if not router:
        return jnp.zeros((), jnp.float32), {}
    m = config.model
    loss = weight * (m.router_aux_coef * router["load_balance"] + m.router_z_coef * router["z_loss"])
    return loss, {f"moe_{k}": weight * v for k, v in router.items()}


def lora_loss(adapters: dict, config: ml_collections.ConfigDict, batch: Batch, frozen: dict
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`lm_loss` of LoRA adapters merged into the frozen base (the objective's frozen tree "base")."""
    return lm_loss(adapters, config, batch, frozen["base"])


def _lm_loss(params: dict, config: ml_collections.ConfigDict, batch: Batch, frozen: dict
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    return lm_loss(params, config, batch)


# Language modelling: pretraining, and full SFT. LoRA trains adapters over a frozen base (Hu et al. 2021).
LM = Objective("pretrain", _lm_loss, "lm", model.init)
LORA = Objective("sft", lora_loss, "lora", lora.init, frozen=lambda config: {"base": trees.lora_base(config)})


def lm_objective(config: ml_collections.ConfigDict, name: str = "pretrain") -> Objective:
    """The language-modelling objective a config asks for: LoRA adapters when `lora.rank` > 0."""
    return dataclasses.replace(LORA if config.lora.rank else LM, name=name)


class Trainer(trainer_lib.Trainer):
    """`maxlm.trainer.Trainer` with the language-modelling objective of the config by default."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                 objective: Objective | None = None):
        super().__init__(config, mesh, objective if objective is not None else lm_objective(config))


def train_step(config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation, state: State,
               batch: Batch, grad_shardings: Any = None, loss: Any = _lm_loss) -> tuple[State, dict[str, jax.Array]]:
    """`maxlm.trainer.train_step` with the language-modelling loss by default."""
    return trainer_lib.train_step(config, optimizer, loss, state, batch, grad_shardings)


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
    with workdir_lib.hold(workdir):  # one writer per workdir, from the tokenizer on
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
    trainer = Trainer(config, objective=lm_objective(config, "pretrain"))
    eval_batches = []
    if config.train.eval_every and config.data.eval_fraction > 0:
        eval_iter = _iterator(config, tok, "eval", seed=0)
        eval_batches = [trainer.device_batch(next(eval_iter)) for _ in range(config.train.eval_batches)]

    def finish(state: State) -> dict | None:
        if last and config.train.num_samples > 0:
            # Every process joins the gather (parameters may be sharded across hosts); process 0 samples.
            params = host_params(config, state)
            if jax.process_index() == 0:
                return {"samples": (("prompt", "sample"), _print_samples(config, params, tok))}
        return None

    return run(config, workdir, trainer, train_iter, init_state=lambda: trainer.init_state(
        jax.random.key(config.train.seed)), eval_batches=eval_batches, finish=finish, stage_start=stage_start)


def _print_samples(config: ml_collections.ConfigDict, params: dict, tok) -> list[tuple[str, str]]:
    """Print `train.num_samples` continuations of code prompts; returns the (prompt, sample) pairs."""
    prompts = ["import ", "def ", "class ", "    for ", "    return "][: config.train.num_samples]
    outs = sample.generate(config, params, [tokenizer_lib.text_prefix(tok) + tok.encode(p) for p in prompts],
                           max_new_tokens=config.train.sample_tokens, rng=jax.random.key(config.train.seed),
                           temperature=0.8, top_k=40, eos_id=tok.eos_id)
    rows = [(prompt, prompt + tok.decode(out)) for prompt, out in zip(prompts, outs)]
    for prompt, text in rows:
        log_line(f"--- sample ({prompt!r}) ---\n{text}")
    return rows


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
