"""Do lm-evaluation-harness and maxlm agree? Three scorers of one tiny model on the same local tasks:

  (1) `python -m maxlm.evaluate` on the maxlm workdir (--task=mc with letter and text choices; --task=ppl);
  (2) lm_eval's `--model hf --model_args pretrained=EXPORT` on `python -m maxlm.convert to_hf`'s export,
      as written (no add_bos_token or other model args);
  (3) lm_eval's `--model maxlm --model_args workdir=W` (`python -m maxlm.lm_eval`, maxlm/lm_eval.py).

    python experiments/lm_eval_agreement.py [--out=DIR] [--keep]

Run it with lm_eval installed (`pip install -c constraints.txt -e '.[test,lm_eval_hf]'`); nothing is downloaded
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set): the tokenizer, the model and the data are made here.

Two models: "sp", a SentencePiece run (bos framed) whose random Llama weights sit in a maxlm workdir; and
"nobos", a Qwen2 folder with a byte-level tokenizer.json that has no bos (Qwen's convention), scored from
the folder by all three (`--hf`, `pretrained=`, `hf=`). The weights are random with O(1) logits, so the
choices' log-likelihoods are far apart and a float32 rounding difference cannot flip a prediction.

Compared item by item: every choice's log-likelihood (|diff| <= 1e-3), acc / acc_norm / acc_bytes, each
document's log-likelihood and bits per byte, and the generate_until strings of (2) and (3). For the "sp"
model, lm_eval's HF backend scores `loglikelihood_rolling` as [bos] + tok(text) after a prefix bos, i.e. it
also scores log p(bos | bos) and shifts the text by a token (lm_eval 0.4's double bos for tokenizers that
add one; maxlm and `--model maxlm` score the text once after bos). The table reports that difference and
checks it is exactly that: maxlm's scorer on [bos, bos] + tokens reproduces (2)'s number.

Prints a table, and last one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file: import this checkout's maxlm, not another installed one
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from maxlm import config as config_lib  # noqa: E402
from maxlm import tokenizer as tokenizer_lib  # noqa: E402
from maxlm.interop import hf as hf_lib  # noqa: E402
from maxlm.interop import pretrained  # noqa: E402
from maxlm.model import scoring  # noqa: E402
from maxlm.training import checkpoint  # noqa: E402
from tests.helpers import build_hf, write_corpus  # noqa: E402

LL_TOL = 1e-3
BPB_RTOL = 1e-4
SUBJECT = "general_knowledge"
ROWS = [  # question, A, B, C, D, answer: text options of different lengths in characters and bytes
    ("What is two plus two?", "3", "4", "five", "22", "B"),
    ("Which planet is known as the red planet?", "Venus", "Earth", "Mars", "Jupiter", "C"),
    ("Water boils at sea level at what Celsius temperature?", "100", "fifty", "0", "212", "A"),
    ("Which word is a verb?", "blue", "quickly", "table", "run", "D"),
    ("How many legs does a spider have?", "six", "eight", "ten", "four", "B"),
    ("Which animal barks?", "fox", "训练数据", "dog", "lazy", "C"),
    ("Which is a prime number?", "9", "15", "7", "21", "C"),
    ("What colour is the sky on a clear day?", "green", "blue", "蓝色的天空", "red", "B"),
    ("Which is the largest ocean?", "Atlantic", "Indian", "Arctic", "Pacific", "D"),
    ("The quick brown fox jumps over the lazy what?", "dog", "cat", "模型", "wizard", "A"),
    ("Which of these is code?", "def f(x): return x", "hello", "数据", "🙂🙂", "A"),
    ("Which is a colour?", "seven", "red", "jump", "box", "B"),
]
DOCS = [
    "The river town woke slowly on market days, and the baker opened his shutters at dawn.",
    "一 二 三 数据 模型 训练：模型在数据上训练。",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # 5",
    "emoji 🙂👍 and    runs   of     spaces\t\ttabs\n\nnew lines",
    "the quick brown fox jumps over a lazy dog while seven wizards quietly box and jump",
]
GEN_ROWS = [{"question": q, "answer": a} for q, a in [
    ("What is two plus two?", "4"), ("Name a colour.", "red"), ("Count to three.", "1 2 3"),
    ("Say hello.", "hello"), ("What comes after Monday?", "Tuesday"), ("数据是什么？", "数据")]]


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(args: list[str], what: str) -> str:
    t0 = time.time()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    print(f"  {what}: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    return done.stdout


# ---- the data: maxlm's layouts and the equivalent lm_eval tasks ---------------------------------------------

def write_data(root: str) -> dict:
    """The MMLU-shaped folder maxlm reads, the ppl / gen jsonl files, and lm_eval task YAMLs for the same items."""
    mc = os.path.join(root, "mc")
    for split, rows in (("dev", ROWS[:1]), ("test", ROWS[1:])):
        os.makedirs(os.path.join(mc, split), exist_ok=True)
        with open(os.path.join(mc, split, f"{SUBJECT}_{split}.csv"), "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(rows)
    tasks = os.path.join(root, "tasks")
    os.makedirs(tasks, exist_ok=True)
    for split, rows in (("dev", ROWS[:1]), ("test", ROWS[1:])):
        with open(os.path.join(tasks, f"mc_{split}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                row = dict(zip(["question", "A", "B", "C", "D", "answer"], r))
                row["texts"] = [row[k].strip() for k in "ABCD"]
                row["label"] = "ABCD".index(row["answer"])
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(root, "ppl.jsonl"), "w", encoding="utf-8") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    shutil.copy(os.path.join(root, "ppl.jsonl"), os.path.join(tasks, "ppl.jsonl"))
    with open(os.path.join(tasks, "gen.jsonl"), "w", encoding="utf-8") as f:
        for r in GEN_ROWS:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    header = f"The following are multiple choice questions (with answers) about {SUBJECT.replace('_', ' ')}.\n\n"
    question = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:"
    mc_files = {"dev": os.path.join(tasks, "mc_dev.jsonl"), "test": os.path.join(tasks, "mc_test.jsonl")}
    for mode, choice in (("letter", '["A", "B", "C", "D"]'), ("text", "texts")):
        _yaml(os.path.join(tasks, f"agree_mc_{mode}.yaml"), {
            "task": f"agree_mc_{mode}", "dataset_path": "json", "dataset_kwargs": {"data_files": mc_files},
            # maxlm's shots answer with the letter in both modes (maxlm/evaluation/multiple_choice.py)
            "test_split": "test", "fewshot_split": "dev", "num_fewshot": 1,
            "fewshot_config": {"sampler": "first_n", "doc_to_choice": ["A", "B", "C", "D"]},
            "output_type": "multiple_choice", "description": header, "doc_to_text": question,
            "doc_to_choice": choice if mode == "text" else ["A", "B", "C", "D"], "doc_to_target": "label",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm", "acc_bytes")]})
    _yaml(os.path.join(tasks, "agree_ppl.yaml"), {
        "task": "agree_ppl", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.join(tasks, "ppl.jsonl")}}, "test_split": "test",
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "bits_per_byte"}, {"metric": "word_perplexity"}]})
    _yaml(os.path.join(tasks, "agree_gen.yaml"), {
        "task": "agree_gen", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.join(tasks, "gen.jsonl")}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n\n", "Question:"], "max_gen_toks": 24, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]})
    return {"mc": mc, "ppl": os.path.join(root, "ppl.jsonl"), "tasks": tasks}


def _yaml(path: str, spec: dict) -> None:
    """lm_eval task YAML (JSON is YAML; the keys are the task's)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False, indent=1)


# ---- the models ------------------------------------------------------------------------------------------------

def make_sp_run(root: str) -> tuple[str, str]:
    """A SentencePiece tokenizer trained here, random Llama weights in a maxlm workdir, and its export via
    `python -m maxlm.convert to_hf` -> (workdir, export folder)."""
    corpus = os.path.join(root, "corpus.jsonl")
    write_corpus(corpus)
    config = config_lib.override(config_lib.default_config(), **{"model.vocab_size": 400,
                                                                  "tokenizer.train_max_bytes": 200_000})
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.startswith("{\"")] + DOCS + [" ".join(r) for r in ROWS]
    tok = tokenizer_lib.train(texts, os.path.join(root, "sp"), config)
    base = os.path.join(root, "sp_base")
    build_hf("LlamaForCausalLM", seed=1, vocab_size=tok.vocab_size).save_pretrained(base)
    run_config, params = hf_lib.from_hf(base)
    work = os.path.join(root, "workdir")
    os.makedirs(work)
    shutil.copy(os.path.join(root, "sp.model"), os.path.join(work, "tokenizer.model"))
    saver = checkpoint.Checkpointer(work, run_config, stage="pretrain", layout="lm", policy="")
    saver.save(1, params, {"count": np.zeros((), np.int32)}, {})
    saver.close()
    export = os.path.join(root, "export")
    _run(["-m", "maxlm.convert", "to_hf", f"--workdir={work}", f"--out={export}"], "maxlm.convert to_hf")
    return work, export


