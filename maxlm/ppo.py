"""PPO for RLHF (InstructGPT, Ouyang et al. 2022; Ziegler et al. 2019), as pure jitted steps.

    python -m maxlm.ppo --config=configs/ppo_tiny.py --workdir=runs/ppo \
        [--config.ppo.policy=runs/sft --config.ppo.reward_model=runs/rm]

Four models: the actor (the policy being trained, from the SFT model), the critic (a value head on a trunk,
from the reward model by default -- InternLM2, section 4.3.1), the frozen reference policy (the SFT model)
and the frozen reward model. Actor and critic are one parameter tree {"actor", "critic"} trained by one
optimizer, so they share the trainer, the sharding and the checkpoints of every other stage.

One iteration (the host loop; every array op inside is jitted):
  1. sample `rollout_batch` train prompts and a response to each with the KV-cache sampler (temperature 1:
     the policy's own distribution, so the rollout's log-probabilities are the behaviour policy's);
  2. score: actor and reference log-probabilities and critic values of every response token, and the reward
     model's score of the whole exchange under its domain's system prompt (COOL RLHF's conditional reward);
  3. per-token rewards: -beta * (log pi - log pi_ref), plus the score at the last token (`rl.kl_penalized_rewards`);
     GAE advantages and returns (gamma, lambda); advantages whitened over the batch;
  4. `epochs` passes of shuffled minibatches (`data.batch_size` rollouts): the clipped policy loss, the clipped
     value loss (times `vf_coef`), minus an entropy bonus -- every token of every response weighs the same --
     plus, when `ptx_coef` > 0, InstructGPT's PPO-ptx term: `ptx_coef` x the mean language-model loss on a
     pretraining batch (`data.*`, one fresh batch per minibatch; its position is checkpointed);
  5. the adaptive KL controller moves beta toward `target_kl` (per-sequence KL).

`metrics.jsonl` gets one line per iteration: reward_mean, kl (per sequence, vs the reference), kl_coef,
entropy, policy/value clip fractions, value_loss, explained_variance, response_length, true_score (the
built-in checker on the rollouts), the time split sampling / scoring / training, and, every `eval_every`
iterations, eval_true_score: greedy exact match on held-out items.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from maxlm import (chat, checkpoint, cli, data, distributed, model, pretrained, reward, rl, sample, sharding, tasks,
                   train)
from maxlm import config as config_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.data import preference
from maxlm.metrics import MetricsWriter, log_line


class PPOError(ValueError):
    """A PPO set-up that cannot work (mismatched tokenizers, missing models): one line for the user."""


def abstract_params(config: ml_collections.ConfigDict) -> dict:
    return {"actor": model.abstract_params(config), "critic": reward.abstract_params(config)}


def logical_axes(config: ml_collections.ConfigDict) -> dict:
    return {"actor": model.logical_axes(config), "critic": reward.logical_axes(config)}


def init(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    a, c = jax.random.split(rng)
    return {"actor": model.init(config, a), "critic": reward.init(config, c)}


def ppo_loss(params: dict, config: ml_collections.ConfigDict, batch: train.Batch, base: Any = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum over response tokens of clipped policy loss + vf_coef * clipped value loss - entropy_coef *
    entropy (+ the PTX term); {"weight": response tokens, and the parts, clip fractions, entropy, approx_kl}.

    batch: inputs/positions/segment_ids [B, P+R-1] (left-padded prompt, then the response), and, over the R
    response tokens, responses, mask, old_logprobs, old_values, advantages, returns [B, R]; with PTX also
    ptx_inputs/ptx_targets/ptx_positions/ptx_segment_ids/ptx_loss_weights.
    """
    p = config.ppo
    mask = batch["mask"]
    r = mask.shape[1]
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    logits = model.apply(config, params["actor"], batch["inputs"], **kw)[:, -r:]
    values = reward.token_values(config, params["critic"], batch["inputs"], **kw)[:, -r:]
    logprobs = rl.logprobs_from_logits(logits, batch["responses"])
    pg, pg_clipped = rl.policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], p.clip_eps)
    vf, vf_clipped = rl.value_loss(values, batch["old_values"], batch["returns"], p.value_clip)
    entropy = rl.entropy_from_logits(logits)
    total = lambda x: rl.masked_sum(x, mask)  # noqa: E731
    tokens = jnp.sum(mask.astype(jnp.float32))
    loss = total(pg + p.vf_coef * vf - p.entropy_coef * entropy)
    sums = {"weight": tokens, "policy_loss": total(pg), "value_loss": total(vf),
            "policy_clipfrac": total(pg_clipped), "value_clipfrac": total(vf_clipped), "entropy": total(entropy),
            "approx_kl": total(rl.approx_kl(logprobs, batch["old_logprobs"]))}
    if p.ptx_coef > 0:
        ptx_sum, ptx_tokens = train.loss_fn(params["actor"], config, {
            "inputs": batch["ptx_inputs"], "targets": batch["ptx_targets"], "positions": batch["ptx_positions"],
            "segment_ids": batch["ptx_segment_ids"], "loss_weights": batch["ptx_loss_weights"]})
        # ptx_coef x (mean PTX cross-entropy), expressed per response token so the step's division by the
        # response-token count leaves exactly that.
        loss = loss + p.ptx_coef * ptx_sum / jnp.maximum(ptx_tokens, 1.0) * tokens
        sums["ptx_loss"] = ptx_sum / jnp.maximum(ptx_tokens, 1.0) * tokens
    return loss, sums


