"""Online RLHF (maxlm/posttrain/online.py): the judge's measures against a count by hand, its CLI's fast-path
file, fresh prompts per round, the reward model's continued training (reward.init_from, reward.extra_data) and
PPO's separate reference."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxlm import config as C
from maxlm import tokenizer
from maxlm.data import chat, preference, tasks
from maxlm.interop import pretrained
from maxlm.model import decoder as model
from maxlm.posttrain import online, ppo, reward
from tests.helpers import ROOT, pair_margins_by_hand, random_params, tiny_model_config


@pytest.fixture(scope="module")
def tok(shared_tok_path):
    return tokenizer.load(shared_tok_path)


def _hand_replies(items):
    """Per item: the right answer twice, a wrong reply twice (one distinct comparison), another wrong reply and an
    empty one (never a comparison, never a hack)."""
    out = []
    for item in items:
        wrong = item.answer[::-1] if item.answer[::-1] != item.answer else item.answer + "x"
        out.append([item.answer, wrong, item.answer, wrong, wrong + "z", ""])
    return out


def test_judge_measures_match_a_count_by_hand(tok):
    rm_config = tiny_model_config(tok.vocab_size)
    with rm_config.unlocked():
        rm_config.data.seq_len, rm_config.data.batch_size = 192, 4  # 10 comparisons: the last batch is partial
    rng = np.random.default_rng(2)  # a random reward model with a large head: no margin near a tie
    rm = reward.from_lm(random_params(model.abstract_params(rm_config), rng, std=0.3))
    rm["head"] = rng.normal(0, 1, rm["head"].shape).astype(np.float32)
    items = tasks.make_items("sort", "eval", 5)
    replies = _hand_replies(items)
    system = preference.DOMAINS["correct"]
    records, measures = online.judge_replies(rm_config, rm, tok, chat.CHATML, items, replies, system)

    # By hand: each item has two distinct wrong replies, each against the right answer.
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [
        (i.prompt, i.answer, w) for i, mine in zip(items, replies) for w in sorted({mine[1], mine[4]})]
    rendered = [preference.render_pair(chat.CHATML, tok, r["prompt"], r["chosen"], r["rejected"], system)
                for r in records]
    margins = pair_margins_by_hand(rm_config, rm, rendered)
    np.testing.assert_allclose([r["margin"] for r in records], margins, rtol=2e-4, atol=1e-5)
    assert np.abs(margins).min() > 1e-4 and 0 < np.mean(margins > 0) < 1  # certain signs, both kinds
    margin = {(r["prompt"], r["rejected"]): m for r, m in zip(records, margins)}
    hacks = sum(margin[(i.prompt, w)] <= 0 for i, mine in zip(items, replies) for w in mine
                if w and not tasks.check(i, w))
    samples = 6 * len(items)
    assert measures == pytest.approx({
        "rm_policy_accuracy": float(np.mean(margins > 0)), "comparisons": len(records), "unranked": 0,
        "sampled_true_score": 2 * len(items) / samples, "rm_true_gap": hacks / samples, "samples": samples})


def test_rounds_draw_fresh_train_prompts():
    config = C.default_config()
    with config.unlocked():
        config.online.train_items, config.online.eval_items, config.online.item_offset = 20, 7, 50
    seen = {i.key for i in tasks.make_items("sort", "train", 50, seed=config.sft.task_seed)}
    held_out_keys = None
    for r in (1, 2, 3):
        with config.unlocked():
            config.online.round = r
        train, held_out = online.round_items(config)
        keys = {i.key for i in train}
        assert len(keys) == 20 and not keys & seen and all(tasks.split_of(k, config.sft.task_seed) == "train"
                                                             for k in keys)
        seen |= keys
        assert held_out_keys in (None, [i.key for i in held_out]) and len(held_out) == 7
        held_out_keys = [i.key for i in held_out]
    assert held_out_keys == [i.key for i in tasks.make_items("sort", "eval", 7, seed=config.sft.task_seed)]


def test_judge_cli_writes_each_hack_repeat_times(reward_run, hf_base, tmp_path):
    work, _ = reward_run
    out = tmp_path / "judge"
    flags = [f"--config.online.policy={hf_base}", f"--config.online.reward_model={work}",
             "--config.online.train_items=4", "--config.online.eval_items=3", "--config.online.samples=3",
             "--config.online.hack_repeat=3", "--config.online.round=2"]
    done = subprocess.run([sys.executable, "-m", "maxlm.online", "--config=configs/online_tiny.py",
                           f"--workdir={out}", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.load(open(out / "online_eval.json")) and result["round"] == 2
    lines = [json.loads(line) for line in open(out / "pairs.jsonl")]
    distinct = {json.dumps(r, sort_keys=True) for r in lines}
    assert len(distinct) == result["new_comparisons"] > 0  # a random policy gets sorting wrong
    counts = sorted({sum(json.dumps(r, sort_keys=True) == d for r in lines) for d in distinct})
    assert len(lines) == result["new_comparisons"] + 2 * result["new_hacks"] and set(counts) <= {1, 3}

    # The hacks are the comparisons the reward model ranks wrong, scored here independently.
    config = C.default_config()
    with config.unlocked():
        config.online.train_items, config.online.round = 4, 2
    by_prompt = {i.prompt: i for i in online.round_items(config)[0]}
    rm_config, rm, rm_tok = reward.load(work)
    unique = [json.loads(d) for d in sorted(distinct)]
    for r in unique:
        item = by_prompt[r["prompt"]]
        assert tasks.check(item, r["chosen"]) and not tasks.check(item, r["rejected"])
    margins = pair_margins_by_hand(rm_config, rm, [preference.render_pair(
        chat.CHATML, rm_tok, r["prompt"], r["chosen"], r["rejected"], r["system"]) for r in unique])
    repeated = np.array([sum(json.dumps(x, sort_keys=True) == json.dumps(r, sort_keys=True) for x in lines)
                         for r in unique])
    np.testing.assert_array_equal(repeated, np.where(margins <= 0, 3, 1))

    bad = subprocess.run([sys.executable, "-m", "maxlm.online", f"--workdir={tmp_path / 'bad'}",
                          f"--config.online.reward_model={work}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "online.policy" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_reward_model_continues_from_init_from_with_extra_pairs(reward_run, hf_base, tmp_path):
    """With a negligible learning rate (1e-12: Adam moves each weight ~1e-12 a step) the continued run ends
    where `reward.init_from` was (its parameters, not a zero head on the base), and its training data are the
    built-in pairs + the extra file's valid lines."""
    work, _ = reward_run
    extra = tmp_path / "new.jsonl"
    records = [{"prompt": "sort: c a b", "chosen": "abc", "rejected": f"ab{x}", "system": "", "domain": "correct"}
               for x in "xyz"]
    extra.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    flags = [f"--config.reward.base={hf_base}", f"--config.reward.init_from={work}",
             f"--config.reward.extra_data={tmp_path}/*.jsonl", "--config.reward.domains=('correct',)",
             "--config.reward.train_size=5", "--config.reward.eval_size=4", "--config.reward.policy_samples=0",
             "--config.data.batch_size=4", "--config.data.seq_len=192", "--config.train.num_steps=2", "--config.train.eval_every=0",
             "--config.checkpoint.every_steps=2", "--config.optim.peak_lr=1e-12", "--config.optim.warmup_steps=1"]
    done = subprocess.run([sys.executable, "-m", "maxlm.reward", "--config=configs/reward_tiny.py",
                           f"--workdir={tmp_path / 'rm2'}", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "reward.extra_data: 3 pairs; skipped: bad_json 1" in log and "preference data: 8 pairs" in log, log[-3000:]
    _, before, _ = reward.load(work)
    _, after, _ = reward.load(str(tmp_path / "rm2"))
    jax.tree.map(lambda b, a: np.testing.assert_allclose(a, b, rtol=0, atol=1e-8), before, after)
    assert np.abs(after["head"]).sum() > 0

    missing = subprocess.run([sys.executable, "-m", "maxlm.reward", "--config=configs/reward_tiny.py",
                              f"--workdir={tmp_path / 'rm3'}", *flags[:2],
                              f"--config.reward.extra_data={tmp_path}/none*", *flags[3:]],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "reward.extra_data" in missing.stderr and "Traceback" not in missing.stderr


def test_ppo_reference_is_separate_from_the_starting_policy(hf_base):
    config = C.default_config()
    _, hf_params, _ = pretrained.load_base(hf_base)
    policy = jax.tree.map(lambda x: np.zeros_like(x), hf_params)
    assert ppo.load_reference(config, policy) is policy  # unset: the starting policy is the reference
    with config.unlocked():
        config.ppo.reference, config.ppo.policy = hf_base, "elsewhere"
    jax.tree.map(np.testing.assert_array_equal, ppo.load_reference(config, policy), hf_params)
    wider = jax.tree.map(lambda x: np.zeros(x.shape + (1,), x.dtype), hf_params)
    with pytest.raises(ppo.PPOError, match="ppo.reference"):
        ppo.load_reference(config, wider)
