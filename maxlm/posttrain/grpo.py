"""Critic-free policy optimisation -- GRPO, Dr. GRPO, RLOO, DAPO -- as pure jitted steps on the one trainer.

    python -m maxlm.grpo --config=configs/grpo_tiny.py --workdir=runs/grpo [--config.ppo.policy=runs/sft]
        [--config.grpo.advantage=grpo|dr_grpo|rloo] [--config.grpo.loss_agg=token_mean|...]

PPO learns a value network as large as the policy to give each token a baseline. The critic-free methods
sample every prompt `grpo.group_size` (G) times and take the baseline from the other replies to the same
prompt: one advantage per reply, broadcast over its tokens (`maxlm.posttrain.critic_free`, where each
estimator and loss aggregation is one registered function, with the papers they follow). What a run does per
iteration, all array work jitted:

  1. draw `ppo.rollout_batch / G` train prompts and G temperature-`ppo.temperature` replies to each through
     the generation engine; reward each reply with the environment's program (`ppo.reward_fn`: `checker`, the
     task's exact-match checker; `shortest_path`) or the reward model (`model`); DAPO's soft overlong penalty
     when `grpo.overlong_buffer` > 0;
  2. with `grpo.dynamic_sampling` (DAPO), drop groups whose rewards are all equal -- their advantages are 0,
     so they carry no gradient -- and draw more groups (up to `grpo.max_sampling_rounds` draws) to fill the
     batch; if the rounds run out, uninformative groups fill the rest (shapes are fixed);
  3. group-relative advantages (`grpo.advantage`), the behaviour policy's and the reference's token log-probs;
  4. `ppo.epochs` passes of shuffled minibatches of `data.batch_size` replies: the clipped surrogate with
     DAPO's asymmetric bounds (`grpo.clip_low`, `grpo.clip_high`) plus `grpo.kl_coef` x a per-token KL
     estimate to the reference (`grpo.kl_estimator`; GRPO's k3), aggregated by `grpo.loss_agg`.

The RL settings PPO and GRPO share -- policy, environment, prompts per iteration, reply length, epochs,
evaluation -- are read from the `ppo` section; `grpo` holds what is particular to the critic-free methods.
Checkpoints, signals, bad-step reloads and exact resume are the trainer's, with the rollouts as the feed's
collect phase (`ppo.RolloutFeed`): a resumed run redraws exactly the prompts and replies it would have.
`metrics.jsonl` per iteration: reward_mean, true_score and kl (per reply, k1, vs the reference) of the
first draw, response_length, groups_informative (the first draw's share of groups with unequal rewards),
sampling_rounds, policy_clipfrac, and every `ppo.eval_every` iterations eval_true_score.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from maxlm import cli
from maxlm import config as config_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.interop import pretrained
from maxlm.model import decoder as model
from maxlm.posttrain import critic_free as cf
from maxlm.posttrain import ppo, reward, rl
from maxlm.training import distributed, pretrain as train
from maxlm.training import workdir as workdir_lib
from maxlm.training import trainer as trainer_lib
from maxlm.training.metrics import log_line


def validate(config: ml_collections.ConfigDict) -> None:
    g = config.grpo
    for key, registry in (("advantage", cf.ADVANTAGE_ESTIMATORS), ("loss_agg", cf.LOSS_AGGREGATIONS),
                          ("kl_estimator", cf.KL_ESTIMATORS)):
        if g[key] not in registry:
            raise config_lib.ConfigError(f"grpo.{key}", f"must be one of {tuple(registry)}")
    if g.group_size < 2:
        raise config_lib.ConfigError("grpo.group_size", "must be >= 2 (the baseline comes from the other replies)")
    if config.ppo.rollout_batch % g.group_size:
        raise config_lib.ConfigError("ppo.rollout_batch", f"must be a multiple of grpo.group_size={g.group_size}")
    if not (0 <= g.clip_low < 1 and g.clip_high >= 0):
        raise config_lib.ConfigError("grpo.clip_low", "need 0 <= clip_low < 1 and clip_high >= 0")
    if g.kl_coef < 0:
        raise config_lib.ConfigError("grpo.kl_coef", "must be >= 0 (0: no KL term, as in DAPO)")
    if g.max_sampling_rounds < 1:
        raise config_lib.ConfigError("grpo.max_sampling_rounds", "must be >= 1")
    if not 0 <= g.overlong_buffer <= config.ppo.max_new_tokens:
        raise config_lib.ConfigError("grpo.overlong_buffer", "must be in [0, ppo.max_new_tokens]")


def grpo_loss(params: dict, config: ml_collections.ConfigDict, batch: train.Batch, frozen: Any = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the minibatch's aggregated loss as a sum, {"weight": its denominator, and metric sums aggregated the
    same way}): `critic_free.aggregate_sums`, so micro-batches and hosts add up to the whole batch's value.

    batch: inputs/positions/segment_ids [B, P+R-1] (left-padded prompt, then the reply), and over the R reply
    tokens responses, mask, old_logprobs, ref_logprobs and advantages (each reply's, on every token) [B, R].
    """
    g, p = config.grpo, config.ppo
    mask = batch["mask"]
    r = mask.shape[1]
    logits, router = model.apply_with_aux(config, params, batch["inputs"], positions=batch["positions"],
                                          segment_ids=batch["segment_ids"])
    logits = logits[:, -r:]
    logprobs = rl.logprobs_from_logits(logits, batch["responses"])
    pg, clipped = cf.clipped_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], g.clip_low,
                                         g.clip_high)
    kl = cf.kl_penalty(logprobs, batch["ref_logprobs"], g.kl_estimator)
    aggregate = lambda x: cf.aggregate_sums(g.loss_agg, x, mask, p.max_new_tokens)  # noqa: E731
    loss, weight = aggregate(pg + g.kl_coef * kl if g.kl_coef else pg)
    extra, router_metrics = train.router_loss(config, router, weight)  # a mixture of experts' router losses
    return loss + extra, {**router_metrics, "weight": weight, "policy_loss": aggregate(pg)[0], "policy_clipfrac": aggregate(clipped)[0],
                  "kl_penalty": aggregate(kl)[0], "entropy": aggregate(rl.entropy_from_logits(logits))[0],
                  "approx_kl": aggregate(rl.approx_kl(logprobs, batch["old_logprobs"]))[0]}