# Qwen2's pre-tokenizer split (its published tokenizer.json): transformers 5 loads any qwen2 folder's tokenizer
# as Qwen2Tokenizer, which rebuilds the pre-tokenizer with this split whatever tokenizer.json says.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def make_nobos_folder(root: str) -> str:
    """A Qwen2 folder (random weights) with a Qwen-style byte-level BPE tokenizer.json that has no bos token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = os.path.join(root, "nobos")
    os.makedirs(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(DOCS * 3 + [" ".join(r) for r in ROWS] * 3 + [g["question"] for g in GEN_ROWS], trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "model_max_length": 256}, f)
    build_hf("Qwen2ForCausalLM", seed=2, vocab_size=tok.get_vocab_size(), num_key_value_heads=2, tie_word_embeddings=False,
             eos_token_id=0, bos_token_id=None, pad_token_id=0).save_pretrained(folder)
    return folder


# ---- the three scorers --------------------------------------------------------------------------------------

def maxlm_evaluate(model_flag: str, data: dict, out: str) -> dict:
    """(1): per-choice log-likelihoods of both choice modes, per-document log-likelihoods, summaries."""
    res = {}
    for mode in ("letter", "text"):
        d = os.path.join(out, f"mc_{mode}")
        summary = json.loads(_run(["-m", "maxlm.evaluate", model_flag, "--task=mc", f"--data={data['mc']}", "--shots=1",
                                   f"--choices={mode}", f"--out={d}"], f"maxlm.evaluate mc {mode}").splitlines()[-1])
        with open(os.path.join(d, "mc.jsonl"), encoding="utf-8") as f:
            items = [json.loads(line) for line in f]
        res[f"mc_{mode}"] = {"lls": [i["loglikelihoods"] for i in items], "acc": summary["acc"],
                             "acc_norm": summary["acc_norm"], "acc_bytes": summary["acc_bytes"]}
    d = os.path.join(out, "ppl")
    summary = json.loads(_run(["-m", "maxlm.evaluate", model_flag, "--task=ppl", f"--data={data['ppl']}", f"--out={d}"],
                              "maxlm.evaluate ppl").splitlines()[-1])
    with open(os.path.join(d, "ppl.jsonl"), encoding="utf-8") as f:
        res["ppl"] = {"lls": [-json.loads(line)["nll"] for line in f], "bits_per_byte": summary["bits_per_byte"]}
    return res


def lm_eval_run(module: str, model: str, model_args: str, data: dict, out: str) -> dict:
    """(2) or (3): the same figures from lm_eval's per-sample logs (--log_samples)."""
    tasks = "agree_mc_letter,agree_mc_text,agree_ppl,agree_gen"
    _run(["-m", module, "--model", model, "--model_args", model_args, "--tasks", tasks, "--include_path", data["tasks"],
          "--batch_size", "8", "--log_samples", "--output_path", out, "--device", "cpu"], f"{module} --model {model}")
    res = {}
    for task in tasks.split(","):
        [path] = glob.glob(os.path.join(out, "**", f"samples_{task}_*.jsonl"), recursive=True)
        with open(path, encoding="utf-8") as f:
            samples = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
        name = task[len("agree_"):]
        if name.startswith("mc"):
            res[name] = {"lls": [[float(r[0][0]) for r in s["resps"]] for s in samples],
                         **{m: float(np.mean([s[m] for s in samples])) for m in ("acc", "acc_norm", "acc_bytes")}}
        elif name == "ppl":
            lls = [float(s["resps"][0][0]) for s in samples]
            nbytes = sum(len(s["target"].encode("utf-8")) for s in samples)
            res[name] = {"lls": lls, "bits_per_byte": -sum(lls) / nbytes / np.log(2)}
        else:
            res[name] = {"texts": [s["resps"][0][0] for s in samples]}
    [results] = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
    with open(results, encoding="utf-8") as f:
        res["reported_bpb"] = json.load(f)["results"]["agree_ppl"]["bits_per_byte,none"]
    return res