OBJECTIVE = train.Objective(ppo_loss, abstract_params, logical_axes, init)


def _score(config: ml_collections.ConfigDict, actor: dict, ref: dict, critic: dict, rm: dict | None,
           batch: dict) -> dict[str, jax.Array]:
    """Rollout statistics the losses need, from the behaviour policy, the reference, the critic and the RM."""
    r = batch["responses"].shape[1]
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    out = {"logprobs": rl.logprobs_from_logits(model.apply(config, actor, batch["inputs"], **kw)[:, -r:],
                                               batch["responses"]),
           "ref_logprobs": rl.logprobs_from_logits(model.apply(config, ref, batch["inputs"], **kw)[:, -r:],
                                                   batch["responses"]),
           "values": reward.token_values(config, critic, batch["inputs"], **kw)[:, -r:]}
    if rm is not None:
        out["scores"] = reward.scores(config, rm, batch["rm_inputs"], batch["rm_positions"],
                                      batch["rm_segment_ids"], batch["rm_last"])
    return out


def _advantages(config: ml_collections.ConfigDict, scores: jax.Array, stats: dict, mask: jax.Array,
                kl_coef: jax.Array) -> dict[str, jax.Array]:
    p = config.ppo
    rewards, kl = rl.kl_penalized_rewards(scores, stats["logprobs"], stats["ref_logprobs"], mask, kl_coef)
    advantages, returns = rl.gae(rewards, stats["values"], mask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = rl.whiten(advantages, mask)
    return {"advantages": advantages, "returns": returns, "kl": jnp.sum(kl, axis=-1),
            "explained_variance": rl.explained_variance(stats["values"], returns, mask)}


# ----------------------------------------------------------------------------------------------------------
# Environments: where prompts come from and how responses are judged by a hidden rule.


@dataclasses.dataclass
class Prompt:
    policy_ids: list[int]  # what the policy sees
    reward_ids: list[int]  # what the reward model sees before the response (its own system prompt)
    item: Any  # the task item, for the hidden checker


class TaskEnvironment:
    """The built-in SFT tasks: chat-formatted prompts, exact-match checkers, the reward model's domain prompt."""

    def __init__(self, config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer):
        p = config.ppo
        self.config, self.tok = config, tok
        self.template = chat.load_template(config.sft.template)
        self.rm_system = preference.DOMAINS[p.reward_domain] if p.reward_domain else ""
        from maxlm import evaluate

        self.stop_id = evaluate.stop_id(self.template, tok)
        self.train_items = [i for t in p.tasks
                            for i in tasks.make_items(t, "train", config.sft.task_train_size, seed=config.sft.task_seed)]
        self.eval_items = [i for t in p.tasks for i in tasks.make_items(t, "eval", p.eval_items,
                                                                       seed=config.sft.task_seed)]

    def prompt(self, item: tasks.Item) -> Prompt:
        policy = tasks.messages(item, self.config.sft.system_prompt, with_answer=False)
        judge = tasks.messages(item, self.rm_system, with_answer=False)
        return Prompt(chat.render_prompt(self.template, self.tok, policy),
                      chat.render_prompt(self.template, self.tok, judge), item)

    def sample_prompts(self, iteration: int, n: int) -> list[Prompt]:
        rng = np.random.default_rng((self.config.train.seed, iteration))
        return [self.prompt(self.train_items[i]) for i in rng.choice(len(self.train_items), n, replace=False)]

    def true_score(self, prompt: Prompt, response: list[int]) -> float:
        """The hidden checker on the reply text (the stop marker, when sampled, is not text)."""
        if self.stop_id in response:
            response = response[:response.index(self.stop_id)]
        return float(tasks.check(prompt.item, self.tok.decode(response)))

    def held_out_score(self, config: ml_collections.ConfigDict, actor: dict) -> float:
        from maxlm import evaluate

        results = [evaluate.task_accuracy(config, actor, self.tok, t, n=config.ppo.eval_items) for t in config.ppo.tasks]
        return float(np.mean([r["accuracy"] for r in results]))


def pretraining_batches(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> data.PackedIterator:
    """PPO-ptx's language-model batches (InstructGPT, section 3.5: the pretraining gradients mixed into PPO to
    keep public-benchmark performance): `data.*` packed to `data.seq_len`, `data.batch_size` rows per PPO
    minibatch, read in full on every host exactly as the rollouts are."""
    return data.PackedIterator(data.make_source(config, "train"), tok, seq_len=config.data.seq_len,
                               batch_size=config.data.batch_size, seed=config.data.shuffle_seed, host_id=0,
                               num_hosts=1)


def make_environment(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer):
    if config.ppo.reward_fn == "shortest_path":
        from maxlm import graph

        return graph.Environment(config, tok)
    return TaskEnvironment(config, tok)


# ----------------------------------------------------------------------------------------------------------
# Rollouts


def _layout(prompts: list[list[int]], responses: np.ndarray, prompt_len: int, pad_id: int, stop_id: int | None
            ) -> tuple[dict[str, np.ndarray], np.ndarray, list[list[int]]]:
    """Left-padded prompt + response -> model inputs [B, P+R-1] and the response mask [B, R] (the stop
    token included: ending the reply is an action too). Also the responses as lists (stop included)."""
    b, r = responses.shape
    tokens, positions, segments = sample.left_pad(prompts, prompt_len, pad_id)
    mask = np.zeros((b, r), np.float32)
    lists = []
    for i, row in enumerate(responses.tolist()):
        n = r
        if stop_id is not None and stop_id in row:
            n = row.index(stop_id) + 1
        mask[i, :n] = 1
        lists.append(row[:n])
    start = positions[:, -1:] + 1
    seq_positions = np.concatenate([positions, start + np.arange(r, dtype=np.int32)[None]], axis=1)
    seq_segments = np.concatenate([segments, mask.astype(np.int32)], axis=1)
    seq = np.concatenate([tokens, np.where(mask > 0, responses, pad_id).astype(np.int32)], axis=1)
    batch = {"inputs": seq[:, :-1], "positions": seq_positions[:, :-1], "segment_ids": seq_segments[:, :-1],
             "responses": np.where(mask > 0, responses, pad_id).astype(np.int32), "mask": mask}
    return batch, mask, lists


def _reward_inputs(prompts: list[Prompt], responses: list[list[int]], length: int, pad_id: int
                   ) -> dict[str, np.ndarray]:
    """The reward model's view, right-padded: its own prompt rendering, then the response."""
    b = len(prompts)
    out = {"rm_inputs": np.full((b, length), pad_id, np.int32), "rm_segment_ids": np.zeros((b, length), np.int32),
           "rm_positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
           "rm_last": np.zeros((b, length), np.float32)}
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = (prompt.reward_ids + response)[:length]
        out["rm_inputs"][i, :len(ids)] = ids
        out["rm_segment_ids"][i, :len(ids)] = 1
        out["rm_last"][i, len(ids) - 1] = 1.0
    return out


# ----------------------------------------------------------------------------------------------------------
# The loop


def load_models(config: ml_collections.ConfigDict, workdir: str):
    """(run config, tokenizer, policy params, reward-model params or None)."""
    p = config.ppo
    config_lib.validate(config)
    config_lib.require_single_stage(config, "maxlm.ppo")
    if config.lora.rank:
        raise config_lib.ConfigError("lora.rank", "PPO trains every parameter of actor and critic (LoRA is for "
                                                  "maxlm.sft); set 0")
    if p.rollout_batch % config.data.batch_size:
        raise config_lib.ConfigError("ppo.rollout_batch", f"must be a multiple of data.batch_size="
                                     f"{config.data.batch_size} (the minibatch)")
    policy_config, policy, tok_path = pretrained.load_base(p.policy, p.policy_step, key="ppo.policy")
    if not tok_path or not os.path.exists(tok_path):
        raise PPOError(f"ppo.policy={p.policy} has no tokenizer.model")
    tok = tokenizer_lib.load(tok_path)
    rm = None
    if p.reward_fn == "model":
        if not p.reward_model or not os.path.isdir(p.reward_model):
            raise PPOError(f"ppo.reward_model={p.reward_model!r} is not a reward-model workdir (python -m maxlm.reward)")
        rm_config, rm, rm_tok = reward.load(p.reward_model)
        if rm_tok.vocab_size != tok.vocab_size or any(
                rm_config.model[k] != policy_config.model[k] for k in pretrained.SHAPE_KEYS):
            raise PPOError(f"the reward model at {p.reward_model} and the policy at {p.policy} differ in tokenizer "
                           "or architecture; this PPO runs both with one model config")
    elif p.critic_init == "reward":
        raise config_lib.ConfigError("ppo.critic_init", "must be policy when there is no reward model")
    run_config = pretrained.with_base_model(config, policy_config, policy_config.model.vocab_size)
    with run_config.unlocked():
        run_config.ppo.policy = os.path.abspath(p.policy)
        if p.reward_model:
            run_config.ppo.reward_model = os.path.abspath(p.reward_model)
        run_config.train.num_steps = p.iterations * p.epochs * (p.rollout_batch // config.data.batch_size)
    config_lib.validate(run_config)
    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(target):
        tokenizer_lib.copy_model(tok_path, target)
    return run_config, tok, policy, rm


def run_ppo(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, float]]:
    """PPO to `ppo.iterations` (resuming from the workdir's newest checkpoint); returns the metric records."""
    config, tok, policy, rm = load_models(config, workdir)
    p = config.ppo
    env = make_environment(config, tok)
    trainer = train.Trainer(config, objective=OBJECTIVE)
    frozen_sh = sharding.param_shardings(config, trainer.mesh)
    ref = jax.device_put(policy, frozen_sh)
    rm_params = None
    if rm is not None:
        rm_params = jax.device_put(rm, sharding.param_shardings(config, trainer.mesh,
                                                                logical=reward.logical_axes(config)))
    critic = rm if p.critic_init == "reward" else jax.device_get(reward.from_lm(policy))
    score_fn = jax.jit(functools.partial(_score, config))
    advantage_fn = jax.jit(functools.partial(_advantages, config))
    primary = jax.process_index() == 0
    log_line(f"maxlm.ppo: {config_lib.describe(config)}; policy {p.policy}; reward {p.reward_model or p.reward_fn}; "
             f"critic from {p.critic_init}")

    ckpt = checkpoint.Checkpointer(workdir, config)
    ptx_iter = pretraining_batches(config, tok) if p.ptx_coef > 0 else None
    restored = train._restore(ckpt, trainer, {})
    if restored is not None:
        state, progress = restored
        if ptx_iter is not None and "ptx_data" in progress:
            ptx_iter.set_state(progress["ptx_data"])
        log_line(f"resumed after iteration {progress['iteration']} ({ckpt.directory})")
    else:
        state = trainer.init_state(jax.random.key(config.train.seed), params={"actor": policy, "critic": critic})
        progress = {"iteration": 0, "kl_coef": p.init_kl_coef}
    del policy, critic

    # Fixed shapes (one compiled program per stage): the longest prompt of either split, in either view.
    views = [env.prompt(item) for item in env.train_items + env.eval_items]
    longest = max(len(v.policy_ids) for v in views)
    if longest + p.max_new_tokens > config.model.max_seq_len:
        raise PPOError(f"prompts of up to {longest} tokens + ppo.max_new_tokens={p.max_new_tokens} exceed "
                       f"model.max_seq_len={config.model.max_seq_len}")
    prompt_len = min(sample.bucket_length(longest), config.model.max_seq_len - p.max_new_tokens)
    rm_len = max(len(v.reward_ids) for v in views) + p.max_new_tokens
    del views
    writer = MetricsWriter(workdir, enabled=primary)
    minibatches = p.rollout_batch // config.data.batch_size
    kl_coef = float(progress["kl_coef"])
    start = int(progress["iteration"])
    if start == 0 and primary:
        before = env.held_out_score(config, jax.device_get(state["params"]["actor"]))
        log_line(f"held-out true score before PPO: {before:.3f}")
        writer.write(0, {"eval_true_score": before})
    t_run = time.perf_counter()
    for iteration in range(start + 1, p.iterations + 1):
        t0 = time.perf_counter()
        prompts = env.sample_prompts(iteration, p.rollout_batch)
        tokens, positions, segments = sample.left_pad([pr.policy_ids for pr in prompts], prompt_len, tok.pad_id)
        responses = np.asarray(sample.sample_padded(
            config, state["params"]["actor"], tokens, positions, segments,
            rng=jax.random.fold_in(jax.random.key(config.train.seed), iteration), max_new_tokens=p.max_new_tokens,
            temperature=p.temperature, eos_id=env.stop_id, pad_id=tok.pad_id))
        batch, mask, response_lists = _layout([pr.policy_ids for pr in prompts], responses, prompt_len, tok.pad_id,
                                              env.stop_id)
        t1 = time.perf_counter()
        if rm_params is not None:
            batch.update(_reward_inputs(prompts, response_lists, rm_len, tok.pad_id))
        stats = score_fn(state["params"]["actor"], ref, state["params"]["critic"], rm_params, batch)
        scores = stats["scores"] if rm_params is not None else jnp.asarray(
            [env.reward(pr, r) for pr, r in zip(prompts, response_lists)], jnp.float32)
        stopped = np.asarray([env.stop_id in r for r in response_lists])
        if rm_params is not None and p.penalize_no_stop:
            # A reply cut off at max_new_tokens ends on a token the reward model never scored in training:
            # give it a fixed low score instead of an out-of-distribution one ("N implementation details").
            scores = jnp.where(jnp.asarray(stopped), scores, jnp.float32(p.no_stop_score))
        extra = advantage_fn(scores, stats, jnp.asarray(mask), jnp.float32(kl_coef))
        t2 = time.perf_counter()
        rollout = {k: batch[k] for k in ("inputs", "positions", "segment_ids", "responses", "mask")}
        rollout.update(old_logprobs=np.asarray(stats["logprobs"]), old_values=np.asarray(stats["values"]),
                       advantages=np.asarray(extra["advantages"]), returns=np.asarray(extra["returns"]))
        sums: dict[str, float] = {}
        order_rng = np.random.default_rng((config.train.seed, iteration, 1))
        for _ in range(p.epochs):
            order = order_rng.permutation(p.rollout_batch)
            for m in range(minibatches):
                rows = order[m * config.data.batch_size:(m + 1) * config.data.batch_size]
                minibatch = {k: v[rows] for k, v in rollout.items()}
                if ptx_iter is not None:  # PPO-ptx: a fresh pretraining batch beside every minibatch
                    minibatch.update({f"ptx_{k}": v for k, v in next(ptx_iter).items()})
                state, metrics = trainer.step(state, trainer.device_batch(minibatch))
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        t3 = time.perf_counter()
        updates = p.epochs * minibatches
        kl = float(jnp.mean(extra["kl"]))
        record = {k: v / updates for k, v in sums.items() if k not in ("lr", "bad_step", "tokens")}
        record.update(iteration=iteration, reward_mean=float(jnp.mean(scores)), kl=kl, kl_coef=kl_coef,
                      kl_target=p.target_kl,
                      explained_variance=float(extra["explained_variance"]),
                      response_length=float(mask.sum(1).mean()), stopped=float(stopped.mean()),
                      true_score=float(np.mean([env.true_score(pr, r) for pr, r in zip(prompts, response_lists)])),
                      time_sampling=t1 - t0, time_scoring=t2 - t1, time_training=t3 - t2,
                      lr=float(metrics["lr"]), bad_steps=sums.get("bad_step", 0.0))
        kl_coef = float(rl.update_kl_coef(kl_coef, kl, p.rollout_batch, p.target_kl or None, p.kl_horizon))
        last = iteration == p.iterations
        if iteration % p.eval_every == 0 or last:
            record["eval_true_score"] = env.held_out_score(config, jax.device_get(state["params"]["actor"]))
        if iteration % config.checkpoint.every_steps == 0 or last:
            progress = {"iteration": iteration, "kl_coef": kl_coef}
            if ptx_iter is not None:
                progress["ptx_data"] = ptx_iter.get_state()
            ckpt.save(iteration, state["params"], state["opt_state"], progress)
        writer.write(iteration, record)
        eta = (time.perf_counter() - t_run) / (iteration - start) * (p.iterations - iteration)
        log_line(f"iteration {iteration}/{p.iterations} | reward {record['reward_mean']:.3f} | true "
                 f"{record['true_score']:.3f}" + (f" | held-out {record['eval_true_score']:.3f}"
                                                  if "eval_true_score" in record else "")
                 + f" | kl {kl:.3f} (beta {record['kl_coef']:.4f}) | len {record['response_length']:.1f} | "
                 f"sample/score/train {t1 - t0:.1f}/{t2 - t1:.1f}/{t3 - t2:.1f}s | eta {eta / 60:.1f}m")
    ckpt.close()
    if primary and p.iterations > start:
        png = writer.plot("ppo.png", keys=("reward_mean", "true_score", "eval_true_score", "kl"), ylabel="")
        log_line(f"curves: {png}; metrics: {os.path.join(workdir, 'metrics.jsonl')}")
    writer.close()
    return writer.history


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    distributed.initialize_from_flags()
    run_ppo(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_config_flag("configs/ppo_tiny.py")
    flags.declare_key_flag("config")
    flags.DEFINE_string("workdir", "runs/ppo", "Directory for checkpoints, metrics.jsonl, TensorBoard, loss.png.")
    distributed.define_flags()
    cli.run(main, user_errors=(pretrained.BaseModelError, PPOError))