def frozen_trees(config: ml_collections.ConfigDict) -> dict:
    """The reference policy (the KL term, and the KL reported), and the reward model when the reward is one."""
    return {"reference": "lm", **({"reward_model": "value"} if config.ppo.reward_fn == "model" else {})}


OBJECTIVE = train.Objective("grpo", grpo_loss, "lm", model.init, frozen=frozen_trees)


def _score(config: ml_collections.ConfigDict, actor: dict, ref: dict, rm: dict | None, batch: dict
           ) -> dict[str, jax.Array]:
    r = batch["responses"].shape[1]
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    out = {name: rl.logprobs_from_logits(model.apply(config, params, batch["inputs"], **kw)[:, -r:], batch["responses"])
           for name, params in (("logprobs", actor), ("ref_logprobs", ref))}
    if rm is not None:
        out["scores"] = reward.scores(config, rm, batch["rm_inputs"], batch["rm_positions"], batch["rm_segment_ids"],
                                      batch["rm_last"])
    return out


class GroupFeed(ppo.RolloutFeed):
    """The collect phase of the critic-free methods: groups of G replies per prompt, dynamic sampling,
    group-relative advantages; the queue of minibatches, the engine and the resumable position are PPO's."""

    ROLLOUT_KEYS = ("inputs", "positions", "segment_ids", "responses", "mask")

    def __init__(self, config: ml_collections.ConfigDict, env: Any, tok: tokenizer_lib.Tokenizer, prompt_len: int,
                 rm_len: int):
        super().__init__(config, env, tok, prompt_len, rm_len, None)
        self.score_fn = jax.jit(functools.partial(_score, config))
        self.advantage_fn = jax.jit(functools.partial(cf.group_advantages, config.grpo.advantage),
                                    static_argnums=1)

    def _draw(self, actor: dict, frozen: dict, iteration: int, salt: int) -> dict[str, Any]:
        """One draw: rollout_batch / G prompts, G replies each (rows i*G .. i*G+G-1), rewarded and scored."""
        env, tok, p, g = self.env, self.tok, self.config.ppo, self.config.grpo
        prompts = env.sample_prompts(iteration, p.rollout_batch // g.group_size, salt)
        rows = [pr for pr in prompts for _ in range(g.group_size)]
        responses = self._rollouts(actor, [pr.policy_ids for pr in rows], iteration, salt)
        batch, mask, lists = ppo._layout([pr.policy_ids for pr in rows], responses, self.prompt_len, tok.pad_id,
                                         env.stop_id)
        rm = frozen.get("reward_model")
        if rm is not None:
            batch.update(ppo._reward_inputs(rows, lists, self.rm_len, tok.pad_id))
        stats = jax.device_get(self.score_fn(actor, frozen["reference"], rm, batch))
        scores, stopped = self._scores(rows, lists, stats.get("scores"))
        rewards = np.asarray(scores, np.float64)
        if g.overlong_buffer:
            rewards = rewards + g.overlong_coef * np.asarray(cf.overlong_penalty(
                jnp.asarray(mask.sum(1)), p.max_new_tokens, g.overlong_buffer))
        out = {k: batch[k] for k in self.ROLLOUT_KEYS}
        out.update(old_logprobs=np.asarray(stats["logprobs"]), ref_logprobs=np.asarray(stats["ref_logprobs"]),
                   rewards=rewards.astype(np.float32),
                   kl=np.where(mask > 0, stats["logprobs"] - stats["ref_logprobs"], 0.0).sum(1),
                   true_score=np.asarray([env.true_score(pr, r) for pr, r in zip(rows, lists)]),
                   stopped=stopped.astype(np.float32))
        return out

    def gather(self, actor: dict, frozen: dict, iteration: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """One iteration's rollouts, in group order (rows i*G .. i*G+G-1 answer one prompt), with their
        advantages, and the iteration's log record. Deterministic in (train.seed, iteration)."""
        p, g = self.config.ppo, self.config.grpo
        size, needed = g.group_size, p.rollout_batch // g.group_size
        t0 = time.perf_counter()
        draws: list[dict[str, Any]] = []

        def draw(salt: int) -> np.ndarray:
            draws.append(self._draw(actor, frozen, iteration, salt))
            return draws[-1]["rewards"]

        if g.dynamic_sampling:
            kept, info = cf.fill_groups(draw, needed, size, g.max_sampling_rounds)
            if len(kept) < needed:  # out of draws: uninformative groups (no gradient) keep the shapes fixed
                spare = [(k, j) for k in range(len(draws)) for j in range(needed) if (k, j) not in kept]
                kept = kept + spare[:needed - len(kept)]
        else:
            draw(0)
            kept, info = [(0, j) for j in range(needed)], {"rounds": 1}
        rows = [(k, j * size + i) for k, j in kept for i in range(size)]
        rollout = {key: np.stack([draws[k][key][i] for k, i in rows]) for key in draws[0]}
        advantages = np.asarray(self.advantage_fn(jnp.asarray(rollout["rewards"]), size))
        rollout["advantages"] = np.where(rollout["mask"] > 0, advantages[:, None], 0.0).astype(np.float32)
        first = draws[0]  # the policy's own statistics: the first draw, before any group was dropped
        record = dict(
            iteration=iteration, reward_mean=float(first["rewards"].mean()), kl=float(first["kl"].mean()),
            true_score=float(first["true_score"].mean()), response_length=float(first["mask"].sum(1).mean()),
            stopped=float(first["stopped"].mean()),
            groups_informative=float(cf.informative_groups(first["rewards"], size).mean()),
            sampling_rounds=float(info["rounds"]), time_sampling=time.perf_counter() - t0)
        return rollout, record

    def _collect(self, state: train.State) -> None:
        self.iteration += 1
        rollout, record = self.gather(state["params"], state["frozen"], self.iteration)
        self.records.append(record)
        self._enqueue({k: rollout[k] for k in (*self.ROLLOUT_KEYS, "old_logprobs", "ref_logprobs", "advantages")},
                      self.iteration)
        self._collected_at = time.perf_counter()


@workdir_lib.holding
def run_grpo(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, float]]:
    """Critic-free RL to `ppo.iterations` (resuming from the workdir's newest checkpoint); the metric records."""
    validate(config)
    config, tok, policy, rm = ppo.load_models(config, workdir, critic=False)
    p, g = config.ppo, config.grpo
    env = ppo.make_environment(config, tok)
    trainer = train.Trainer(config, objective=OBJECTIVE)
    log_line(f"maxlm.grpo: {config_lib.describe(config)}; policy {p.policy}; reward {p.reward_model or p.reward_fn}; "
             f"{g.group_size} replies per prompt; advantage {g.advantage}; loss {g.loss_agg}; clip "
             f"[{1 - g.clip_low:g}, {1 + g.clip_high:g}]; KL {g.kl_coef} x {g.kl_estimator}"
             + ("; dynamic sampling" if g.dynamic_sampling else ""))
    frozen = trainer.place_frozen({"reference": ppo.load_reference(config, policy),
                                   **({"reward_model": rm} if rm is not None else {})})
    feed = GroupFeed(config, env, tok, *ppo.rollout_lengths(config, env))
    return trainer_lib.run(
        config, workdir, trainer, feed, frozen=frozen, evaluate=ppo.held_out_fn(config, env, "", "GRPO"),
        eval_at_start=True,
        init_state=lambda: trainer.init_state(jax.random.key(config.train.seed), params=policy, frozen=frozen),
        plot=("grpo.png", ("reward_mean", "true_score", "eval_true_score", "kl"), ""),
        progress_keys=("reward_mean", "true_score", "eval_true_score", "kl", "groups_informative", "response_length"))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    distributed.initialize_from_flags()
    run_grpo(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_config_flag("configs/grpo_tiny.py")
    flags.declare_key_flag("config")
    flags.DEFINE_string("workdir", "runs/grpo", "Directory for checkpoints, metrics.jsonl, TensorBoard, grpo.png.")
    distributed.define_flags()
    cli.run(main, user_errors=(pretrained.BaseModelError, ppo.PPOError))
