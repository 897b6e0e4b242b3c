"""Data curation: clean, filter, deduplicate and score a corpus into jsonl shards the pretraining loader reads.

    python -m maxlm.curate --config=configs/curate_default.py --input='crawl/*.jsonl.gz' --output=curated
    python -m maxlm.curate --input=stdlib --output=curated --config.stages=dedup   # dedup only
    python -m maxlm.curate --input=tfds:wiki40b/en:train --output=curated
    python -m maxlm.curate --input='crawl/*.jsonl.gz' --output=curated --config.runner=beam   # Apache Beam

The stages follow the seeds' recipe (InternLM2: jsonl, heuristic rules, LSH dedup, safety and perplexity
filters; Baichuan-7B: rules, model scores, document- and paragraph-level dedup), in this order:

  normalize    Unicode NFC, control characters, whitespace; HTML to text (maxlm/curation/clean.py)
  boilerplate  lines found in >= boilerplate.min_docs different documents are removed everywhere
  language     (a selection, by name only) the language of each document (fastText lid.176 or py3langid),
               written into it; with `language.keep`, other languages go (maxlm/curation/language.py)
  quality      the heuristic rules of maxlm/curation/quality.py (Gopher's, plus a safety blocklist)
  long         (a selection, by name only) InternLM2's long-context filters: length, statistics, and with
               the perplexity stage a perplexity ceiling (maxlm/curation/long.py)
  exact        identical normalised text: the first document is kept
  near         MinHash + banded LSH + verified Jaccard + connected components (maxlm/curation/dedup.py)
  paragraph    long paragraphs already seen in an earlier kept document are cut (repeated spans)
  code         a repository's files (records with `repo` and `path`) become one document, each Python file
               after the files it imports (maxlm/curation/code.py); other records pass unchanged
  perplexity   a maxlm checkpoint scores each document; the worst percentile goes, the rest get buckets

Input: jsonl files (optionally .gz / .zst), one record per line with a `text` field; every other field
(`id`, `url`, ...) is carried through unchanged. Each input file is a shard, processed by its own worker
process; output shard k (`part-0000k.jsonl`) holds what survives of input shard k, in input order. A line
that is not a valid record (bad JSON, invalid UTF-8, no text, over `max_line_bytes`) is counted per reason
and skipped. Memory stays bounded: documents stream through the workers, MinHash signatures go to disk
and LSH reads them once, in row chunks, into 8-byte band keys. `DIR/report.json` counts documents and bytes
in and out and the removals per rule; `DIR/removed_examples.jsonl` keeps a few removed documents per rule
for a human to read. The output is written under a temporary folder and moved into place at the end, and
is byte-identical for the same input, config and seed.

This module is the local runner (`runner=local`): process-pool workers over the shards, the global steps in
numpy. `runner=beam` runs the same stages as an Apache Beam pipeline (maxlm/curation/beam_runner.py) and
writes the same bytes; what happens to one document is written once, in maxlm/curation/steps.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import glob
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from maxlm import config as config_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.config import CURATE_ALIASES, CURATE_STAGES, _check
from maxlm.curation import beam_runner, code, dedup, language, perplexity, quality, steps
from maxlm.curation.steps import (  # noqa: F401 (also their old import path)
    EXAMPLE_CHARS, SIGNATURE_BATCH, CurateError, is_code, prepare)
from maxlm.data import records
from maxlm.data.records import InputError, Shard, iter_records, resolve_input
from maxlm.interop import pretrained


# ---- worker passes (module-level functions: they run in spawned processes) ----

def _line_frequencies(shard: Shard, config: ml_collections.ConfigDict, stages: tuple[str, ...]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Pass A: (line hash, number of documents containing the line) over one shard."""
    hashes = []
    for record, _ in iter_records(shard, config.text_key, config.max_line_bytes):
        if record is not None:
            hashes.extend(steps.line_hashes(record, config, stages))
    return np.unique(np.asarray(hashes, np.int64), return_counts=True)


def _examples_add(examples: dict, row: dict, limit: int) -> None:
    if len(examples[row["rule"]]) < limit:
        examples[row["rule"]].append(row)


