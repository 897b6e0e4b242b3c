"""Direct preference optimisation and its relatives: a policy trained on preference pairs, no reward model.

    python -m maxlm.dpo --config=configs/dpo_tiny.py --workdir=runs/dpo [--config.dpo.base=runs/sft]
        [--config.dpo.loss=dpo|cdpo|ipo|simpo] [--config.dpo.beta=0.1] [--config.lora.rank=8]

DPO (Rafailov et al. 2023) shows that the RLHF objective -- reward minus beta x KL to a reference policy --
is maximised by a policy whose log-ratio to the reference *is* a reward, r(x, y) = beta log pi(y|x) /
pi_ref(y|x) + const, so the Bradley-Terry loss of a reward model can be written on the policy directly:

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)],   loss = -log sigmoid(beta h)

with y_w the chosen and y_l the rejected reply (sums of the reply tokens' log-probs, end marker included).
The variants, one function each in `LOSSES` (adding one touches only that table):

* ``cdpo``: conservative DPO (Mitchell 2023): the label is wrong with probability `label_smoothing`,
  loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
* ``ipo``: Azar et al. 2023's identity preference optimisation regresses h to 1 / (2 beta) instead of
  pushing it to infinity: loss = (h - 1 / (2 beta))^2, with length-averaged log-probs as TRL computes it.
* ``simpo``: Meng et al. 2024 drop the reference: h = beta (mean log pi(y_w) - mean log pi(y_l)) - gamma,
  averages over each reply's tokens, a target margin gamma; loss = -log sigmoid(h) (label smoothing too).

`dpo.nll_coef` > 0 adds the chosen reply's mean token negative log-likelihood (RPO, Pang et al. 2024,
"Iterative Reasoning Preference Optimization"; TRL's rpo_alpha): plain DPO may lower the chosen reply's
probability as long as the rejected one falls faster, and on a task with one right answer that hurts.

The reference's log-probs are computed once before training and travel with the batches (`dpo.reference
= cached`, TRL's precompute_ref_log_probs: the step runs one model, not two) or in the step from the frozen
reference (`frozen`); with LoRA the frozen base is the reference. Pairs are packed several to a row
(`maxlm.data.dpo`). The step is the one trainer's (`maxlm.training.trainer`); its metrics: the implicit
rewards beta x log-ratio of chosen and rejected, their margin and accuracy, the replies' log-probs, and
implicit_kl, the mean log-ratio of the pairs' replies. Every `train.eval_every` steps, and before the first:
held-out pairs, greedy exact match of held-out task items (`eval_true_score`) and `eval_kl`, the policy's KL
to the reference on its own temperature-1 replies to held-out prompts -- the same figure PPO's `kl` is.

Data: `dpo.data_path` ({"prompt", "chosen", "rejected"[, "system"]} jsonl), or the built-in `correct`
pairs of `dpo.tasks` (`preference.task_pairs`) and/or on-policy pairs: `dpo.policy_samples` replies of the
starting policy to each of `dpo.sampled_items` prompts, a wrong one rejected against a right one (the task
checker is the labeller; `reward.sampled_pairs`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from maxlm import cli
from maxlm import config as config_lib
from maxlm.data import chat, preference, records, tasks
from maxlm.data import dpo as dpo_data
from maxlm.data.sources import split_indices
from maxlm.errors import InputError
from maxlm.evaluation import harness as evaluate
from maxlm.inference import engine as engine_lib
from maxlm.interop import pretrained
from maxlm.model import decoder as model, lora, scoring, trees
from maxlm.posttrain import reward, rl, sft
from maxlm.training import distributed, pretrain as train, sharding
from maxlm.training import workdir as workdir_lib
from maxlm.training import trainer as trainer_lib
from maxlm.training.metrics import log_line

Array = jax.Array


# ----------------------------------------------------------------------------------------------------------
# The losses: per pair, from the summed log-probs of each reply under the policy and the reference.


class PairLogps(NamedTuple):
    """Per-pair inputs of a loss, each [P] float32: summed reply log-probs under the policy and the
    reference (0 when a loss has no reference), and the replies' token counts."""
    chosen: Array
    rejected: Array
    ref_chosen: Array
    ref_rejected: Array
    chosen_len: Array
    rejected_len: Array


# (PairLogps, dpo config) -> (loss [P], chosen reward [P], rejected reward [P]).
LossFn = Callable[[PairLogps, ml_collections.ConfigDict], tuple[Array, Array, Array]]


