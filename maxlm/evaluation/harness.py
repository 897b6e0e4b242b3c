"""Evaluation: continuation log-likelihoods (the core of perplexity and multiple-choice scoring), and
exact-match accuracy on the built-in task suite's held-out items with the KV-cache sampler.

    python -m maxlm.evaluate --workdir=runs/sft --task=reverse      # or --task=all
    python -m maxlm.evaluate --hf=path/to/hf_folder --task=add
    python -m maxlm.evaluate --hf=path/to/hf_folder --task=mc --data=mmlu/ --shots=5   # maxlm/evaluation/multiple_choice.py
    python -m maxlm.evaluate --task=contamination --data=mmlu/ --corpus='curated/*.jsonl'  # maxlm/evaluation/contamination.py
    python -m maxlm.evaluate --workdir=runs/tiny --task=ppl --data='held_out/*.jsonl' [--window=512 --stride=256]
    python -m maxlm.evaluate --hf=path/to/hf_folder --task=gen --data=gsm8k/ --shots=8   # maxlm/evaluation/generation.py
    python -m maxlm.evaluate --workdir=runs/long --task=passkey --lengths=512,2048 --depths=0,0.5,1  # heat map

Each held-out item (`maxlm.tasks`, split "eval": disjoint from every training item) is rendered with the
run's chat template up to the assistant header, continued greedily (argmax, as exact-match evaluations of
instruction following do) until the template's end marker, and checked by the task's programmatic checker.
Per-item results go to `<workdir>/eval/<task>.jsonl`; the last console line is one JSON object with
`task`, `accuracy`, `n` (and per-language accuracy; for `all`, every task's).

Each `--task` is a runner registered in EVAL_TASKS (`@eval_task(name, help)`); the flag's help and the
unknown-task error are made from that registry.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from maxlm import cli
from maxlm import tokenizer as tokenizer_lib
from maxlm.data import chat, tasks
from maxlm.data import records
from maxlm.data.records import InputError
from maxlm.errors import UserError
from maxlm.evaluation import contamination
from maxlm.evaluation import generation as generation_eval
from maxlm.evaluation import multiple_choice
from maxlm.evaluation import passkey
from maxlm.evaluation.multiple_choice import DataError
from maxlm.inference import engine as engine_lib
from maxlm.interop import pretrained
from maxlm.model import quant
from maxlm.model import sampler as sample
from maxlm.model.scoring import SCORE_BATCH, _continuation_logprob_fn, loglikelihoods, sliding_windows, perplexity  # noqa: F401

MAX_NEW_TOKENS = 24  # the longest reply in the suite ({"answer": "abcdefg"}) is 13 tokens
GENERATE_BATCH = 64


class EvaluateError(UserError):
    """A user mistake on the command line (one line, exit status 2)."""


def stop_id(template: chat.Template, tok: tokenizer_lib.Tokenizer) -> int:
    """The token that ends a reply: the template's end marker when it is one piece, else eos."""
    ids = tok.encode(template.stop)
    return ids[0] if len(ids) == 1 else tok.eos_id


