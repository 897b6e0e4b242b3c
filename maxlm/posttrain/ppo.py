"""PPO for RLHF (InstructGPT, Ouyang et al. 2022; Ziegler et al. 2019), as pure jitted steps.

    python -m maxlm.ppo --config=configs/ppo_tiny.py --workdir=runs/ppo \
        [--config.ppo.policy=runs/sft --config.ppo.reward_model=runs/rm]

Four models: the actor (the policy being trained, from the SFT model), the critic (a value head on a trunk,
from the reward model by default -- InternLM2, section 4.3.1), the frozen reference policy (the SFT model)
and the frozen reward model. Actor and critic are one parameter tree {"actor", "critic"} trained by one
optimizer; reference and reward model are the objective's frozen trees. PPO runs on `maxlm.trainer`'s
loop like every other stage -- one step counter (optimizer updates), checkpoints, SIGTERM, bad-step reload
-- with its rollouts as the feed's collect phase (`RolloutFeed`): a checkpoint, a log line and a clean stop
come at iteration boundaries, so a resumed run repeats exactly the iterations an uninterrupted one runs.
`checkpoint.every_steps` counts optimizer updates (rollout_batch / data.batch_size x epochs per iteration);
`ppo.iterations` and `ppo.eval_every` count iterations.

One iteration (every array op inside is jitted):
  1. sample `rollout_batch` train prompts and a response to each through the generation engine (temperature 1:
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

import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from maxlm import cli, data
from maxlm import config as config_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.errors import UserError
from maxlm.inference.engine import Engine, SamplingParams
from maxlm.interop import pretrained
from maxlm.model import decoder as model, sampler as sample, trees
from maxlm.posttrain import environments, graph, reward, rl
from maxlm.posttrain.environments import Prompt, TaskEnvironment  # noqa: F401  (their home before environments.py)
from maxlm.training import distributed, pretrain as train
from maxlm.training import workdir as workdir_lib
from maxlm.training import trainer as trainer_lib
from maxlm.training.metrics import log_line

assert graph.Environment  # the shortest-path environment registers itself on import


class PPOError(UserError):
    """A PPO set-up that cannot work (mismatched tokenizers, missing models): one line for the user."""


# The trained tree: the actor (a language model) and the critic (a value head), as `maxlm.model.trees` names them.
LAYOUT = {"actor": "lm", "critic": "value"}
ROLLOUT_SLOTS = 64  # the engine's batch for rollouts: up to this many replies decode together


def abstract_params(config: ml_collections.ConfigDict) -> dict:
    return trees.abstract(config, LAYOUT)


def logical_axes(config: ml_collections.ConfigDict) -> dict:
    return trees.logical_axes(config, LAYOUT)


def init(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    a, c = jax.random.split(rng)
    return {"actor": model.init(config, a), "critic": reward.init(config, c)}


def ppo_loss(params: dict, config: ml_collections.ConfigDict, batch: train.Batch, frozen: Any = None
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
    logits, router = model.apply_with_aux(config, params["actor"], batch["inputs"], **kw)
    logits = logits[:, -r:]
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
    extra, router_metrics = train.router_loss(config, router, tokens)  # a mixture of experts' router losses
    loss = loss + extra
    sums.update(router_metrics)
    if p.ptx_coef > 0:
        ptx_sum, ptx_tokens = train.loss_fn(params["actor"], config, {
            "inputs": batch["ptx_inputs"], "targets": batch["ptx_targets"], "positions": batch["ptx_positions"],
            "segment_ids": batch["ptx_segment_ids"], "loss_weights": batch["ptx_loss_weights"]})
        # ptx_coef x (mean PTX cross-entropy), expressed per response token so the step's division by the
        # response-token count leaves exactly that.
        loss = loss + p.ptx_coef * ptx_sum / jnp.maximum(ptx_tokens, 1.0) * tokens
        sums["ptx_loss"] = ptx_sum / jnp.maximum(ptx_tokens, 1.0) * tokens
    return loss, sums


def frozen_trees(config: ml_collections.ConfigDict) -> dict:
    """The frozen reference policy, and the reward model when the reward is one."""
    return {"reference": "lm", **({"reward_model": "value"} if config.ppo.reward_fn == "model" else {})}


OBJECTIVE = train.Objective("ppo", ppo_loss, LAYOUT, init, frozen=frozen_trees,
                            policy="actor")


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


def pretraining_batches(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> data.PackedIterator:
    """PPO-ptx's language-model batches (InstructGPT, section 3.5: the pretraining gradients mixed into PPO to
    keep public-benchmark performance): `data.*` packed to `data.seq_len`, `data.batch_size` rows per PPO
    minibatch, read in full on every host exactly as the rollouts are."""
    return data.PackedIterator(data.make_source(config, "train"), tok, seq_len=config.data.seq_len,
                               batch_size=config.data.batch_size, seed=config.data.shuffle_seed, host_id=0,
                               num_hosts=1)


def make_environment(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer):
    return environments.make(config, tok)


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


def load_models(config: ml_collections.ConfigDict, workdir: str, critic: bool = True):
    """(run config, tokenizer, policy params, reward-model params or None); `critic` False for the
    critic-free methods (`maxlm.grpo`), which share PPO's section and loading."""
    p = config.ppo
    config_lib.validate(config)
    environments.validate(config)
    config_lib.require_single_stage(config, "maxlm.ppo" if critic else "maxlm.grpo")
    if config.lora.rank:
        raise config_lib.ConfigError("lora.rank", "RL trains every parameter of the policy (LoRA is for "
                                                  "maxlm.sft and maxlm.dpo); set 0")
    if p.rollout_batch % config.data.batch_size:
        raise config_lib.ConfigError("ppo.rollout_batch", f"must be a multiple of data.batch_size="
                                     f"{config.data.batch_size} (the minibatch)")
    policy_config, policy, tok_path = pretrained.load_base(p.policy, p.policy_step, key="ppo.policy")
    if not tok_path or not os.path.exists(tok_path):
        raise PPOError(f"ppo.policy={p.policy} has no tokenizer (tokenizer.json or tokenizer.model)")
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
    elif critic and p.critic_init == "reward":
        raise config_lib.ConfigError("ppo.critic_init", "must be policy when there is no reward model")
    run_config = pretrained.with_base_model(config, policy_config, policy_config.model.vocab_size)
    with run_config.unlocked():
        run_config.ppo.policy = os.path.abspath(p.policy)
        if p.reference:
            run_config.ppo.reference = os.path.abspath(p.reference)
        if p.reward_model:
            run_config.ppo.reward_model = os.path.abspath(p.reward_model)
        # One step counter: optimizer updates. A log line per iteration; evaluation every ppo.eval_every.
        updates = p.epochs * (p.rollout_batch // config.data.batch_size)
        run_config.train.num_steps = p.iterations * updates
        run_config.train.log_every = updates
        run_config.train.eval_every = p.eval_every * updates
    config_lib.validate(run_config)
    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(workdir, tokenizer_lib.file_name(tok_path))
    if not os.path.exists(target):
        tokenizer_lib.copy_model(tok_path, target)
    return run_config, tok, policy, rm


def load_reference(config: ml_collections.ConfigDict, policy: dict) -> dict:
    """The KL term's frozen reference: `ppo.reference` when set (online RLHF's later rounds: the SFT policy,
    while the actor starts from the last round's), else the starting policy itself."""
    p = config.ppo
    if not p.reference:
        return policy
    _, reference, _ = pretrained.load_base(p.reference, p.reference_step, key="ppo.reference")
    if not pretrained.same_shapes(reference, policy):
        raise PPOError(f"ppo.reference={p.reference} and ppo.policy={p.policy} differ in architecture")
    return reference


class RolloutFeed(trainer_lib.Feed):
    """PPO's collect phase as the trainer's feed: when its minibatches run out, `next(state)` samples a
    new iteration's rollouts from the current actor, scores them (reference, critic, reward), computes
    advantages and queues `epochs` shuffled passes of minibatches (with PPO-ptx, a fresh pretraining batch
    joins each as it is taken). Its position -- the iteration, the KL coefficient, the pretraining data --
    is resumable between iterations, where `boundary` is true."""

    def __init__(self, config: ml_collections.ConfigDict, env: Any, tok: tokenizer_lib.Tokenizer, prompt_len: int,
                 rm_len: int, ptx_iter: data.PackedIterator | None):
        self.config, self.env, self.tok = config, env, tok
        self.prompt_len, self.rm_len, self.ptx_iter = prompt_len, rm_len, ptx_iter
        self.iteration = 0
        self.kl_coef = float(config.ppo.init_kl_coef)
        self.queue: list[dict[str, np.ndarray]] = []
        self.records: list[dict[str, float]] = []
        self._collected_at = time.perf_counter()
        self.score_fn = jax.jit(functools.partial(_score, config))
        self.advantage_fn = jax.jit(functools.partial(_advantages, config))
        self.engine: Engine | None = None

    def _rollouts(self, actor: dict, prompts: list[list[int]], iteration: int, salt: int = 0) -> np.ndarray:
        """One temperature-`ppo.temperature` reply per prompt -> [B, max_new_tokens], the stop token kept and
        padding after it. Through the continuous-batching engine (a slot frees when its reply stops), which
        keeps its compiled programs and takes the actor's new weights each iteration; request i draws with
        a seed from (train.seed, iteration, salt, i), so a resumed run samples the same replies. On a mesh the engine
        decodes sharded like the trainer (across processes too: every process runs the same schedule)."""
        config, p, tok, env = self.config, self.config.ppo, self.tok, self.env
        if self.engine is None:
            leaf = jax.tree.leaves(actor)[0]
            mesh = getattr(leaf.sharding, "mesh", None) if isinstance(leaf, jax.Array) else None
            # Every prompt arrives at once: prefill them in one call and decode each wave in one block.
            slots = min(p.rollout_batch, ROLLOUT_SLOTS)
            self.engine = Engine(config, actor, slots=slots, prefill_rows=slots, block=p.max_new_tokens,
                                 max_len=self.prompt_len + p.max_new_tokens, eos_id=env.stop_id,
                                 mesh=mesh if mesh is not None and mesh.size > 1 else None)
        else:
            self.engine.update_params(actor)
        entropy = environments.seed_sequence(config.train.seed, iteration, 2, salt=salt)
        seeds = np.random.default_rng(entropy).integers(2 ** 31, size=len(prompts))
        done = self.engine.generate(prompts, [SamplingParams(max_tokens=p.max_new_tokens, temperature=p.temperature,
                                                             seed=int(s)) for s in seeds])
        out = np.full((len(prompts), p.max_new_tokens), tok.pad_id, np.int32)
        for i, req in enumerate(done):
            row = req.tokens + ([env.stop_id] if req.finish_reason == "stop" else [])
            out[i, :len(row)] = row
        return out

    def _scores(self, prompts: list[Prompt], responses: list[list[int]], rm_scores: Any
                ) -> tuple[jax.Array, np.ndarray]:
        """Each reply's sequence reward, float32 -- the reward model's score (`rm_scores`), or the environment's
        program when there is no reward model (None) -- and whether the reply emitted the stop token."""
        env, p = self.env, self.config.ppo
        stopped = np.asarray([env.stop_id in r for r in responses])
        if rm_scores is None:
            return jnp.asarray([env.reward(pr, r) for pr, r in zip(prompts, responses)], jnp.float32), stopped
        if p.penalize_no_stop:
            # A reply cut off at max_new_tokens ends on a token the reward model never scored in training:
            # give it a fixed low score instead of an out-of-distribution one ("N implementation details").
            rm_scores = jnp.where(jnp.asarray(stopped), rm_scores, jnp.float32(p.no_stop_score))
        return rm_scores, stopped

    def _enqueue(self, rollout: dict[str, np.ndarray], iteration: int) -> None:
        """`ppo.epochs` passes over the iteration's rollouts, each in a fresh order, as minibatches of
        `data.batch_size` rows."""
        order_rng = np.random.default_rng((self.config.train.seed, iteration, 1))
        size, n = self.config.data.batch_size, self.config.ppo.rollout_batch
        for _ in range(self.config.ppo.epochs):
            order = order_rng.permutation(n)
            self.queue += [{k: v[order[m:m + size]] for k, v in rollout.items()} for m in range(0, n, size)]

    @property
    def boundary(self) -> bool:
        return not self.queue

    def get_state(self) -> dict:
        out = {"iteration": self.iteration, "kl_coef": self.kl_coef}
        if self.ptx_iter is not None:
            out["ptx_data"] = self.ptx_iter.get_state()
        return out

    def set_state(self, state: dict) -> None:
        self.iteration, self.kl_coef = int(state["iteration"]), float(state["kl_coef"])
        if self.ptx_iter is not None and "ptx_data" in state:
            self.ptx_iter.set_state(state["ptx_data"])

    def discard(self) -> bool:
        self.queue, self.records = [], []  # rollouts of discarded parameters: the next iteration samples afresh
        return True

    def next(self, state: train.State) -> dict[str, np.ndarray]:
        if not self.queue:
            self._collect(state)
        minibatch = self.queue.pop(0)
        if self.ptx_iter is not None:  # PPO-ptx: a fresh pretraining batch beside every minibatch
            minibatch.update({f"ptx_{k}": v for k, v in next(self.ptx_iter).items()})
        return minibatch

    def _collect(self, state: train.State) -> None:
        env, tok, p = self.env, self.tok, self.config.ppo
        self.iteration += 1
        iteration = self.iteration
        actor, critic, frozen = state["params"]["actor"], state["params"]["critic"], state["frozen"]
        t0 = time.perf_counter()
        prompts = env.sample_prompts(iteration, p.rollout_batch)
        responses = self._rollouts(actor, [pr.policy_ids for pr in prompts], iteration)
        batch, mask, response_lists = _layout([pr.policy_ids for pr in prompts], responses, self.prompt_len,
                                              tok.pad_id, env.stop_id)
        t1 = time.perf_counter()
        rm = frozen.get("reward_model")
        if rm is not None:
            batch.update(_reward_inputs(prompts, response_lists, self.rm_len, tok.pad_id))
        stats = self.score_fn(actor, frozen["reference"], critic, rm, batch)
        scores, stopped = self._scores(prompts, response_lists, stats.get("scores"))
        extra = self.advantage_fn(scores, stats, jnp.asarray(mask), jnp.float32(self.kl_coef))
        rollout = {k: batch[k] for k in ("inputs", "positions", "segment_ids", "responses", "mask")}
        rollout.update(old_logprobs=np.asarray(stats["logprobs"]), old_values=np.asarray(stats["values"]),
                       advantages=np.asarray(extra["advantages"]), returns=np.asarray(extra["returns"]))
        self._enqueue(rollout, iteration)
        kl = float(jnp.mean(extra["kl"]))
        self.records.append(dict(
            iteration=iteration, reward_mean=float(jnp.mean(scores)), kl=kl, kl_coef=self.kl_coef,
            kl_target=p.target_kl, explained_variance=float(extra["explained_variance"]),
            response_length=float(mask.sum(1).mean()), stopped=float(stopped.mean()),
            true_score=float(np.mean([env.true_score(pr, r) for pr, r in zip(prompts, response_lists)])),
            time_sampling=t1 - t0, time_scoring=time.perf_counter() - t1))
        self._collected_at = time.perf_counter()
        self.kl_coef = float(rl.update_kl_coef(self.kl_coef, kl, p.rollout_batch, p.target_kl or None, p.kl_horizon))

    def log_record(self) -> dict[str, float]:
        """The iterations since the last log line: their last iteration number, their mean statistics."""
        if not self.records:
            return {}
        out = {k: float(np.mean([r[k] for r in self.records])) for k in self.records[0]}
        out["iteration"] = self.records[-1]["iteration"]
        out["time_training"] = time.perf_counter() - self._collected_at
        self.records = []
        return out


def rollout_lengths(config: ml_collections.ConfigDict, env: Any) -> tuple[int, int]:
    """(prompt length, reward-model input length): fixed shapes, so each program compiles once -- the longest
    prompt of either split, in either view."""
    p = config.ppo
    views = [env.prompt(item) for item in env.train_items + env.eval_items]
    longest = max(len(v.policy_ids) for v in views)
    if longest + p.max_new_tokens > config.model.max_seq_len:
        raise PPOError(f"prompts of up to {longest} tokens + ppo.max_new_tokens={p.max_new_tokens} exceed "
                       f"model.max_seq_len={config.model.max_seq_len}")
    prompt_len = min(sample.bucket_length(longest), config.model.max_seq_len - p.max_new_tokens)
    return prompt_len, max(len(v.reward_ids) for v in views) + p.max_new_tokens


def held_out_fn(config: ml_collections.ConfigDict, env: Any, policy: str, stage: str
                ) -> Callable[[train.State], dict[str, float]]:
    """The loop's evaluation: the environment's held-out true score of the policy (at `policy` in the
    trained tree, "" for the tree itself)."""
    def held_out(state: train.State) -> dict[str, float]:
        params = state["params"][policy] if policy else state["params"]
        score = env.held_out_score(config, jax.device_get(params))
        if int(state["step"]) == 0:
            log_line(f"held-out true score before {stage}: {score:.3f}")
        return {"eval_true_score": score}
    return held_out


@workdir_lib.holding
def run_ppo(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, float]]:
    """PPO to `ppo.iterations` (resuming from the workdir's newest checkpoint); returns the metric records."""
    config, tok, policy, rm = load_models(config, workdir)
    p = config.ppo
    env = make_environment(config, tok)
    trainer = train.Trainer(config, objective=OBJECTIVE)
    log_line(f"maxlm.ppo: {config_lib.describe(config)}; policy {p.policy}; reward {p.reward_model or p.reward_fn}; "
             f"critic from {p.critic_init}")
    frozen = trainer.place_frozen({"reference": load_reference(config, policy),
                                   **({"reward_model": rm} if rm is not None else {})})
    critic = rm if p.critic_init == "reward" else jax.device_get(reward.from_lm(policy))
    params = {"actor": policy, "critic": critic}
    del policy, critic

    prompt_len, rm_len = rollout_lengths(config, env)
    feed = RolloutFeed(config, env, tok, prompt_len, rm_len, pretraining_batches(config, tok) if p.ptx_coef > 0 else None)

    return trainer_lib.run(
        config, workdir, trainer, feed, frozen=frozen, evaluate=held_out_fn(config, env, "actor", "PPO"),
        eval_at_start=True,
        init_state=lambda: trainer.init_state(jax.random.key(config.train.seed), params=params, frozen=frozen),
        plot=("ppo.png", ("reward_mean", "true_score", "eval_true_score", "kl"), ""),
        progress_keys=("reward_mean", "true_score", "eval_true_score", "kl", "kl_coef", "response_length"))


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