@dataclasses.dataclass(frozen=True)
class Loss:
    fn: LossFn
    uses_reference: bool = True


LOSSES: dict[str, Loss] = {}


def register(name: str, uses_reference: bool = True):
    def add(fn: LossFn) -> LossFn:
        LOSSES[name] = Loss(fn, uses_reference)
        return fn
    return add


def _smoothed(logits: Array, smoothing: float) -> Array:
    """-(1 - e) log sigmoid(x) - e log sigmoid(-x): the sigmoid loss with the label flipped w.p. e."""
    return -(1.0 - smoothing) * jax.nn.log_sigmoid(logits) - smoothing * jax.nn.log_sigmoid(-logits)


def _implicit_rewards(x: PairLogps, d: ml_collections.ConfigDict) -> tuple[Array, Array]:
    """DPO's implicit rewards of the chosen and the rejected reply: beta x (log pi - log pi_ref)."""
    return d.beta * (x.chosen - x.ref_chosen), d.beta * (x.rejected - x.ref_rejected)


@register("dpo")
def dpo(x: PairLogps, d: ml_collections.ConfigDict) -> tuple[Array, Array, Array]:
    chosen, rejected = _implicit_rewards(x, d)
    return _smoothed(chosen - rejected, 0.0), chosen, rejected


@register("cdpo")
def cdpo(x: PairLogps, d: ml_collections.ConfigDict) -> tuple[Array, Array, Array]:
    chosen, rejected = _implicit_rewards(x, d)
    return _smoothed(chosen - rejected, d.label_smoothing), chosen, rejected


@register("ipo")
def ipo(x: PairLogps, d: ml_collections.ConfigDict) -> tuple[Array, Array, Array]:
    h = (x.chosen - x.ref_chosen) / x.chosen_len - (x.rejected - x.ref_rejected) / x.rejected_len
    return (jnp.square(h - 1.0 / (2.0 * d.beta)), *_implicit_rewards(x, d))


@register("simpo", uses_reference=False)
def simpo(x: PairLogps, d: ml_collections.ConfigDict) -> tuple[Array, Array, Array]:
    chosen, rejected = d.beta * x.chosen / x.chosen_len, d.beta * x.rejected / x.rejected_len
    return _smoothed(chosen - rejected - d.simpo_gamma, d.label_smoothing), chosen, rejected


def validate(config: ml_collections.ConfigDict) -> None:
    d = config.dpo
    if d.loss not in LOSSES:
        raise config_lib.ConfigError("dpo.loss", f"must be one of {tuple(LOSSES)}")
    if d.beta <= 0:
        raise config_lib.ConfigError("dpo.beta", "must be positive")
    if not 0 <= d.label_smoothing < 0.5:
        raise config_lib.ConfigError("dpo.label_smoothing", "must be in [0, 0.5)")
    if d.loss == "cdpo" and d.label_smoothing == 0:
        raise config_lib.ConfigError("dpo.label_smoothing", "cdpo needs the label noise rate e > 0 (0 is plain dpo)")
    if d.loss in ("dpo", "ipo") and d.label_smoothing:
        raise config_lib.ConfigError("dpo.label_smoothing", f"{d.loss} has no label smoothing (use cdpo)")
    if d.reference not in ("cached", "frozen"):
        raise config_lib.ConfigError("dpo.reference", "must be cached or frozen")
    if d.nll_coef < 0:
        raise config_lib.ConfigError("dpo.nll_coef", "must be >= 0")
    if d.pairs_per_row < 1:
        raise config_lib.ConfigError("dpo.pairs_per_row", "must be >= 1")
    if not d.data_path and not d.builtin_pairs and not d.policy_samples:
        raise config_lib.ConfigError("dpo.builtin_pairs", "no data: set dpo.data_path, builtin_pairs or policy_samples")
    for key in ("train_size", "eval_size", "sampled_items", "eval_items"):
        if d[key] <= 0:
            raise config_lib.ConfigError(f"dpo.{key}", "must be positive")
    if d.policy_samples < 0:
        raise config_lib.ConfigError("dpo.policy_samples", "must be >= 0")
    if any(t not in config_lib.SFT_TASKS for t in d.tasks):
        raise config_lib.ConfigError("dpo.tasks", f"each must be one of {config_lib.SFT_TASKS}")


# ----------------------------------------------------------------------------------------------------------
# The step's loss