def task_accuracy(config: ml_collections.ConfigDict, params: dict, tok: tokenizer_lib.Tokenizer, task: str, *,
                  n: int, split: str = "eval") -> dict:
    """Greedy exact match on the first `n` items of a task's split -> {accuracy, n, by_lang, examples, items}."""
    template = chat.load_template(config.sft.template, tok.path)
    items = tasks.make_items(task, split, n, seed=config.sft.task_seed)
    prompts = [chat.render_prompt(template, tok, tasks.messages(item, config.sft.system_prompt, with_answer=False))
               for item in items]
    outs = engine_lib.generate(config, params, prompts, max_new_tokens=MAX_NEW_TOKENS, greedy=True,
                               eos_id=stop_id(template, tok))
    responses = [tok.decode(o) for o in outs]
    rows = [{"key": it.key, "lang": it.lang, "prompt": it.prompt, "answer": it.answer, "response": r,
             "correct": tasks.check(it, r)} for it, r in zip(items, responses)]
    by_lang = {}
    for lang in sorted({r["lang"] for r in rows}):
        mine = [r["correct"] for r in rows if r["lang"] == lang]
        by_lang[lang] = sum(mine) / len(mine)
    return {"task": task, "accuracy": sum(r["correct"] for r in rows) / len(rows), "n": len(rows),
            "by_lang": by_lang, "examples": rows[:3], "items": rows}


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", "", "A maxlm run to evaluate (its newest checkpoint; LoRA runs merged).")
    flags.DEFINE_string("hf", "", "A Hugging Face folder to evaluate instead (with its tokenizer.json or "
                        "SentencePiece tokenizer.model).")
    flags.DEFINE_integer("step", -1, "Checkpoint step (default: the newest).")
    flags.DEFINE_string("task", "all", task_help())
    flags.DEFINE_integer("n", 0, "Held-out items per built-in task (default: the run's sft.task_eval_size); ppl / gen: "
                         "at most this many documents / items (default: all).")
    flags.DEFINE_string("template", "", "Chat template (default: the run's sft.template).")
    flags.DEFINE_string("out", "", "Folder for per-item results (default: <workdir>/eval).")
    flags.DEFINE_string("data", "", "mc / contamination: a local MMLU / C-Eval shaped folder (dev/ and test/ or "
                        "val/ files); ppl: a jsonl glob or tfds:NAME[:SPLIT].")
    flags.DEFINE_integer("shots", 5, "mc: solved dev examples before each question.")
    flags.DEFINE_enum("lang", "en", ["en", "zh"], "mc: prompt format, MMLU's (en) or C-Eval's (zh).")
    flags.DEFINE_enum("choices", "letter", ["letter", "text"], "mc: score each option's letter or its text.")
    flags.DEFINE_string("corpus", "", "contamination: a glob of training jsonl files (.gz / .zst too).")
    flags.DEFINE_integer("window", 0, "ppl: tokens per sliding window (default: the model's context + 1).")
    flags.DEFINE_list("lengths", ["1024", "2048", "4096"], "passkey: prompt lengths in tokens.")
    flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "passkey: needle depths (0 first, 1 last).")
    flags.DEFINE_integer("trials", 5, "passkey: random keys per (length, depth) cell.")
    flags.DEFINE_integer("stride", 0, "ppl: tokens the window moves by (default: half the window).")
    pretrained.define_quant_flags()
    flags.DEFINE_integer("ngram", 13, "contamination: n-gram length in units (words; CJK characters).")


# ---- the --task registry: name -> runner -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """A `--task` of `python -m maxlm.evaluate`. `run(FLAGS, model)` does it (per-item jsonl and a summary, printed
    last); `check(FLAGS)`, if any, rejects missing or wrong flags (EvaluateError) before a model is loaded; `model`
    is the loaded `Model`, or None for a task that reads no model (`needs_model=False`)."""
    run: Callable[[Any, Model | None], None]
    help: str = ""
    needs_model: bool = True
    check: Callable[[Any], None] | None = None


# --task name -> task, in registration order (the order --help and the unknown-task error list them).
EVAL_TASKS: dict[str, EvalTask] = {}


def eval_task(name: str, help: str = "", *, needs_model: bool = True, check: Callable[[Any], None] | None = None):
    """Decorator registering `run(FLAGS, model)` as `--task=name` (see EvalTask)."""
    def register(run: Callable[[Any, Model | None], None]) -> Callable[[Any, Model | None], None]:
        EVAL_TASKS[name] = EvalTask(run, help, needs_model, check)
        return run
    return register


@dataclasses.dataclass(frozen=True)
class Model:
    """What a task runner evaluates: a run's checkpoint (`step`) or a Hugging Face folder (`step` None), its
    tokenizer, and the folder for per-item results."""
    config: ml_collections.ConfigDict
    params: dict
    tok: tokenizer_lib.Tokenizer
    step: int | None
    out_dir: str
    quant: str = ""  # --quant: the weights' format ("" as trained)
    weight_bytes: int = 0  # the weights' bytes at rest, in that format


def _one_of(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def task_help() -> str:
    """The --task flag's help, from the registry."""
    return f"One of {_one_of([name + (f' ({t.help})' if t.help else '') for name, t in EVAL_TASKS.items()])}."