def _filter_shard(k: int, shard: Shard, config: ml_collections.ConfigDict, stages: tuple[str, ...], work: str,
                  boilerplate_file: str) -> dict:
    """Pass B: the per-document stages (`steps.filter_record`); survivors go to work/survivors-k.jsonl with their
    exact-dedup hash, MinHash signature (work/sig-k.npy) and long-paragraph hashes."""
    boilerplate = np.load(boilerplate_file) if boilerplate_file else np.zeros(0, np.int64)
    hasher = dedup.MinHasher(config.dedup.num_perm, config.dedup.ngram, config.dedup.unit, config.seed)
    malformed, removed = collections.Counter(), collections.Counter()
    examples = collections.defaultdict(list)
    docs_in = bytes_in = lines_cut = 0
    exact, ids, para_hash, para_doc, sigs, batch = [], [], [], [], [], []
    out_path = os.path.join(work, f"survivors-{k:05d}.jsonl")
    with open(out_path, "w", encoding="utf-8") as out:
        for line, (record, reason) in enumerate(iter_records(shard, config.text_key, config.max_line_bytes)):
            if record is None:
                malformed[reason] += 1
                continue
            original = record[config.text_key]
            docs_in += 1
            bytes_in += len(original.encode("utf-8"))
            rule, text, cut = steps.filter_record(record, config, stages, boilerplate)
            lines_cut += cut
            name = steps.doc_id(record, shard, line)
            if rule is not None:
                removed[rule] += 1
                _examples_add(examples, steps.removal_example(rule, record, name, original), config.examples_per_rule)
                continue
            record[config.text_key] = text
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            ids.append(name)
            if "exact" in stages:
                exact.append(steps.exact_hash(text))
            if "paragraph" in stages:
                hashes = steps.paragraph_hashes(record, text, config)
                para_hash.extend(hashes)
                para_doc.extend([len(ids) - 1] * len(hashes))
            if "near" in stages:
                batch.append(text)
                if len(batch) == steps.SIGNATURE_BATCH:
                    sigs.append(hasher.signatures(batch))
                    batch = []
    if batch:
        sigs.append(hasher.signatures(batch))
    sig_path = os.path.join(work, f"sig-{k:05d}.npy")
    np.save(sig_path, np.concatenate(sigs) if sigs else np.zeros((0, config.dedup.num_perm), np.uint32))
    return {"malformed": malformed, "removed": removed, "examples": dict(examples), "docs_in": docs_in,
            "bytes_in": bytes_in, "boilerplate_lines": lines_cut, "ids": ids, "exact": np.asarray(exact, np.int64),
            "para_hash": np.asarray(para_hash, np.int64), "para_doc": np.asarray(para_doc, np.int64),
            "survivors": out_path, "signatures": sig_path}


def _finish_shard(survivors: str, ids: list[str], drop: list[tuple[int, str, str]], owner: dict[int, int],
                  first: int, config: ml_collections.ConfigDict, stages: tuple[str, ...], out_path: str) -> dict:
    """Pass C: drop the duplicates, cut repeated paragraphs, write the shard's kept records."""
    dropped = {i: (rule, of) for i, rule, of in drop}
    removed = collections.Counter()
    examples = collections.defaultdict(list)
    docs_out = bytes_out = para_chars = 0
    with open(survivors, encoding="utf-8") as src, open(out_path, "w", encoding="utf-8") as out:
        for i, line in enumerate(src):
            record = json.loads(line)
            text = record[config.text_key]
            if i in dropped:
                rule, of = dropped[i]
                removed[rule] += 1
                _examples_add(examples, steps.example_row(rule, id=ids[i], duplicate_of=of, text=text),
                              config.examples_per_rule)
                continue
            if "paragraph" in stages:
                gone, chars = steps.cut_paragraphs(record, owner, first + i, config, stages)
                para_chars += chars
                if gone:
                    removed["paragraph"] += 1
                    _examples_add(examples, steps.example_row("paragraph", id=ids[i], text=text),
                                  config.examples_per_rule)
                    continue
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            docs_out += 1
            bytes_out += len(record[config.text_key].encode("utf-8"))
    return {"removed": removed, "examples": dict(examples), "docs_out": docs_out, "bytes_out": bytes_out,
            "paragraph_chars": para_chars}


# ---- the driver ----

class _Inline:
    """The executor interface, run in this process (workers=1: no process start-up, easy debugging)."""

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self):
        pass