def token_logprobs(config: ml_collections.ConfigDict, params: dict, batch: dict) -> Array:
    """log pi(target) at every position of a packed pair batch [B, T]."""
    return token_logprobs_with_aux(config, params, batch)[0]


def token_logprobs_with_aux(config: ml_collections.ConfigDict, params: dict, batch: dict
                            ) -> tuple[Array, dict[str, Array]]:
    """`token_logprobs`, and a mixture of experts' router stats ({} for a dense model)."""
    logits, router = model.apply_with_aux(config, params, batch["inputs"], positions=batch["positions"],
                                          segment_ids=batch["segment_ids"])
    return rl.logprobs_from_logits(logits, batch["targets"]), router


def slot_sums(values: Array, slots: Array, n_slots: int) -> tuple[Array, Array]:
    """(sum of `values` over each slot's positions, the slot's position count), each [B, n_slots]."""
    onehot = slots[..., None] == jnp.arange(n_slots)
    return (jnp.sum(jnp.where(onehot, values.astype(jnp.float32)[..., None], 0.0), axis=1),
            jnp.sum(onehot, axis=1).astype(jnp.float32))


def dpo_loss(params: dict, config: ml_collections.ConfigDict, batch: dict, frozen: dict
             ) -> tuple[Array, dict[str, Array]]:
    """(sum over the batch's pairs of the `dpo.loss`, {"weight": pairs, and metric sums}).

    With LoRA `params` are adapters over the frozen base, which is also the reference."""
    d = config.dpo
    base = frozen.get("base")
    policy = lora.merge(config, base, params) if base is not None else params
    n_slots = 2 * d.pairs_per_row
    logprobs, router = token_logprobs_with_aux(config, policy, batch)
    sums, counts = slot_sums(logprobs, batch["slots"], n_slots)
    ref_sums = jnp.zeros_like(sums)
    if LOSSES[d.loss].uses_reference:
        if "ref_logprobs" in batch:
            ref_sums = slot_sums(batch["ref_logprobs"], batch["slots"], n_slots)[0]
        else:
            ref_params = frozen["reference"] if "reference" in frozen else base
            ref_sums = jax.lax.stop_gradient(slot_sums(token_logprobs(config, ref_params, batch), batch["slots"],
                                                       n_slots)[0])
    x = PairLogps(sums[:, 0::2], sums[:, 1::2], ref_sums[:, 0::2], ref_sums[:, 1::2],
                  jnp.maximum(counts[:, 0::2], 1.0), jnp.maximum(counts[:, 1::2], 1.0))
    losses, chosen_reward, rejected_reward = LOSSES[d.loss].fn(x, d)
    if d.nll_coef:  # RPO: the chosen reply's mean token negative log-likelihood keeps its probability up
        losses = losses - d.nll_coef * x.chosen / x.chosen_len
    real = counts[:, 0::2] > 0  # a pair slot the row does not fill has no chosen tokens
    total = lambda v: jnp.sum(jnp.where(real, v, 0.0))  # noqa: E731
    log_ratio = (x.chosen - x.ref_chosen + x.rejected - x.ref_rejected) / 2.0
    pairs = jnp.sum(real).astype(jnp.float32)
    extra, router_metrics = train.router_loss(config, router, pairs)  # a mixture of experts' router losses
    return total(losses) + extra, {
        **router_metrics,
        "weight": pairs, "accuracy": total((chosen_reward > rejected_reward) * 1.0),
        "margin": total(chosen_reward - rejected_reward), "reward_chosen": total(chosen_reward),
        "reward_rejected": total(rejected_reward), "logps_chosen": total(x.chosen),
        "logps_rejected": total(x.rejected), "implicit_kl": total(log_ratio)}


def objective(config: ml_collections.ConfigDict) -> trainer_lib.Objective:
    """LoRA adapters over the frozen base (the reference too), or the whole policy, with the reference frozen
    beside it when its log-probs are computed in the step."""
    if config.lora.rank:
        return trainer_lib.Objective("dpo", dpo_loss, "lora", lora.init, frozen=lambda c: {"base": trees.lora_base(c)})
    in_step = config.dpo.reference == "frozen" and LOSSES[config.dpo.loss].uses_reference
    return trainer_lib.Objective("dpo", dpo_loss, "lm", model.init,
                                 frozen=lambda c: {"reference": "lm"} if in_step else {})


# ----------------------------------------------------------------------------------------------------------
# Data and evaluation