def get_task(name: str) -> EvalTask:
    if name not in EVAL_TASKS:
        raise EvaluateError(f"unknown --task={name}; choose one of {_one_of(list(EVAL_TASKS))}")
    return EVAL_TASKS[name]


def main(argv: list[str]) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise EvaluateError(f"unexpected arguments: {' '.join(argv[1:])}")
    task = get_task(FLAGS.task)
    if task.needs_model and bool(FLAGS.workdir) == bool(FLAGS.hf):
        raise EvaluateError("give exactly one of --workdir (a maxlm run) or --hf (a Hugging Face folder)")
    if task.check is not None:
        task.check(FLAGS)
    task.run(FLAGS, _load_model(FLAGS) if task.needs_model else None)


def _load_model(FLAGS) -> Model:
    """The --workdir or --hf model with its tokenizer (--template overriding its chat template), and the folder
    for per-item results (--out, default <model>/eval; created)."""
    if FLAGS.workdir:
        if not os.path.isdir(FLAGS.workdir):
            raise FileNotFoundError(f"no such workdir: {FLAGS.workdir}")
        config, params, step = pretrained.load_workdir(FLAGS.workdir, None if FLAGS.step < 0 else FLAGS.step)
        tok_path = tokenizer_lib.run_tokenizer_path(config, FLAGS.workdir)
    else:
        if not pretrained.is_hf_folder(FLAGS.hf):
            raise EvaluateError(f"--hf={FLAGS.hf} is not a Hugging Face folder (no config.json there)")
        config, params, tok_path = pretrained.load_base(FLAGS.hf)
        step = None
    if not tok_path or not os.path.exists(tok_path):
        raise FileNotFoundError(f"no tokenizer at {tok_path or FLAGS.hf + ' (tokenizer.json or tokenizer.model)'}")
    tok = tokenizer_lib.load(tok_path)
    params = pretrained.quantize(config, params, FLAGS.quant, FLAGS.quant_group_size)
    if FLAGS.template:
        with config.unlocked():
            config.sft.template = FLAGS.template
    out_dir = FLAGS.out or os.path.join(FLAGS.workdir or FLAGS.hf, "eval")
    os.makedirs(out_dir, exist_ok=True)
    return Model(config, params, tok, step, out_dir, FLAGS.quant, quant.weight_bytes(params))


def _exact_match(names: list[str]) -> Callable[[Any, Model], None]:
    """The runner of built-in tasks `names`: greedy exact match on --n held-out items each (task_accuracy)."""
    def run(FLAGS, m: Model) -> None:
        n = FLAGS.n or m.config.sft.task_eval_size
        results = {}
        for task in names:
            r = task_accuracy(m.config, m.params, m.tok, task, n=n)
            _write_items(os.path.join(m.out_dir, f"{task}.jsonl"), r["items"])
            results[task] = {k: r[k] for k in ("task", "accuracy", "n", "by_lang")}
            print(f"{task}: exact match {r['accuracy']:.3f} on {r['n']} held-out items {r['by_lang']}",
                  file=sys.stderr, flush=True)
        if len(names) == 1:
            summary = dict(results[names[0]], **_about(m))
        else:
            summary = {"task": "all", "accuracy": sum(r["accuracy"] for r in results.values()) / len(results),
                       "n": sum(r["n"] for r in results.values()), **_about(m), "tasks": results}
        _summary(m.out_dir, summary["task"], summary)
    return run


for _name in tasks.TASKS:
    eval_task(_name)(_exact_match([_name]))
del _name
eval_task("all", "the built-in tasks")(_exact_match(list(tasks.TASKS)))


def _check_mc(FLAGS) -> None:
    if not os.path.isdir(FLAGS.data):
        raise EvaluateError(f"--task=mc needs --data=DIR, a local MMLU / C-Eval shaped folder (got {FLAGS.data!r})")