def greedy_texts_decoded_by_hf(work: str, export: str, data: dict) -> list[str]:
    """The generate_until task through maxlm's adapter, decoded by the export's AutoTokenizer: the token-level
    check of (2) against (3) for a SentencePiece model, whose byte pieces `sentencepiece` and `tokenizers` render
    differently where a random model strings them into invalid UTF-8."""
    from transformers import AutoTokenizer

    from maxlm.evaluation import lm_eval_adapter

    adapter = lm_eval_adapter.from_model_args(workdir=work)
    hf_tok = AutoTokenizer.from_pretrained(export)
    adapter.tok.decode = lambda ids, skip_special=False: hf_tok.decode(list(ids), skip_special_tokens=skip_special)
    kwargs = {"until": ["\n\n", "Question:"], "max_gen_toks": 24, "do_sample": False}
    return adapter.generate_until([(f"Question: {r['question']}\nAnswer:", kwargs) for r in GEN_ROWS])


def double_bos_lls(export: str) -> list[float]:
    """What lm_eval's HF backend computes for each document of a bos-adding tokenizer: [bos] as context, then
    [bos] + tokens scored -- by maxlm's scorer on the export, the independent check of that explanation."""
    config, params, tok_path = pretrained.load_base(export)
    tok = tokenizer_lib.load(tok_path)
    return scoring.loglikelihoods(config, params, [[tok.bos_id]] * len(DOCS), [[tok.bos_id] + tok.encode(d) for d in DOCS])