def load_pairs(config: ml_collections.ConfigDict, tok: Any, template: chat.Template, split: str,
               params: dict | None = None) -> preference.Pairs:
    """`dpo.data_path` (split by `data.eval_fraction`), else the built-in `correct` pairs of the split and,
    in the train split, the policy's own sampled pairs; rendered under `sft.system_prompt`, as the policy
    was trained and is evaluated."""
    d = config.dpo
    make = lambda: preference.Pairs(template, tok, config.data.seq_len, with_weights=True)  # noqa: E731
    pairs = make()
    if d.data_path:
        everything = preference.load_jsonl(d.data_path, make())
        if not everything.items:
            raise InputError(f"every preference pair in dpo.data_path={d.data_path} was skipped "
                             f"({records.reason_counts(everything.skipped) or 'the files are empty'})")
        keep = split_indices(len(everything), config.data.eval_fraction, split)
        pairs.items = [everything.items[i] for i in keep]
        pairs.domains = [everything.domains[i] for i in keep]
        pairs.skipped = everything.skipped
        return pairs
    size = d.train_size if split == "train" else d.eval_size
    if d.builtin_pairs or split == "eval":
        for record in preference.task_pairs(tuple(d.tasks), split, size, seed=config.sft.task_seed,
                                            domains=("correct",), conditional=False):
            pairs.add({**record, "system": config.sft.system_prompt}, domain="correct")
    if split == "train" and d.policy_samples and params is not None:
        # Items past the built-in ones (the same split, so never a held-out input).
        items = [i for t in d.tasks for i in tasks.make_items(t, split, size + d.sampled_items,
                                                              seed=config.sft.task_seed)[size:]]
        sampled = reward.sampled_pairs(config, params, tok, template, items, d.policy_samples,
                                       seed=config.train.seed, system=config.sft.system_prompt)
        for record in sampled:
            pairs.add(record, domain="sampled")
        log_line(f"sampled {d.policy_samples} replies to each of {len(items)} prompts: {len(sampled)} on-policy pairs")
    return pairs


def reference_logprob_fn(config: ml_collections.ConfigDict, trainer: trainer_lib.Trainer, reference: dict
                         ) -> Callable[[dict], np.ndarray]:
    """batch -> the reference's per-token log-probs [B, T] (host), sharded like the step."""
    params = trainer.place_frozen({"base": reference})["base"] if trainer.lora else \
        jax.device_put(reference, trainer.state_shardings["params"])
    fn = jax.jit(functools.partial(token_logprobs, config))

    def run(batch: dict) -> np.ndarray:
        with sharding.activation_rules(config, trainer.mesh):
            return np.asarray(jax.device_get(fn(params, trainer.device_batch(batch))))
    return run


def sampled_kl(config: ml_collections.ConfigDict, policy: dict, reference: dict, prompts: list[list[int]],
               max_new_tokens: int, eos_id: int, seed: int = 0) -> float:
    """KL(pi || pi_ref) per reply, estimated on the policy's own temperature-1 replies to `prompts`:
    the mean over replies of log pi(y|x) - log pi_ref(y|x) (the k1 estimator summed over the reply, stop
    token included) -- PPO's `kl` on its rollouts is the same quantity."""
    replies = engine_lib.generate(config, policy, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
                                  eos_id=eos_id, seed=seed)
    replies = [r + [eos_id] if len(r) < max_new_tokens else r for r in replies]  # it stopped: the stop is an action
    mine = scoring.loglikelihoods(config, policy, prompts, replies)
    ref = scoring.loglikelihoods(config, reference, prompts, replies)
    return float(np.mean(np.asarray(mine) - np.asarray(ref)))


def held_out(config: ml_collections.ConfigDict, tok: Any, template: chat.Template, policy: dict,
             reference: dict) -> dict[str, float]:
    """eval_true_score (greedy exact match on `dpo.eval_items` held-out items per task) and eval_kl."""
    d = config.dpo
    score = float(np.mean([evaluate.task_accuracy(config, policy, tok, t, n=d.eval_items)["accuracy"]
                           for t in d.tasks]))
    items = [i for t in d.tasks for i in tasks.make_items(t, "eval", d.eval_items, seed=config.sft.task_seed)]
    prompts = [chat.render_prompt(template, tok, tasks.messages(i, config.sft.system_prompt, with_answer=False))
               for i in items]
    kl = sampled_kl(config, policy, reference, prompts, evaluate.MAX_NEW_TOKENS, evaluate.stop_id(template, tok),
                    seed=config.train.seed)
    return {"eval_true_score": score, "eval_kl": kl}


