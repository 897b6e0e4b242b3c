"""RL environments: where PPO's prompts come from and how responses are judged by a hidden rule.

An environment gives `train_items` / `eval_items`, `prompt(item)` (the token ids the policy and the reward
model see), `sample_prompts(iteration, n, salt=0)` (deterministic in the iteration and the salt -- a later
draw of the same iteration, as GRPO's dynamic sampling makes -- so a resumed run draws the same prompts),
`true_score(prompt, response)` (the hidden checker), `held_out_score(config, actor)` and
`stop_id`; a programmatic one also `reward(prompt, response)`, used when `ppo.reward_fn` names it instead
of "model". Each registers itself under its `ppo.reward_fn` name beside its code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections
import numpy as np

from maxlm import config as config_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.data import chat, tasks
from maxlm.data import preference
from maxlm.evaluation import harness as evaluate

ENVIRONMENTS: dict[str, Callable[[ml_collections.ConfigDict, tokenizer_lib.Tokenizer], Any]] = {}


def register(reward_fn: str):
    """Class decorator: the environment PPO uses when `ppo.reward_fn` is `reward_fn`."""
    def add(cls):
        ENVIRONMENTS[reward_fn] = cls
        return cls
    return add


def validate(config: ml_collections.ConfigDict) -> None:
    if config.ppo.reward_fn not in ENVIRONMENTS:
        raise config_lib.ConfigError("ppo.reward_fn", f"must be one of {tuple(ENVIRONMENTS)}")


def make(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> Any:
    validate(config)
    return ENVIRONMENTS[config.ppo.reward_fn](config, tok)


def seed_sequence(seed: int, iteration: int, *stream: int, salt: int = 0) -> tuple[int, ...]:
    """The entropy of an iteration's draw: (seed, iteration, the stream's tag if any), and the salt of a later
    draw of the same iteration when it has one (a first draw keeps the entropy it had before salts existed)."""
    return (seed, iteration, *stream) + ((salt,) if salt else ())


@dataclasses.dataclass
class Prompt:
    policy_ids: list[int]  # what the policy sees
    reward_ids: list[int]  # what the reward model sees before the response (its own system prompt)
    item: Any  # the task item, for the hidden checker


@register("model")
class TaskEnvironment:
    """The built-in SFT tasks, judged by a reward model: chat-formatted prompts, the reward model's domain
    prompt (COOL RLHF's conditional reward), exact-match checkers as the hidden truth."""

    def __init__(self, config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer):
        p = config.ppo
        self.config, self.tok = config, tok
        self.template = chat.load_template(config.sft.template, tok.path)
        self.rm_system = preference.DOMAINS[p.reward_domain] if p.reward_domain else ""
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

    def sample_prompts(self, iteration: int, n: int, salt: int = 0) -> list[Prompt]:
        rng = np.random.default_rng(seed_sequence(self.config.train.seed, iteration, salt=salt))
        return [self.prompt(self.train_items[i]) for i in rng.choice(len(self.train_items), n, replace=False)]

    def true_score(self, prompt: Prompt, response: list[int]) -> float:
        """The hidden checker on the reply text (the stop marker, when sampled, is not text)."""
        if self.stop_id in response:
            response = response[:response.index(self.stop_id)]
        return float(tasks.check(prompt.item, self.tok.decode(response)))

    def held_out_score(self, config: ml_collections.ConfigDict, actor: dict) -> float:
        results = [evaluate.task_accuracy(config, actor, self.tok, t, n=config.ppo.eval_items) for t in config.ppo.tasks]
        return float(np.mean([r["accuracy"] for r in results]))


@register("checker")
class CheckerEnvironment(TaskEnvironment):
    """The built-in tasks rewarded by their exact-match checker, 1 or 0: RL with a verifiable reward (the
    DeepSeekMath / DAPO setting), no reward model to exploit."""

    def reward(self, prompt: Prompt, response: list[int]) -> float:
        return self.true_score(prompt, response)