# ---- comparison ------------------------------------------------------------------------------------------------

def compare(name: str, a: dict, b: dict) -> dict:
    """Item-by-item differences of b against a (a: maxlm.evaluate, or lm_eval hf for generations)."""
    row: dict = {"pair": name}
    for task in ("mc_letter", "mc_text"):
        diff = np.abs(np.array(a[task]["lls"]) - np.array(b[task]["lls"]))
        row[f"{task}_max_ll_diff"] = float(diff.max())
        for m in ("acc", "acc_norm", "acc_bytes"):
            row[f"{task}_{m}"] = (float(a[task][m]), float(b[task][m]))
    row["ppl_max_ll_diff"] = float(np.max(np.abs(np.array(a["ppl"]["lls"]) - np.array(b["ppl"]["lls"]))))
    row["bpb"] = (float(a["ppl"]["bits_per_byte"]), float(b["ppl"]["bits_per_byte"]))
    row["bpb_rel_diff"] = abs(row["bpb"][0] - row["bpb"][1]) / row["bpb"][0]
    return row


def agrees(row: dict) -> bool:
    return bool(row["mc_letter_max_ll_diff"] <= LL_TOL and row["mc_text_max_ll_diff"] <= LL_TOL and row["bpb_rel_diff"] <= BPB_RTOL
            and all(row[f"{t}_{m}"][0] == row[f"{t}_{m}"][1] for t in ("mc_letter", "mc_text")
                    for m in ("acc", "acc_norm", "acc_bytes")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="", help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="lm_eval_agreement_")
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    try:
        import lm_eval
        version = getattr(lm_eval, "__version__", "")
        data = write_data(root)
        work, export = make_sp_run(root)
        nobos = make_nobos_folder(root)
        results = {"sp": {}, "nobos": {}}
        results["sp"]["maxlm"] = maxlm_evaluate(f"--workdir={work}", data, os.path.join(root, "out_sp_maxlm"))
        results["sp"]["hf"] = lm_eval_run("lm_eval", "hf", f"pretrained={export}", data, os.path.join(root, "out_sp_hf"))
        results["sp"]["lm_eval_maxlm"] = lm_eval_run("maxlm.lm_eval", "maxlm", f"workdir={work}", data,
                                                     os.path.join(root, "out_sp_lmm"))
        results["nobos"]["maxlm"] = maxlm_evaluate(f"--hf={nobos}", data, os.path.join(root, "out_nb_maxlm"))
        results["nobos"]["hf"] = lm_eval_run("lm_eval", "hf", f"pretrained={nobos}", data, os.path.join(root, "out_nb_hf"))
        results["nobos"]["lm_eval_maxlm"] = lm_eval_run("maxlm.lm_eval", "maxlm", f"hf={nobos}", data,
                                                        os.path.join(root, "out_nb_lmm"))
        rows = []
        for model, r in results.items():
            for other in ("hf", "lm_eval_maxlm"):
                row = compare(f"{model}: maxlm.evaluate vs lm_eval {other}", r["maxlm"], r[other])
                row["gen_equal"] = (int(sum(x == y for x, y in zip(r["hf"]["gen"]["texts"],
                                                                   r["lm_eval_maxlm"]["gen"]["texts"]))), len(GEN_ROWS))
                row["reported_bpb"] = float(r[other]["reported_bpb"])
                row["agrees"] = agrees(row)
                rows.append(row)
        sp_gen = greedy_texts_decoded_by_hf(work, export, data)
        sp_gen_equal = sum(x == y for x, y in zip(sp_gen, results["sp"]["hf"]["gen"]["texts"]))
        explained = double_bos_lls(export)
        double_bos = float(np.max(np.abs(np.array(explained) - np.array(results["sp"]["hf"]["ppl"]["lls"]))))
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(root, ignore_errors=True)
    print(f"lm_eval {version}; {len(ROWS) - 1} multiple-choice items (1-shot) x 2 choice modes, {len(DOCS)} documents, "
          f"{len(GEN_ROWS)} generations; {time.time() - t0:.0f}s")
    head = f"{'pair':44} {'max|dLL| letter':>15} {'text':>9} {'acc/norm/bytes equal':>21} {'bpb (maxlm, other)':>22} {'rel':>9} {'gen':>5}"
    print(head)
    for row in rows:
        equal = all(row[f"{t}_{m}"][0] == row[f"{t}_{m}"][1] for t in ("mc_letter", "mc_text")
                    for m in ("acc", "acc_norm", "acc_bytes"))
        print(f"{row['pair']:44} {row['mc_letter_max_ll_diff']:15.2e} {row['mc_text_max_ll_diff']:9.2e} {str(equal):>21} "
              f"{row['bpb'][0]:10.6f},{row['bpb'][1]:10.6f} {row['bpb_rel_diff']:9.2e} {row['gen_equal'][0]}/{row['gen_equal'][1]}")
    print(f"sp, lm_eval hf rolling = maxlm's scorer on [bos] + [bos] + tokens: max |dLL| {double_bos:.2e}")
    print(f"sp, generate_until: maxlm's greedy tokens decoded by the export's AutoTokenizer equal lm_eval hf's "
          f"strings {sp_gen_equal}/{len(GEN_ROWS)}")
    print(json.dumps({"lm_eval": version, "rows": rows, "double_bos_max_ll_diff": double_bos,
                      "sp_gen_equal_with_hf_decoding": [int(sp_gen_equal), len(GEN_ROWS)],
                      "acc": {m: {t: results[m]["maxlm"][t]["acc"] for t in ("mc_letter", "mc_text")} for m in results}}))


if __name__ == "__main__":
    main()
