"""Supervised fine-tuning: chat data, answer-only loss, packing, optional LoRA -- the pretraining step and loop.

    python -m maxlm.sft --config=configs/sft_tiny.py --workdir=runs/sft [--config.sft.base=runs/tiny]
        [--config.sft.data_path='chats/*.jsonl'] [--config.lora.rank=8]

The run starts from `sft.base`: a maxlm workdir (its newest checkpoint) or a Hugging Face folder. The
model's shapes come from the base (`pretrained.SHAPE_KEYS`); how it runs (dtype, attention kernel, remat,
mesh) from this config. The template's special tokens are appended to the base's tokenizer (SentencePiece
model or tokenizer.json) when missing (the workdir gets its own copy) and the embeddings grow to match.

SFT is the second stage of the InstructGPT / InternLM2 pipeline (Ouyang et al. 2022, section 3.5; Cai et
al. 2024, section 4.1). The step is `maxlm.train.train_step`, unchanged: an SFT batch is a packed batch
whose loss weights are 1 on assistant tokens only (`maxlm.data.sft`), so the loss is the mean
cross-entropy over every assistant token of the global batch -- each answer token weighs the same
whichever row or conversation it sits in, gradient accumulation stays exact, and packing does not change
the objective (a per-conversation mean would up-weight short answers and depend on how rows were packed).
With `lora.rank > 0` the trainable parameters are LoRA adapters and the base is frozen state.

With no `sft.data_path` the run trains on the built-in task suite (`maxlm.tasks`), reports the held-out
loss, and scores `sft.eval_items` held-out items per task with the sampler at the end (`sft_eval.json`).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import flags

from maxlm import cli
from maxlm import config as config_lib
from maxlm import data as data_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.data import chat, tasks
from maxlm.data import sft as sft_data
from maxlm.evaluation import harness as evaluate
from maxlm.interop import pretrained
from maxlm.training import distributed, pretrain as train
from maxlm.training import workdir as workdir_lib
from maxlm.training.metrics import log_line


def prepare_tokenizer(config: ml_collections.ConfigDict, base_tokenizer: str, template: chat.Template,
                      workdir: str) -> tokenizer_lib.Tokenizer:
    """The run's own tokenizer in `workdir`: the base's (or `tokenizer.path`) plus the template's markers."""
    source = tokenizer_lib.resolve(config.tokenizer.path) if config.tokenizer.path else base_tokenizer
    if not source or not os.path.exists(source):
        raise FileNotFoundError("the base has no tokenizer (tokenizer.json or tokenizer.model); set "
                                "--config.tokenizer.path")
    target = os.path.join(workdir, tokenizer_lib.file_name(source))
    if os.path.abspath(source) != os.path.abspath(target):
        tok, added = tokenizer_lib.add_special_tokens(source, template.special_tokens, target)
        if not added:
            tokenizer_lib.copy_model(source, target)
        elif jax.process_index() == 0:
            log_line(f"added {added} to the tokenizer ({tok.vocab_size} pieces)")
    return tokenizer_lib.load(target)


def load_conversations(config: ml_collections.ConfigDict, tok, template: chat.Template, split: str
                       ) -> sft_data.Conversations:
    """`sft.data_path` (split by `data.eval_fraction` of records) or the built-in tasks' split."""
    s = config.sft
    convs = sft_data.Conversations(template, tok, config.data.seq_len + 1, s.system_prompt)
    if s.data_path:
        everything = sft_data.load_jsonl(s.data_path, sft_data.Conversations(
            template, tok, config.data.seq_len + 1, s.system_prompt))
        keep = data_lib.split_indices(len(everything), config.data.eval_fraction, split)
        convs.items = [everything.items[i] for i in keep]
        convs.skipped, convs.truncated = everything.skipped, everything.truncated
        return convs
    size = s.task_train_size if split == "train" else s.task_eval_size
    for task in s.tasks:
        for item in tasks.make_items(task, split, size, seed=s.task_seed):
            convs.add({"messages": tasks.messages(item)})
    return convs