@eval_task("mc", "few-shot multiple choice on --data", check=_check_mc)
def _multiple_choice(FLAGS, m: Model) -> None:
    r = multiple_choice.score(m.config, m.params, m.tok, multiple_choice.load(FLAGS.data), shots=FLAGS.shots,
                              lang=FLAGS.lang, mode=FLAGS.choices)
    _write_items(os.path.join(m.out_dir, "mc.jsonl"), r["items"])
    print(f"mc: acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f}, acc_bytes {r['acc_bytes']:.4f} on {r['n']} items "
          f"({FLAGS.shots}-shot)",
          file=sys.stderr, flush=True)
    _summary(m.out_dir, "mc", {k: r[k] for k in ("task", "acc", "acc_norm", "acc_bytes", "n", "shots")}
             | _about(m))


def _check_ppl(FLAGS) -> None:
    if not FLAGS.data:
        raise EvaluateError("--task=ppl needs --data=GLOB (jsonl files with a text field) or tfds:NAME[:SPLIT]")


@eval_task("ppl", "perplexity and bits per byte of --data", check=_check_ppl)
def _perplexity(FLAGS, m: Model) -> None:
    texts, skipped = [], collections.Counter()
    for shard in records.resolve_input(FLAGS.data):
        for r, reason in records.iter_records(shard, m.config.data.text_key, 1 << 30):
            if r is None:
                skipped[reason] += 1
            else:
                texts.append(r[m.config.data.text_key])
    if not texts:  # a perplexity of nothing is not 1
        raise InputError(f"--data={FLAGS.data}: no document to score"
                         + (f" (every line skipped: {records.reason_counts(skipped)})"
                            if skipped else " (no lines)"))
    r = perplexity(m.config, m.params, m.tok, texts[:FLAGS.n] if FLAGS.n else texts, window=FLAGS.window,
                   stride=FLAGS.stride)
    _write_items(os.path.join(m.out_dir, "ppl.jsonl"), r["items"])
    print(f"ppl: {r['ppl']:.4f}, bits per byte {r['bits_per_byte']:.4f} over {r['tokens']} tokens of {r['n']} "
          f"documents (window {r['window']}, stride {r['stride']})" + _unscoreable(dict(skipped)), file=sys.stderr,
          flush=True)
    _summary(m.out_dir, "ppl", {k: r[k] for k in ("task", "ppl", "bits_per_byte", "tokens", "bytes", "n", "window",
                                                  "stride")} | {"unscoreable": dict(skipped)} | _about(m))


def _check_gen(FLAGS) -> None:
    if not os.path.exists(FLAGS.data):
        raise EvaluateError("--task=gen needs --data: a GSM8K-style folder (test.jsonl, train.jsonl for the shots) "
                            "or one jsonl file (its first --shots rows are the shots)")


@eval_task("gen", "GSM8K-style answers on --data", check=_check_gen)
def _generation(FLAGS, m: Model) -> None:
    if os.path.isdir(FLAGS.data):
        rows = generation_eval.load_rows(os.path.join(FLAGS.data, "test.jsonl"))
        train = os.path.join(FLAGS.data, "train.jsonl")
        shots = generation_eval.load_rows(train)[:FLAGS.shots] if os.path.exists(train) else []
    else:
        every = generation_eval.load_rows(FLAGS.data)
        shots, rows = every[:FLAGS.shots], every[FLAGS.shots:]
    r = generation_eval.score(m.config, m.params, m.tok, rows[:FLAGS.n] if FLAGS.n else rows, shots)
    _write_items(os.path.join(m.out_dir, "gen.jsonl"), r["items"])
    print(f"gen: exact match {r['exact_match']:.4f} on {r['n']} items ({r['shots']}-shot)"
          + _unscoreable(r["unscoreable"]), file=sys.stderr, flush=True)
    _summary(m.out_dir, "gen", {k: r[k] for k in ("task", "exact_match", "n", "unscoreable", "shots")}
             | _about(m))


def _unscoreable(counts: dict[str, int]) -> str:
    return "; not scoreable: " + records.reason_counts(counts) if counts else ""


