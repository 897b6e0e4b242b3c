"""Reward model: the decoder with a scalar head, trained on preference pairs (InstructGPT, Ouyang et al. 2022).

    python -m maxlm.reward --config=configs/reward_tiny.py --workdir=runs/rm [--config.reward.base=runs/sft]

The model is the decoder trunk (no LM head) plus a vector `head` [D]: the reward of a conversation is the
head's projection of the final hidden state at its last real token (the assistant's end marker), as in
InstructGPT's RM and Hugging Face's `LlamaForSequenceClassification`. Applied at every token instead, the
same parameters give PPO's critic its per-token values (`token_values`), so a critic can start from the
reward model (InternLM2, section 4.3.1, found this better than starting from the policy).

Training minimises the pairwise (Bradley-Terry) loss -log sigmoid(r_chosen - r_rejected), summed over
pairs and divided by the number of pairs in the global batch. It starts from an SFT or pretrained
checkpoint (`reward.base`); the head starts at zero, so every reward is 0 at step 0 and the first updates
move only the head. Held-out pairwise accuracy and mean margin r_chosen - r_rejected are logged at every
evaluation and, per preference domain, written to `reward_eval.json` at the end.

Conditional reward prompts (COOL RLHF, InternLM2 section 4.3.1): a pair may carry a system prompt naming its
preference domain; the model is trained and later queried (by PPO) with it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from maxlm.data import chat, tasks
from maxlm.training import checkpoint, distributed, pretrain as train
from maxlm.training import workdir as workdir_lib
from maxlm import cli
from maxlm.interop import pretrained
from maxlm.posttrain import sft
from maxlm import config as config_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.data import preference
from maxlm.data.sources import split_indices
from maxlm.data import records
from maxlm.errors import InputError
from maxlm.training.metrics import log_line
# The model (decoder trunk + scalar head) lives with the models; its names stay importable from here.
from maxlm.model.value_head import abstract_params, from_lm, init, logical_axes, scores, token_values  # noqa: F401
from maxlm.evaluation import harness as evaluate
from maxlm.model import sampler as sample


def pair_margins(params: dict, config: ml_collections.ConfigDict, batch: train.Batch) -> jax.Array:
    """r_chosen - r_rejected [B] for a `preference.pair_batch`; chosen and rejected go through the model as
    one [2B, T] batch."""
    tokens = jnp.concatenate([batch["chosen_inputs"], batch["rejected_inputs"]])
    segments = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])
    last = jnp.concatenate([batch["chosen_last"], batch["rejected_last"]])
    positions = jnp.concatenate([batch["positions"], batch["positions"]])
    r_chosen, r_rejected = jnp.split(scores(config, params, tokens, positions, segments, last), 2)
    return r_chosen - r_rejected


def pair_loss(params: dict, config: ml_collections.ConfigDict, batch: train.Batch, frozen: Any = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(sum over pairs of -log sigmoid(r_chosen - r_rejected), {"weight": pairs, "accuracy", "margin"} sums).

    Padding rows (no `last` token: eval batches filled up to the batch size) have weight 0.
    """
    margin = pair_margins(params, config, batch)
    weight = jnp.sum(batch["chosen_last"], axis=-1)
    return (jnp.sum(jax.nn.softplus(-margin) * weight),
            {"weight": jnp.sum(weight), "accuracy": jnp.sum((margin > 0) * weight), "margin": jnp.sum(margin * weight)})


# A reward model is not a policy (policy=None): sampling / export refuse its workdir with a clear error.
OBJECTIVE = train.Objective("reward", pair_loss, "value", init, policy=None)


def load(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict, tokenizer_lib.Tokenizer]:
    """(config, host params, tokenizer) of a trained reward model; any other run is refused before its
    arrays are read."""

    def is_reward_model(meta: dict) -> None:
        if meta["layout"] != "value":
            raise pretrained.BaseModelError(
                f"{workdir} holds a {meta['stage'] or 'language'} model ({meta['layout']} parameters), not a reward "
                "model (train one with maxlm.reward)")

    config, params, _ = checkpoint.load_latest(workdir, step, abstract=abstract_params, check=is_reward_model)
    return config, jax.device_get(params), tokenizer_lib.load(tokenizer_lib.workdir_tokenizer(workdir))


def sample_replies(config: ml_collections.ConfigDict, params: dict, tok: Any, template: chat.Template,
                   items: list, samples: int, seed: int = 0) -> list[list[str]]:
    """`samples` replies of the policy (`params`, prompted under `sft.system_prompt`) to each item, sampled at
    temperature 1 and decoded: one list per item."""
    stop = evaluate.stop_id(template, tok)
    prompts = [chat.render_prompt(template, tok, tasks.messages(item, config.sft.system_prompt, with_answer=False))
               for item in items for _ in range(samples)]
    replies: list[str] = []
    batch = evaluate.GENERATE_BATCH
    for start in range(0, len(prompts), batch):
        outs = sample.generate(config, params, prompts[start:start + batch], max_new_tokens=evaluate.MAX_NEW_TOKENS,
                               rng=jax.random.key(seed * 1_000_003 + start), temperature=1.0, eos_id=stop,
                               pad_id=tok.pad_id)
        replies += [tok.decode(o).strip() for o in outs]
    return [replies[i * samples:(i + 1) * samples] for i in range(len(items))]