def _executor(workers: int, n_shards: int):
    workers = min(workers or os.cpu_count() or 1, n_shards)
    if workers <= 1:
        return _Inline()
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def curate(config: ml_collections.ConfigDict, input_spec: str, output: str) -> dict:
    """Run the configured stages over `input_spec` into `output`; returns (and writes) the report."""
    validate_curate(config)
    stages = config_lib.curate_stages(config)
    if "perplexity" in stages and not os.path.isdir(config.perplexity.workdir):
        raise CurateError(f"perplexity.workdir={config.perplexity.workdir} is not a maxlm run (train one, e.g. the "
                          "README's runs/tiny, or leave the stage out: --config.stages=...)")
    if "language" in stages:
        language.identifier(config.language.model)  # a missing package is one line now, not one per worker
    shards = resolve_input(input_spec, config.tfds_data_dir)
    if os.path.exists(output) and not os.path.isdir(output):
        raise CurateError(f"--output={output} exists and is not a folder")
    os.makedirs(output, exist_ok=True)
    work = os.path.join(output, ".curate-tmp")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "out"))
    start = time.time()
    _log(f"maxlm.curate: {len(shards)} shard(s) from {input_spec}; stages {', '.join(stages)}")
    report = RUNNERS[config.runner](config, stages, shards, work)
    report["input"]["spec"] = input_spec
    if not report["input"]["documents"]:  # curating nothing is a mistake, not an empty corpus to train on
        shutil.rmtree(work)
        bad = records.reason_counts(report["malformed"])
        raise CurateError(f"--input={input_spec}: no readable document" + (f" (skipped: {bad})" if bad else ""))
    for name in sorted(os.listdir(os.path.join(work, "out"))):
        os.replace(os.path.join(work, "out", name), os.path.join(output, name))
    for stale in glob.glob(os.path.join(output, "part-*.jsonl")):
        if int(os.path.basename(stale)[5:10]) >= len(shards):
            os.remove(stale)  # an earlier run over more shards
    shutil.rmtree(work)
    with open(os.path.join(output, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
        f.write("\n")
    _log(f"kept {report['output']['documents']} of {report['input']['documents']} documents "
         f"({report['output']['bytes'] / max(report['input']['bytes'], 1):.1%} of the bytes) in "
         f"{time.time() - start:.1f}s -> {output}")
    return report


def _run_local(config: ml_collections.ConfigDict, stages: tuple[str, ...], shards: list[Shard], work: str) -> dict:
    """The stages over process-pool workers (`workers`), one input shard each."""
    pool = _executor(config.workers, len(shards))
    try:
        return _run(config, stages, shards, work, pool)
    finally:
        pool.shutdown()


def _run_beam(config: ml_collections.ConfigDict, stages: tuple[str, ...], shards: list[Shard], work: str) -> dict:
    """The stages as an Apache Beam pipeline (maxlm/curation/beam_runner.py)."""
    return beam_runner.run(config, stages, shards, work, log=_log)


RUNNERS = {"local": _run_local, "beam": _run_beam}  # config.runner


def _run(config: ml_collections.ConfigDict, stages: tuple[str, ...], shards: list[Shard], work: str, pool) -> dict:
    boilerplate_file = ""
    if "boilerplate" in stages:
        futures = [pool.submit(_line_frequencies, s, config, stages) for s in shards]
        hashes, freq = zip(*(f.result() for f in futures))
        hashes, freq = np.concatenate(hashes), np.concatenate(freq)
        uniq, inverse = np.unique(hashes, return_inverse=True)
        counts = np.bincount(inverse, weights=freq).astype(np.int64)
        boiler = uniq[counts >= config.boilerplate.min_docs]
        boilerplate_file = os.path.join(work, "boilerplate.npy")
        np.save(boilerplate_file, boiler)
        _log(f"boilerplate: {len(boiler)} distinct lines occur in >= {config.boilerplate.min_docs} documents")

    futures = [pool.submit(_filter_shard, k, s, config, stages, work, boilerplate_file) for k, s in enumerate(shards)]
    parts = [f.result() for f in futures]
    sizes = np.array([len(p["ids"]) for p in parts], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    ids = [i for p in parts for i in p["ids"]]
    reason = np.full(n, "", object)  # why each survivor of pass B is dropped ("" = kept)
    of = np.arange(n)
    report_dedup: dict[str, Any] = {}
    if "exact" in stages and n:
        hashes = np.concatenate([p["exact"] for p in parts])
        _, first_index, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        of = first_index[inverse.reshape(-1)]
        reason[of != np.arange(n)] = "exact"
    if "near" in stages and n:
        sig_path = os.path.join(work, "signatures.npy")
        sig = np.lib.format.open_memmap(sig_path, "w+", np.uint32, (n, config.dedup.num_perm))
        for p, lo in zip(parts, offsets):
            sig[lo:lo + len(p["ids"])] = np.load(p["signatures"])
        sig.flush()
        params = steps.lsh_params(config)
        _log(params.describe(config.dedup.threshold))
        result = dedup.near_duplicates(np.load(sig_path, mmap_mode="r"), config.dedup.threshold, params)
        near = (~result.keep) & (reason == "")
        reason[near], of[near] = "near", result.cluster[near]
        report_dedup = steps.near_report(params, result.candidate_pairs, result.verified_pairs,
                                         len(np.unique(result.cluster[~result.keep])))

    owner_by_shard: list[dict[int, int]] = [{} for _ in parts]
    if "paragraph" in stages and n:
        ph = np.concatenate([p["para_hash"] for p in parts])
        pd = np.concatenate([p["para_doc"] + lo for p, lo in zip(parts, offsets)])
        alive = reason[pd] == ""
        ph, pd = ph[alive], pd[alive]
        uniq, first_index, inverse, count = np.unique(ph, return_index=True, return_inverse=True, return_counts=True)
        repeated = count[inverse.reshape(-1)] > 1
        shard_of = np.searchsorted(offsets, pd[repeated], side="right") - 1
        for h, o, k in zip(ph[repeated], pd[first_index[inverse.reshape(-1)]][repeated], shard_of):
            owner_by_shard[k][int(h)] = int(o)

    out_dir = os.path.join(work, "out") if "perplexity" not in stages else os.path.join(work, "kept")
    os.makedirs(out_dir, exist_ok=True)
    futures = []
    for k, p in enumerate(parts):
        lo = int(offsets[k])
        drop = [(i - lo, str(reason[i]), ids[of[i]]) for i in range(lo, lo + len(p["ids"])) if reason[i]]
        futures.append(pool.submit(_finish_shard, p["survivors"], p["ids"], drop, owner_by_shard[k], lo, config,
                                   stages, os.path.join(out_dir, f"part-{k:05d}.jsonl")))
    finals = [f.result() for f in futures]

    totals = collections.Counter()
    examples = collections.defaultdict(list)
    for result in parts + finals:
        totals.update({f"removed:{rule}": n for rule, n in result["removed"].items()})
        for rule, rows in result["examples"].items():
            examples[rule].extend(rows[:config.examples_per_rule - len(examples[rule])])
    for p in parts:
        totals.update({f"malformed:{r}": n for r, n in p["malformed"].items()})
        totals.update(docs_in=p["docs_in"], bytes_in=p["bytes_in"], boilerplate_lines=p["boilerplate_lines"])
    for f in finals:
        totals.update(docs_out=f["docs_out"], bytes_out=f["bytes_out"], paragraph_chars=f["paragraph_chars"])
    code_counts = _code_stage(config, out_dir, len(parts), work, totals) if "code" in stages else None
    ppl = _perplexity_stage(config, len(shards), work, totals, examples) if "perplexity" in stages else None
    steps.write_examples(os.path.join(work, "out", "removed_examples.jsonl"), examples, config, stages)
    return steps.build_report(config, stages, len(shards), totals, report_dedup, code_counts, ppl)


def _code_stage(config: ml_collections.ConfigDict, out_dir: str, n_shards: int, work: str,
                totals: collections.Counter) -> dict:
    """Group the kept records of each repository across shards (spilled to `code.buckets` files by a hash of the
    repository name), write each repository as one document in dependency order where its first file was,
    and drop its other files' records. Sets the output totals."""
    co = config.code
    spill = os.path.join(work, "code")
    os.makedirs(spill, exist_ok=True)
    buckets = [open(os.path.join(spill, f"bucket-{b:05d}.jsonl"), "w", encoding="utf-8") for b in range(co.buckets)]
    try:
        for k in range(n_shards):
            with open(os.path.join(out_dir, f"part-{k:05d}.jsonl"), encoding="utf-8") as src:
                for i, line in enumerate(src):
                    record = json.loads(line)
                    if steps.in_repository(record, config):
                        buckets[code.repo_bucket(record[co.repo_key], co.buckets)].write(json.dumps([k, i, record])
                                                                                         + "\n")
    finally:
        for f in buckets:
            f.close()
    replace: list[dict[int, dict | None]] = [{} for _ in range(n_shards)]  # shard -> line -> new record (None: drop)
    repos = files = cyclic = 0
    for b in range(co.buckets):
        groups: dict[str, list] = collections.defaultdict(list)
        with open(os.path.join(spill, f"bucket-{b:05d}.jsonl"), encoding="utf-8") as f:
            for line in f:
                k, i, record = json.loads(line)
                groups[record[co.repo_key]].append((k, i, record))
        for repo in sorted(groups):
            members = sorted(groups[repo], key=lambda m: (m[0], m[1]))
            merged, n_files, has_cycle = steps.repository_record([m[2] for m in members], config)
            replace[members[0][0]][members[0][1]] = merged
            for k2, i2, _ in members[1:]:
                replace[k2][i2] = None
            repos += 1
            files += n_files
            cyclic += has_cycle
    docs_out = bytes_out = 0
    for k in range(n_shards):
        path = os.path.join(out_dir, f"part-{k:05d}.jsonl")
        with open(path, encoding="utf-8") as src, open(path + ".code", "w", encoding="utf-8") as out:
            for i, line in enumerate(src):
                if i in replace[k]:
                    if replace[k][i] is None:
                        continue
                    line = json.dumps(replace[k][i], ensure_ascii=False) + "\n"
                out.write(line)
                docs_out += 1
                bytes_out += len(json.loads(line)[config.text_key].encode("utf-8"))
        os.replace(path + ".code", path)
    shutil.rmtree(spill)
    totals["docs_out"], totals["bytes_out"] = docs_out, bytes_out
    return {"repositories": repos, "files": files, "repositories_with_import_cycles": cyclic}


def _perplexity_stage(config: ml_collections.ConfigDict, n_shards: int, work: str, totals: collections.Counter,
                      examples: dict) -> dict:
    """Score every kept document, drop those above the `drop_above` percentile (or the long stage's ceiling),
    bucket the rest. Sets the output totals."""
    pp = config.perplexity
    model_config, params, tok_path = pretrained.load_base(pp.workdir, pp.step, key="perplexity.workdir")
    tok = tokenizer_lib.load(tok_path)
    kept = [os.path.join(work, "kept", f"part-{k:05d}.jsonl") for k in range(n_shards)]
    scores = []
    for path in kept:
        with open(path, encoding="utf-8") as f:
            texts = [json.loads(line)[config.text_key] for line in f]
        scores.append(perplexity.perplexities(model_config, params, tok, texts, max_tokens=pp.max_tokens,
                                              batch_size=pp.batch_size))
    every = np.concatenate(scores) if scores else np.zeros(0)
    cuts = steps.perplexity_cuts(every, config)
    buckets = collections.Counter()
    docs_out = bytes_out = 0
    for path, score in zip(kept, scores):
        with open(path, encoding="utf-8") as src, open(os.path.join(work, "out", os.path.basename(path)), "w",
                                                        encoding="utf-8") as out:
            for line, ppl in zip(src, score):
                record = json.loads(line)
                gone = steps.score_record(record, ppl, cuts, config)
                if gone is not None:
                    totals[f"removed:{gone['rule']}"] += 1
                    _examples_add(examples, gone, config.examples_per_rule)
                    continue
                buckets[record["quality"]] += 1
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                docs_out += 1
                bytes_out += len(record[config.text_key].encode("utf-8"))
    totals["docs_out"], totals["bytes_out"] = docs_out, bytes_out
    return steps.perplexity_report(len(every), cuts, buckets, config)


def main(argv: list[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise CurateError(f"unexpected arguments: {' '.join(argv[1:])}")
    report = curate(flags.FLAGS.config, flags.FLAGS.input, flags.FLAGS.output)
    print(json.dumps({"documents_in": report["input"]["documents"], "documents_out": report["output"]["documents"],
                      "bytes_in": report["input"]["bytes"], "bytes_out": report["output"]["bytes"],
                      "removed": report["removed"], "malformed": report["malformed"]}, ensure_ascii=False))


def validate_curate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Reject an impossible curate config before any data is read, naming the key."""
    named = [s.strip() for s in c.stages.split(",") if s.strip()]
    bad = [s for s in named if s not in CURATE_STAGES and s not in CURATE_ALIASES]
    _check(not bad, "stages", f"unknown stage(s) {bad}; known: {CURATE_STAGES} and aliases {tuple(CURATE_ALIASES)}")
    _check(c.workers >= 0, "workers", "must be >= 0 (0: one per CPU core)")
    _check(c.runner in RUNNERS, "runner", f"must be one of {tuple(RUNNERS)}")
    try:
        shlex.split(c.beam_options)
    except ValueError as e:
        raise config_lib.ConfigError("beam_options", f"not a command line of Beam flags: {e}") from None
    _check(c.max_line_bytes > 0, "max_line_bytes", "must be positive")
    _check(c.html in ("auto", "always", "never"), "html", "must be auto, always or never")
    _check(c.boilerplate.min_docs >= 2, "boilerplate.min_docs", "must be >= 2 (a line in one document is content)")
    unknown = [r for r in c.quality.rules if r not in quality.RULES]
    _check(not unknown, "quality.rules", f"unknown rule(s) {unknown}; known: {tuple(quality.RULES)}")
    for name in ("top_ngrams", "repeated_ngrams"):
        _check(len(c.quality[name].n) == len(c.quality[name].max_fraction), f"quality.{name}",
               "n and max_fraction must have the same length")
    _check(not c.quality.blocklist.words_file or os.path.isfile(c.quality.blocklist.words_file),
           "quality.blocklist.words_file", f"no such file: {c.quality.blocklist.words_file}")
    _check(0.0 < c.dedup.threshold < 1.0, "dedup.threshold", "must be in (0, 1)")
    _check(c.dedup.num_perm >= 2, "dedup.num_perm", "must be >= 2")
    _check(c.dedup.ngram >= 1, "dedup.ngram", "must be >= 1")
    _check(c.dedup.unit in ("char", "word"), "dedup.unit", "must be char or word")
    _check(0.0 < c.dedup.fn_weight < 1.0, "dedup.fn_weight", "must be in (0, 1)")
    _check(c.paragraph.min_chars >= 1, "paragraph.min_chars", "must be >= 1")
    la = c.language
    _check(la.model in language.IDENTIFIERS, "language.model", f"must be one of {tuple(language.IDENTIFIERS)}")
    _check(all(isinstance(k, str) and k for k in la.keep), "language.keep", "ISO 639-1 codes, e.g. ('en', 'zh')")
    for key in ("threshold", "second_share"):
        _check(0.0 <= la[key] <= 1.0, f"language.{key}", "must be in [0, 1]")
    _check(la.segment_chars >= 1 and la.max_chars >= 1, "language.segment_chars", "lengths must be >= 1")
    lo = c.long
    _check(lo.min_tokens >= 0, "long.min_tokens", "must be >= 0")
    _check(not lo.tokenizer or os.path.exists(lo.tokenizer), "long.tokenizer", f"no such tokenizer: {lo.tokenizer}")
    for key in ("max_repeated_line_fraction", "max_digit_fraction", "min_mattr"):
        _check(0.0 <= lo[key] <= 1.0, f"long.{key}", "must be in [0, 1]")
    _check(lo.mattr_window >= 1, "long.mattr_window", "must be >= 1")
    _check(lo.max_perplexity >= 0.0, "long.max_perplexity", "must be >= 0 (0: no ceiling)")
    _check(c.code.buckets >= 1, "code.buckets", "must be >= 1")
    _check(c.code.repo_key != c.code.path_key, "code.path_key", "must differ from code.repo_key")
    try:
        c.code.header.format(path="x")
    except (KeyError, IndexError, ValueError) as e:
        raise config_lib.ConfigError("code.header", f"must be a format string with at most {{path}}: {e}") from None
    pp = c.perplexity
    _check(pp.batch_size > 0, "perplexity.batch_size", "must be positive")
    _check(pp.max_tokens > 1, "perplexity.max_tokens", "must be > 1")
    _check(0.0 < pp.drop_above <= 100.0, "perplexity.drop_above", "must be in (0, 100]")
    _check(len(pp.buckets) == 2 and 0.0 <= pp.buckets[0] <= pp.buckets[1] <= 100.0, "perplexity.buckets",
           "two increasing percentiles in [0, 100]")
    return c


if __name__ == "__main__":
    from absl import flags

    from maxlm import cli

    cli.define_config_flag("configs/curate_default.py", schema=config_lib.curate_config)
    flags.DEFINE_string("input", "stdlib", "A glob of jsonl files (.gz / .zst too), stdlib (the embedded corpus), "
                        "or tfds:NAME[:SPLIT].")
    flags.DEFINE_string("output", "curated", "Folder for part-*.jsonl, report.json and removed_examples.jsonl.")
    cli.run(main, user_errors=(CurateError, InputError), schema=config_lib.curate_config)