@eval_task("passkey", "needle in a haystack")
def _passkey(FLAGS, m: Model) -> None:
    def generate(prompts: list[list[int]]) -> list[str]:
        outs = engine_lib.generate(m.config, m.params, prompts, max_new_tokens=8, greedy=True, eos_id=m.tok.eos_id)
        return [m.tok.decode(o) for o in outs]

    try:
        lengths, depths = [int(x) for x in FLAGS.lengths], [float(x) for x in FLAGS.depths]
        r = passkey.grid(generate, m.tok, lengths, depths, trials=FLAGS.trials)
    except ValueError as e:
        raise EvaluateError(f"passkey: {e}") from e
    _write_items(os.path.join(m.out_dir, "passkey.jsonl"), r["items"])
    passkey.heat_map(r, os.path.join(m.out_dir, "passkey.png"))
    print(f"passkey: mean accuracy {r['mean']:.3f}; heat map {os.path.join(m.out_dir, 'passkey.png')}",
          file=sys.stderr, flush=True)
    _summary(m.out_dir, "passkey", {k: r[k] for k in ("task", "lengths", "depths", "accuracy", "mean")}
             | _about(m))


def benchmark_texts(folder: str) -> dict[str, list[str]]:
    """The items of the benchmarks in `folder`, as text: an MMLU / C-Eval folder (each subject's dev and
    eval rows, question and options), or *.jsonl files whose rows have `text` (or `question`)."""
    if os.path.isdir(os.path.join(folder, "dev")):
        data = multiple_choice.load(folder)
        return {subject: [multiple_choice.format_question(r, "en", True) for r in parts["dev"] + parts["eval"]]
                for subject, parts in data.items()}
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out[os.path.basename(path)[:-len(".jsonl")]] = [str(r.get("text", r.get("question", ""))) for r in rows]
    if not out:
        raise EvaluateError(f"--data={folder}: neither an MMLU / C-Eval folder nor *.jsonl benchmark files")
    return out


def _check_contamination(FLAGS) -> None:
    if not os.path.isdir(FLAGS.data) or not FLAGS.corpus:
        raise EvaluateError("--task=contamination needs --data=DIR (benchmarks) and --corpus=GLOB (training jsonl)")


@eval_task("contamination", "--data against --corpus", needs_model=False, check=_check_contamination)
def _contamination(FLAGS, _: None) -> None:
    result = contamination.check(benchmark_texts(FLAGS.data), contamination.corpus_texts(FLAGS.corpus), n=FLAGS.ngram)
    out_dir = FLAGS.out or os.path.join(FLAGS.data, "contamination")
    os.makedirs(out_dir, exist_ok=True)
    _write_items(os.path.join(out_dir, "contamination.jsonl"),
                 [dict(benchmark=name, **item) for name, r in result.items() for item in r["items"]])
    for name, r in result.items():
        print(f"{name}: {r['contaminated']} of {r['checked']} items share a {FLAGS.ngram}-gram with the corpus "
              f"({r['too_short']} too short to check)", file=sys.stderr, flush=True)
    _summary(out_dir, "contamination", {"task": "contamination", "ngram": FLAGS.ngram,
                                        "fractions": {name: r["fraction"] for name, r in result.items()},
                                        "contaminated": {name: r["contaminated"] for name, r in result.items()},
                                        "n": sum(r["checked"] for r in result.values())})


def _about(m: Model) -> dict:
    """What every summary of a model says about it: its checkpoint step, weight format and bytes at rest."""
    return {"step": m.step, "quant": m.quant or "none", "weight_bytes": m.weight_bytes}


def _summary(out_dir: str, name: str, summary: dict) -> None:
    """Write `<out_dir>/<name>_summary.json` beside the per-item jsonl and print it as the last console line."""
    with open(os.path.join(out_dir, f"{name}_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)
    print(json.dumps(summary), flush=True)


def _write_items(path: str, items: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in items:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _run() -> None:
    _define_flags()
    cli.run(main, user_errors=(EvaluateError, sample.SampleError, pretrained.BaseModelError, DataError, InputError))


if __name__ == "__main__":
    _run()