def checker_pairs(items: list, replies: list[list[str]], system: str) -> list[dict]:
    """`correct`-domain comparisons of each item's replies, labelled by the hidden checker: every distinct
    wrong reply is rejected against a right one (the first sampled right reply when there is one, else the
    reference answer). The records carry `system`."""
    out = []
    for item, mine in zip(items, replies):
        right = [r for r in mine if tasks.check(item, r)]
        wrong = sorted({r for r in mine if r and not tasks.check(item, r)})
        for rejected in wrong:
            out.append({"prompt": item.prompt, "chosen": right[0] if right else item.answer, "rejected": rejected,
                        "system": system, "domain": "correct", "task": item.task})
    return out


def sampled_pairs(config: ml_collections.ConfigDict, params: dict, tok: Any, template: chat.Template,
                  items: list, samples: int, seed: int = 0, system: str | None = None) -> list[dict]:
    """`correct`-domain pairs from the policy's own replies, judged by the hidden checker -- InstructGPT's
    comparisons of model outputs, with the checker as the labeller (`sample_replies`, then `checker_pairs`).
    The reward model so sees the mistakes the policy actually makes, which PPO would otherwise find unjudged
    and exploit. The records carry `system` (default: the `correct` domain's prompt for a conditional reward
    model, else none); the policy is always prompted under `sft.system_prompt`."""
    if system is None:
        system = preference.DOMAINS["correct"] if config.reward.conditional else ""
    return checker_pairs(items, sample_replies(config, params, tok, template, items, samples, seed), system)


def load_pairs(config: ml_collections.ConfigDict, tok: Any, template: chat.Template, split: str,
               params: dict | None = None) -> preference.Pairs:
    """`reward.data_path` (split by `data.eval_fraction` of records) or the built-in pairs' split; with
    `reward.policy_samples`, the train split also gets `sampled_pairs` of `reward.sample_policy` (default:
    the model of `params`, the reward model's base)."""
    r = config.reward
    pairs = preference.Pairs(template, tok, config.data.seq_len)
    if r.data_path:
        everything = _read_jsonl(config, template, tok, "data_path")
        keep = split_indices(len(everything), config.data.eval_fraction, split)
        pairs.items = [everything.items[i] for i in keep]
        pairs.domains = [everything.domains[i] for i in keep]
        pairs.skipped = everything.skipped
        return pairs
    size = r.train_size if split == "train" else r.eval_size
    for record in preference.task_pairs(tuple(r.tasks), split, size, seed=config.sft.task_seed,
                                        domains=tuple(r.domains), conditional=r.conditional):
        pairs.add(record, domain=record["domain"])
    if split == "train" and r.policy_samples and "correct" in r.domains:
        if r.sample_policy:
            policy_config, params, tok_path = pretrained.load_base(r.sample_policy, r.sample_policy_step,
                                                                   key="reward.sample_policy")
            if policy_config.model.vocab_size != config.model.vocab_size or (
                    tok_path and not tokenizer_lib.same_vocabulary(tokenizer_lib.load(tok_path), tok)):
                raise pretrained.BaseModelError(f"reward.sample_policy={r.sample_policy} and reward.base="
                                                f"{r.base} have different vocabularies")
            config = pretrained.with_base_model(config, policy_config, policy_config.model.vocab_size)
        if params is None:
            return pairs
        # Items past the synthetic ones (the same split, so never a held-out input).
        items = [i for t in r.tasks for i in tasks.make_items(t, split, size + r.sampled_items,
                                                              seed=config.sft.task_seed)[size:]]
        sampled = sampled_pairs(config, params, tok, template, items, r.policy_samples, seed=config.train.seed)
        for record in sampled:
            pairs.add(record, domain=record["domain"])
        log_line(f"sampled {r.policy_samples} replies to each of {len(items)} prompts: {len(sampled)} pairs "
                 "(a wrong reply against a right one)")
    return pairs


def _read_jsonl(config: ml_collections.ConfigDict, template: chat.Template, tok: Any, key: str) -> preference.Pairs:
    """Every pair in the files of `reward.<key>`; an InputError naming the key when none is usable."""
    pattern = config.reward[key]
    pairs = preference.load_jsonl(pattern, preference.Pairs(template, tok, config.data.seq_len), what=f"reward.{key}")
    if not pairs.items:
        reasons = records.reason_counts(pairs.skipped) or "the files are empty"
        raise InputError(f"every preference pair in reward.{key}={pattern} was skipped ({reasons})")
    return pairs


def add_extra(config: ml_collections.ConfigDict, pairs: preference.Pairs) -> preference.Pairs:
    """`pairs` + every comparison in the files of `reward.extra_data` (training only: online RLHF's new
    comparisons of the current policy's replies)."""
    if not config.reward.extra_data:
        return pairs
    extra = _read_jsonl(config, pairs.template, pairs.tok, "extra_data")
    pairs.items += extra.items
    pairs.domains += extra.domains
    log_line(f"reward.extra_data: {extra.summary()}")
    return pairs