# ----------------------------------------------------------------------------------------------------------
# The run


@workdir_lib.holding
def train_dpo(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, float]]:
    """Train (or resume) to `train.num_steps`; returns the metrics records logged by this invocation."""
    validate(config)
    config, tok, template, policy = sft.build(config, workdir, section="dpo")
    d = config.dpo
    if config.lora.rank:
        with config.unlocked():  # a LoRA checkpoint names its base as sft.base (pretrained.load_workdir)
            config.sft.base, config.sft.base_step = d.base, d.base_step
    log_line(f"maxlm.dpo: {config_lib.describe(config)}; policy {d.base}; loss {d.loss} (beta {d.beta}); "
             f"reference {d.reference if LOSSES[d.loss].uses_reference else 'none'}"
             + (f"; LoRA rank {config.lora.rank}" if config.lora.rank else ""))
    train_pairs = load_pairs(config, tok, template, "train", params=policy)
    log_line(f"preference data: {train_pairs.summary()}")
    eval_pairs = load_pairs(config, tok, template, "eval")
    trainer = train.Trainer(config, objective=objective(config))
    items, eval_items = dpo_data.sides(train_pairs), dpo_data.sides(eval_pairs)
    layout = dict(seq_len=config.data.seq_len, pairs_per_row=d.pairs_per_row, pad_id=tok.pad_id)
    if d.reference == "cached" and LOSSES[d.loss].uses_reference:
        fn = reference_logprob_fn(config, trainer, policy)
        items = dpo_data.attach_reference(items, fn, rows=config.data.batch_size, **layout)
        eval_items = dpo_data.attach_reference(eval_items, fn, rows=config.data.batch_size, **layout) \
            if eval_items else eval_items
        log_line(f"reference log-probs of {len(items)} + {len(eval_items)} pairs computed once (dpo.reference=cached)")
    iterator = dpo_data.PackedPairIterator(items, batch_size=config.data.batch_size, seed=config.data.shuffle_seed,
                                           host_id=jax.process_index(), num_hosts=jax.process_count(), **layout)
    eval_batches = [reward._local(trainer, b) for b in dpo_data.eval_batches(
        eval_items, batch_size=config.data.batch_size, **layout)[:config.train.eval_batches]] if eval_items else []

    frozen = {}
    if trainer.frozen_layouts:
        frozen = trainer.place_frozen({"base": policy} if config.lora.rank else {"reference": policy})
    rng = jax.random.key(config.train.seed)
    init = (lambda: trainer.init_state(rng, frozen=frozen)) if config.lora.rank else \
        (lambda: trainer.init_state(rng, params=policy, frozen=frozen))

    evaluations = {}

    def evaluation(state: train.State) -> dict[str, float]:
        out = {f"eval_{k}": v for k, v in trainer.evaluate(state, eval_batches).items()} if eval_batches else {}
        params = train.host_params(config, state)
        if jax.process_index() == 0 and not d.data_path:
            out.update(held_out(config, tok, template, params, policy))
            if int(state["step"]) == 0:
                log_line(f"before DPO: held-out true score {out['eval_true_score']:.3f}, KL {out['eval_kl']:.3f}")
        evaluations[int(state["step"])] = out
        return out

    def finish(state: train.State) -> None:
        if jax.process_index() == 0 and evaluations:  # the first and the last evaluation of this invocation
            with open(os.path.join(workdir, "dpo_eval.json"), "w") as f:
                json.dump({"first": {"step": min(evaluations), **evaluations[min(evaluations)]},
                           "last": {"step": max(evaluations), **evaluations[max(evaluations)]}}, f, indent=1)

    return trainer_lib.run(config, workdir, trainer, iterator, init_state=init, frozen=frozen, evaluate=evaluation,
                           eval_at_start=True, finish=finish,
                           plot=("dpo.png", ("loss", "margin", "eval_true_score", "eval_kl"), ""),
                           progress_keys=("accuracy", "margin", "eval_true_score", "eval_kl"))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    distributed.initialize_from_flags()
    train_dpo(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_config_flag("configs/dpo_tiny.py")
    flags.declare_key_flag("config")
    flags.DEFINE_string("workdir", "runs/dpo", "Directory for checkpoints, metrics.jsonl, TensorBoard, dpo.png.")
    distributed.define_flags()
    cli.run(main, user_errors=(pretrained.BaseModelError,))