def build(config: ml_collections.ConfigDict, workdir: str, section: str = "sft"):
    """(run config, tokenizer, template, base params) for fine-tuning `config.<section>.base` in `workdir`
    (`section` is "sft", "reward" for a reward model, "dpo" for preference optimisation)."""
    config_lib.validate(config)
    config_lib.require_single_stage(config, f"maxlm.{section}")
    base_path = config[section].base
    base_config, base_params, base_tok = pretrained.load_base(base_path, config[section].base_step,
                                                                   key=f"{section}.base")
    template = chat.load_template(config.sft.template, config.tokenizer.path or base_tok)
    os.makedirs(workdir, exist_ok=True)
    tok = prepare_tokenizer(config, base_tok, template, workdir)
    vocab = max(base_config.model.vocab_size, tok.vocab_size)
    run_config = pretrained.with_base_model(config, base_config, vocab)
    with run_config.unlocked():
        run_config[section].base = os.path.abspath(base_path)
        if run_config.lora.rank and run_config.lora.train_template_tokens:
            # The markers' rows were never trained (new, or reserved but unseen in pretraining): train them.
            markers = {i for piece in template.special_tokens for i in tok.encode(piece)}
            run_config.lora.token_ids = tuple(sorted(set(run_config.lora.token_ids) | markers))
        run_config.tokenizer.path = ""  # the workdir's own tokenizer
    config_lib.validate(run_config)
    params = pretrained.resize_vocab(base_params, vocab, seed=config.train.seed)
    return run_config, tok, template, params


@workdir_lib.holding
def finetune(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, float]]:
    """Fine-tune (or resume) to `train.num_steps`; returns the metrics records logged by this invocation."""
    config, tok, template, base_params = build(config, workdir)
    log_line(f"maxlm.sft: {config_lib.describe(config)}; base {config.sft.base}; template {template.name}"
             + (f"; LoRA rank {config.lora.rank} on {config.lora.targets}" if config.lora.rank else ""))
    convs = load_conversations(config, tok, template, "train")
    log_line(f"sft data: {convs.summary()}")
    iterator = sft_data.SFTIterator(convs, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                                    seed=config.data.shuffle_seed, pad_id=tok.pad_id,
                                    host_id=jax.process_index(), num_hosts=jax.process_count())
    trainer = train.Trainer(config, objective=train.lm_objective(config, "sft"))
    eval_batches = []
    if config.train.eval_every:
        held_out = load_conversations(config, tok, template, "eval")
        if len(held_out):
            eval_iter = sft_data.SFTIterator(held_out, seq_len=config.data.seq_len,
                                             batch_size=config.data.batch_size, seed=0, pad_id=tok.pad_id,
                                             host_id=jax.process_index(), num_hosts=jax.process_count())
            eval_batches = [trainer.device_batch(next(eval_iter)) for _ in range(config.train.eval_batches)]

    # LoRA: the base is the objective's frozen tree and the adapters start fresh; full: the base is trained.
    frozen = trainer.place_frozen({"base": base_params}) if trainer.frozen_layouts else {}
    rng = jax.random.key(config.train.seed)
    init = lambda: trainer.init_state(rng, frozen=frozen) if frozen else trainer.init_state(rng, params=base_params)  # noqa: E731

    def finish(state: train.State) -> dict | None:
        if config.sft.data_path or not config.sft.eval_items:
            return None
        params = train.host_params(config, state)
        if jax.process_index() != 0:
            return None

        results = {task: evaluate.task_accuracy(config, params, tok, task, n=config.sft.eval_items)
                   for task in config.sft.tasks}
        for task, r in results.items():
            log_line(f"held-out {task}: exact match {r['accuracy']:.3f} on {r['n']} items "
                     f"(e.g. {r['examples'][0]['prompt']!r} -> {r['examples'][0]['response']!r})")
        with open(os.path.join(workdir, "sft_eval.json"), "w") as f:
            json.dump({t: {k: r[k] for k in ("accuracy", "n")} for t, r in results.items()}, f, indent=1)
        rows = [(task, e["prompt"], e["response"], e["correct"]) for task, r in results.items() for e in r["examples"]]
        return {"samples": (("task", "prompt", "response", "correct"), rows)}

    return train.run(config, workdir, trainer, iterator, init_state=init, frozen=frozen,
                     eval_batches=eval_batches, finish=finish)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    distributed.initialize_from_flags()
    finetune(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_config_flag("configs/sft_tiny.py")
    flags.declare_key_flag("config")
    flags.DEFINE_string("workdir", "runs/sft", "Directory for checkpoints, metrics.jsonl, TensorBoard, loss.png.")
    distributed.define_flags()
    cli.run(main, user_errors=(pretrained.BaseModelError,))