def pair_batches(config: ml_collections.ConfigDict, pairs: preference.Pairs, pad_id: int,
                 indices: list[int] | None = None) -> list[dict[str, np.ndarray]]:
    """All of `pairs` (or those at `indices`) as full global batches, the last one padded with weight-0 rows."""
    indices = list(range(len(pairs))) if indices is None else indices
    b = config.data.batch_size
    return [preference.pair_batch([pairs.items[i] for i in indices[s:s + b]], config.data.seq_len, pad_id, rows=b)
            for s in range(0, len(indices), b)]


def evaluate_pairs(config: ml_collections.ConfigDict, trainer: train.Trainer, state: train.State,
                   pairs: preference.Pairs, pad_id: int) -> dict:
    """Held-out {accuracy, margin, loss, n} over all pairs and per domain."""
    def run(indices):
        batches = [_local(trainer, b) for b in pair_batches(config, pairs, pad_id, indices)]
        return {**trainer.evaluate(state, batches), "n": len(indices)}

    out = run(list(range(len(pairs))))
    domains = sorted(set(pairs.domains))
    if len(domains) > 1:
        out["by_domain"] = {d: run([i for i, x in enumerate(pairs.domains) if x == d]) for d in domains}
    return out


def _local(trainer: train.Trainer, batch: dict[str, np.ndarray]) -> train.Batch:
    """A global host batch -> this host's rows, placed as a global array."""
    n = jax.process_count()
    rows = next(iter(batch.values())).shape[0] // n
    first = jax.process_index() * rows
    return trainer.device_batch({k: v[first:first + rows] for k, v in batch.items()})


def initial_params(config: ml_collections.ConfigDict, lm_params: dict) -> dict:
    """The base's trunk with a zero head, or, with `reward.init_from`, that reward model's parameters
    (continued training; it must have the base's architecture)."""
    r = config.reward
    if not r.init_from:
        return from_lm(lm_params)
    rm_config, params, _ = load(r.init_from, None if r.init_step < 0 else r.init_step)
    if (any(rm_config.model[k] != config.model[k] for k in pretrained.SHAPE_KEYS)
            or not pretrained.same_shapes(params, from_lm(lm_params))):
        raise pretrained.BaseModelError(f"reward.init_from={r.init_from} and reward.base={r.base} differ in "
                                        "architecture")
    log_line(f"continuing the reward model at {r.init_from} (step {r.init_step if r.init_step >= 0 else 'newest'})")
    return params


@workdir_lib.holding
def train_reward(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, float]]:
    """Train (or resume) the reward model to `train.num_steps`; returns the metrics records logged."""
    if config.lora.rank:
        raise config_lib.ConfigError("lora.rank", "the reward model trains every parameter (LoRA is for maxlm.sft); "
                                                  "set 0")
    config, tok, template, lm_params = sft.build(config, workdir, section="reward")
    log_line(f"maxlm.reward: {config_lib.describe(config)}; base {config.reward.base}; template {template.name}")
    train_pairs = add_extra(config, load_pairs(config, tok, template, "train", params=lm_params))
    log_line(f"preference data: {train_pairs.summary()}")
    held_out = load_pairs(config, tok, template, "eval")
    iterator = preference.PairIterator(train_pairs, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                                       seed=config.data.shuffle_seed, pad_id=tok.pad_id,
                                       host_id=jax.process_index(), num_hosts=jax.process_count())
    trainer = train.Trainer(config, objective=OBJECTIVE)
    eval_batches = []
    if config.train.eval_every and len(held_out):
        eval_batches = [_local(trainer, b) for b in pair_batches(config, held_out, tok.pad_id)
                        [:config.train.eval_batches]]
    params = initial_params(config, lm_params)

    def finish(state: train.State) -> None:
        if not len(held_out):
            return
        result = evaluate_pairs(config, trainer, state, held_out, tok.pad_id)
        line = f"held-out pairs: accuracy {result['accuracy']:.3f}, margin {result['margin']:.3f} on {result['n']}"
        for d, r in result.get("by_domain", {}).items():
            line += f"; {d}: accuracy {r['accuracy']:.3f}, margin {r['margin']:.3f} on {r['n']}"
        log_line(line)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "reward_eval.json"), "w") as f:
                json.dump(result, f, indent=1)

    return train.run(config, workdir, trainer, iterator,
                     init_state=lambda: trainer.init_state(jax.random.key(config.train.seed), params=params),
                     eval_batches=eval_batches, finish=finish)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    distributed.initialize_from_flags()
    train_reward(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_config_flag("configs/reward_tiny.py")
    flags.declare_key_flag("config")
    flags.DEFINE_string("workdir", "runs/rm", "Directory for checkpoints, metrics.jsonl, TensorBoard, loss.png.")
    distributed.define_flags()
    cli.run(main, user_errors=(pretrained.BaseModelError,))
