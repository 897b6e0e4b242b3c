"""Online RLHF's judge: how well the reward model knows the current policy, and what it should learn next.

    python -m maxlm.online --config=configs/online_tiny.py --workdir=W/online/judge1 \
        --config.online.policy=W/online/ppo1 --config.online.reward_model=W/rm_conditional --config.online.round=1

InternLM2 (section 4.3, "Online RLHF") runs PPO in rounds. After each round it samples the current policy and
refreshes the reward model on those replies, because a fixed reward model is exploited: the policy drifts to
replies the reward model never saw and over-scores (reward hacking). It does this on two paths:
- the fast path patches the hacks it finds (replies with a high reward and a low true quality), added as
  rejected examples;
- the slow path labels fresh comparisons of the new policy's replies and continues training the reward model
  on old + new comparisons.

This module is the judge between rounds. The task checker stands in for the human labellers. It does two things.

1. Measure. It samples `online.samples` replies of the policy to each of `online.eval_items` held-out prompts.
   Every distinct wrong reply becomes a comparison against a right one (a sampled right reply, else the
   reference answer), and the round's reward model ranks each comparison. Written to `online_eval.json`:
   - `rm_policy_accuracy`: the fraction of those comparisons the reward model ranks correctly, i.e. its
     accuracy on the policy's own replies;
   - `sampled_true_score`: the fraction of replies that are right;
   - `rm_true_gap`: the fraction the reward model would accept minus the fraction that are right. A reply
     is accepted when it is right, or when it is wrong but outscores the right reply. So the gap is the
     share of replies that are hacks the reward model prefers to the truth.
2. Label. It labels comparisons of replies to the round's fresh train prompts the same way and writes them to
   `pairs.jsonl` (the slow path). Each comparison the reward model gets wrong (a hack) is written
   `online.hack_repeat` times (the fast path). `python -m maxlm.reward` continues from the round's reward
   model (`reward.init_from`) on the built-in pairs plus these files (`reward.extra_data`).

`experiments/online_rlhf_demo.sh` runs the three rounds (PPO → judge → reward model) and compares the result
with single-round PPO at the same number of PPO iterations.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from maxlm import cli
from maxlm import config as config_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.data import chat, preference, tasks
from maxlm.errors import UserError
from maxlm.interop import pretrained
from maxlm.posttrain import reward
from maxlm.training import distributed
from maxlm.training import workdir as workdir_lib
from maxlm.training.metrics import log_line


class OnlineError(UserError):
    """A policy and reward model that cannot be judged together."""


def validate(config: ml_collections.ConfigDict) -> None:
    o = config.online
    for key in ("train_items", "eval_items", "samples", "hack_repeat", "round"):
        if o[key] < 1:
            raise config_lib.ConfigError(f"online.{key}", f"must be >= 1, got {o[key]}")
    for key in ("policy", "reward_model"):
        if not o[key]:
            raise config_lib.ConfigError(f"online.{key}", "is required (a workdir)")


def round_items(config: ml_collections.ConfigDict) -> tuple[list[tasks.Item], list[tasks.Item]]:
    """(this round's fresh train prompts, the held-out prompts): train items from `online.item_offset` on,
    `online.train_items` per task and round, so no round reuses another's prompts or those the earlier stages read."""
    o, seed = config.online, config.sft.task_seed
    start = o.item_offset + (o.round - 1) * o.train_items
    train = [i for t in o.tasks for i in tasks.make_items(t, "train", start + o.train_items, seed=seed)[start:]]
    held_out = [i for t in o.tasks for i in tasks.make_items(t, "eval", o.eval_items, seed=seed)]
    return train, held_out


def rank_pairs(rm_config: ml_collections.ConfigDict, rm: dict, pairs: preference.Pairs, pad_id: int) -> np.ndarray:
    """The reward model's margin r_chosen - r_rejected of each rendered pair."""
    margins_fn = jax.jit(lambda params, batch: reward.pair_margins(params, rm_config, batch))
    out = [np.asarray(margins_fn(rm, batch)) for batch in reward.pair_batches(rm_config, pairs, pad_id)]
    return np.concatenate(out)[:len(pairs)] if out else np.zeros(0, np.float32)  # the last batch's padding off


def judge_replies(rm_config: ml_collections.ConfigDict, rm: dict, tok: Any, template: chat.Template,
                  items: list[tasks.Item], replies: list[list[str]], system: str) -> tuple[list[dict], dict]:
    """(the checker's comparisons of the replies, each with its reward-model `margin`; the measures of the
    module docstring). A comparison whose pair cannot be rendered within the reward model's `data.seq_len`
    is dropped and counted (`unranked`)."""
    records, rendered = [], preference.Pairs(template, tok, rm_config.data.seq_len)
    for record in reward.checker_pairs(items, replies, system):
        if rendered.add(record):
            records.append(record)
    for record, margin in zip(records, rank_pairs(rm_config, rm, rendered, tok.pad_id)):
        record["margin"] = float(margin)
    margin_of = {(r["prompt"], r["rejected"]): r["margin"] for r in records}
    samples = right = hacks = 0
    for item, mine in zip(items, replies):
        for reply in mine:
            samples += 1
            if tasks.check(item, reply):
                right += 1
            elif margin_of.get((item.prompt, reply), 1.0) <= 0:  # unranked or empty replies are not hacks
                hacks += 1
    ranked = np.asarray([r["margin"] for r in records])
    measures = {
        "rm_policy_accuracy": float(np.mean(ranked > 0)) if len(ranked) else float("nan"),
        "comparisons": len(records), "unranked": int(sum(rendered.skipped.values())),
        "sampled_true_score": right / max(samples, 1), "rm_true_gap": hacks / max(samples, 1), "samples": samples}
    return records, measures


@workdir_lib.holding
def run_judge(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Measure the round's reward model on the policy's replies and write the new comparisons; returns the
    `online_eval.json` record."""
    validate(config)
    o = config.online
    policy_config, policy, tok_path = pretrained.load_base(o.policy, o.policy_step, key="online.policy")
    rm_config, rm, rm_tok = reward.load(o.reward_model)
    if not tok_path:
        raise OnlineError(f"online.policy={o.policy} has no tokenizer")
    tok = tokenizer_lib.load(tok_path)
    if not tokenizer_lib.same_vocabulary(tok, rm_tok):
        raise OnlineError(f"online.policy={o.policy} and online.reward_model={o.reward_model} have different "
                          "vocabularies")
    config = pretrained.with_base_model(config, policy_config, policy_config.model.vocab_size)
    template = chat.load_template(config.sft.template, tok.path)
    # The domain prompt the reward model was trained and is queried with (COOL RLHF's conditional reward).
    system = preference.DOMAINS["correct"] if rm_config.reward.conditional else ""
    train_items, held_out = round_items(config)
    seed = (config.train.seed * 1000 + o.round) * 2
    log_line(f"maxlm.online round {o.round}: policy {o.policy}; reward model {o.reward_model}; {o.samples} replies "
             f"to each of {len(held_out)} held-out and {len(train_items)} fresh train prompts")

    replies = reward.sample_replies(config, policy, tok, template, held_out, o.samples, seed=seed)
    _, measures = judge_replies(rm_config, rm, tok, template, held_out, replies, system)
    replies = reward.sample_replies(config, policy, tok, template, train_items, o.samples, seed=seed + 1)
    new, train_measures = judge_replies(rm_config, rm, tok, template, train_items, replies, system)
    hacks = [r for r in new if r["margin"] <= 0]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "pairs.jsonl"), "w") as f:
        for record in new:
            copies = o.hack_repeat if record["margin"] <= 0 else 1
            f.write((json.dumps({k: v for k, v in record.items() if k != "margin"}, ensure_ascii=False) + "\n")
                    * copies)
    result = {"round": o.round, **measures, "new_comparisons": len(new), "new_hacks": len(hacks),
              "train_rm_accuracy": train_measures["rm_policy_accuracy"],
              "train_sampled_true_score": train_measures["sampled_true_score"]}
    log_line(f"round {o.round}: reward model's accuracy on the policy's held-out replies "
             f"{measures['rm_policy_accuracy']:.3f} ({measures['comparisons']} comparisons); sampled true score "
             f"{measures['sampled_true_score']:.3f}; RM-vs-true gap {measures['rm_true_gap']:.3f}; wrote {len(new)} new "
             f"comparisons, {len(hacks)} of them hacks x{o.hack_repeat}")
    with open(os.path.join(workdir, "online_eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    distributed.initialize_from_flags()
    print(json.dumps(run_judge(flags.FLAGS.config, flags.FLAGS.workdir)))


if __name__ == "__main__":
    cli.define_config_flag("configs/online_tiny.py")
    flags.declare_key_flag("config")
    flags.DEFINE_string("workdir", "runs/online/judge", "Directory for pairs.jsonl and online_eval.json.")
    distributed.define_flags()
    cli.run(main, user_errors=(pretrained.BaseModelError, OnlineError))
