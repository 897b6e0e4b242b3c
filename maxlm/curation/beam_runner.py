"""The curation stages as an Apache Beam pipeline: `python -m maxlm.curate --config.runner=beam`.

Beam (the open-source model of Google's Dataflow) runs one pipeline on its DirectRunner here and on Dataflow,
Flink or Spark through its own flags (`--config.beam_options='--runner=FlinkRunner ...'`): a terabyte corpus
needs a cluster, not one machine's processes. Every document goes through the functions the local runner uses
(`maxlm.curation.steps`); what is written here is the global part as Beam transforms, so nothing needs all
documents, or all duplicate edges, on one machine:

  read         one element per input shard, fanned out to (position, name, record); a malformed line is a count
  boilerplate  distinct line hashes per document -> Count.PerElement -> the lines in >= min_docs documents,
               a side input of the filter
  filter       `steps.filter_record` (normalize, boilerplate lines, language, quality, long)
  exact        GroupByKey on the normalised-text hash; all but the earliest position go
  near         MinHash in batches -> one key per LSH band -> GroupByKey per (band, key) -> within a bucket each
               member paired with the bucket's first and its predecessor (as `dedup.bucket_pairs`) ->
               Distinct -> two joins with the signatures -> pairs at estimated Jaccard >= threshold ->
               connected components by label propagation (`COMPONENT_ROUNDS` GroupByKey rounds; if the last
               still changed a label, the edges are gathered on one worker instead) -> all but each
               component's earliest document go, joined with its name
  paragraph    GroupByKey on long-paragraph hashes -> each repeated paragraph's owner (earliest document) joined
               back to the documents holding it -> `steps.cut_paragraphs`
  code         GroupByKey on the repository -> one document in dependency order at its first file's position
  perplexity   each output shard scored on a worker, the percentiles from every score (a side input)
  write        GroupByKey on the shard; part-k.jsonl in input order

A position is (shard, line): sorting by it is the local runner's global input order, so "earliest" means the
same thing in both and the outputs are the same bytes (tests/test_beam_curate.py). Counts travel as
(key, n) elements summed per key and the removed examples as the first `examples_per_rule` by position per
rule; both land in the work folder for the driver to assemble report.json.

Input and output paths are opened by the workers as local files: on a distributed runner they must be on a
filesystem every worker mounts (NFS, gcsfuse).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ml_collections
import numpy as np

from maxlm import tokenizer as tokenizer_lib
from maxlm.curation import dedup, perplexity, steps
from maxlm.curation.steps import CurateError
from maxlm.data.records import Shard, iter_records
from maxlm.interop import pretrained


Pos = tuple[int, int]  # (shard, line): the global input order


def _import_beam():
    """Apache Beam, imported when a pipeline is built or a worker runs a step -- not by every `maxlm.curate`
    (0.8 s, and a root-logger warning about BigQuery clients, which would also configure logging for the
    whole process: a handler on the root logger while it imports keeps that from happening)."""
    quiet = logging.NullHandler()
    root = logging.getLogger()
    bare = not root.handlers
    if bare:
        root.addHandler(quiet)
    try:
        import apache_beam
        from apache_beam.options import pipeline_options  # noqa: F401 (for run())
    except ImportError:
        raise CurateError("runner=beam needs Apache Beam: pip install 'maxlm[beam]' (or apache-beam)") from None
    finally:
        if bare:
            root.removeHandler(quiet)
    return apache_beam


@functools.lru_cache(maxsize=1)
def _tagged():
    return _import_beam().pvalue.TaggedOutput


def _stat(key: str, n: int = 1):
    return _tagged()("stats", (key, int(n)))


def _example(row: dict, pos: Pos):
    return _tagged()("examples", (row["rule"], (pos, row)))


def _read(item: tuple[int, Shard], config: ml_collections.ConfigDict) -> Iterator:
    k, shard = item
    for line, (record, reason) in enumerate(iter_records(shard, config.text_key, config.max_line_bytes)):
        if record is None:
            yield _stat(f"malformed:{reason}")
        else:
            yield (k, line), steps.doc_id(record, shard, line), record


def _filter(doc: tuple, config: ml_collections.ConfigDict, stages: tuple[str, ...], boilerplate: np.ndarray
            ) -> Iterator:
    pos, name, record = doc
    record = dict(record)  # elements are immutable in Beam: the stages write into a copy
    original = record[config.text_key]
    yield _stat("docs_in")
    yield _stat("bytes_in", len(original.encode("utf-8")))
    rule, text, cut = steps.filter_record(record, config, stages, boilerplate)
    if cut:
        yield _stat("boilerplate_lines", cut)
    if rule is not None:
        yield _stat(f"removed:{rule}")
        yield _example(steps.removal_example(rule, record, name, original), pos)
        return
    record[config.text_key] = text
    yield pos, name, record


def _exact_duplicates(group: tuple[int, Iterable[tuple[Pos, str]]]) -> Iterator:
    first, *rest = sorted(group[1])
    for pos, _ in rest:
        yield pos, ("exact", first[1])


def _key(pos: Pos) -> int:
    """A position as one int (shard in the high 32 bits): ordered as the positions are, 8 bytes in an array."""
    return (pos[0] << 32) | pos[1]


def _pos(key: int) -> Pos:
    return int(key) >> 32, int(key) & 0xFFFFFFFF


def _signatures(batch: list[tuple], config: ml_collections.ConfigDict, params: dedup.LshParams) -> Iterator:
    """(key, signature) per document and ((band, band key), key) per band."""
    hasher = dedup.MinHasher(config.dedup.num_perm, config.dedup.ngram, config.dedup.unit, config.seed)
    sigs = hasher.signatures([record[config.text_key] for _, _, record in batch])
    bands = dedup.band_keys(sigs, params.bands, params.rows)
    for (pos, _, _), sig, row in zip(batch, sigs, bands):
        yield _key(pos), sig
        for band, key in enumerate(row.tolist()):
            yield _tagged()("bands", ((band, key), _key(pos)))


def _bucket_pairs(bucket: tuple[Any, Iterable[int]]) -> Iterator[tuple[int, int]]:
    """`dedup.bucket_pairs` for one bucket: each member with the first and with its predecessor."""
    members = sorted(bucket[1])
    for i in range(1, len(members)):
        yield members[0], members[i]
        if i > 1:
            yield members[i - 1], members[i]


def _first_half(joined: tuple[int, dict]) -> Iterator:
    key, group = joined
    sig = next(iter(group["sig"]))
    for other in group["pair"]:
        yield other, (key, sig)


def _verify(joined: tuple[int, dict], threshold: float) -> Iterator[tuple[int, int]]:
    """The candidate pairs ending at this document kept if `dedup.estimated_jaccard` reaches the threshold."""
    key, group = joined
    firsts = list(group["half"])
    if not firsts:
        return
    rows = np.stack([next(iter(group["sig"]))] + [sig for _, sig in firsts])
    pairs = np.stack([np.arange(1, len(rows)), np.zeros(len(firsts), np.int64)], axis=1)
    for (first, _), jaccard in zip(firsts, dedup.estimated_jaccard(rows, pairs)):
        if jaccard >= threshold:
            yield first, key


def _components(chunks: list[np.ndarray]) -> Iterator[tuple[int, int]]:
    """(component root, member) for every node of a verified edge but the roots: `dedup.connected_components`
    over the nodes in key order, so a root is its component's earliest document. The edges arrive as int64
    [m, 2] chunks: 16 bytes an edge where they are gathered (Python tuples would take ~8x that)."""
    edges = np.concatenate([np.zeros((0, 2), np.int64), *chunks])
    nodes = np.unique(edges)
    label = dedup.connected_components(len(nodes), np.searchsorted(nodes, edges))
    moved = label != np.arange(len(nodes))
    yield _stat("near:clusters_with_duplicates", len(np.unique(label[moved])))
    yield from zip(nodes[label[moved]].tolist(), nodes[moved].tolist())


# Rounds of label propagation over the verified edges inside the pipeline before the one-worker fallback
# (0: always gather). A duplicate cluster's diameter is small (bucket members link to the bucket's first), so
# a few rounds reach the fixed point and no worker ever holds all the edges.
COMPONENT_ROUNDS = 8


def _both_ways(edge: tuple[int, int]) -> Iterator[tuple[int, int]]:
    yield edge
    yield edge[1], edge[0]


def _first_label(adjacent: tuple[int, Iterable[int]]) -> tuple[int, tuple[int, list[int]]]:
    """A node's label after round 0: the smallest of itself and its neighbours; its adjacency travels along."""
    node, neighbours = adjacent
    neighbours = sorted(set(neighbours))
    return node, (min(node, neighbours[0]), neighbours)


def _send_label(item: tuple[int, tuple[int, list[int]]]) -> Iterator:
    node, (label, neighbours) = item
    yield node, (True, label, neighbours)
    for other in neighbours:
        yield other, (False, label, None)


def _take_smallest(messages: tuple[int, Iterable[tuple]], last: bool) -> Iterator:
    """One round: a node's new label is the smallest it holds or is sent. In the last round a change is
    counted: none means the fixed point, where each component's nodes all carry its smallest node."""
    node, group = messages
    own, neighbours, best = None, None, None
    for is_own, label, adjacency in group:
        if is_own:
            own, neighbours = label, adjacency
        best = label if best is None else min(best, label)
    if last and best != own:
        yield _tagged()("changed", 1)
    yield node, (best, neighbours)


def _if_converged(item: tuple[int, tuple[int, list[int]]], changed: int) -> Iterator[tuple[int, int]]:
    node, (label, _) = item
    if changed == 0 and label != node:
        yield label, node


def _component_roots(beam, verified, rounds: int) -> tuple[Any, Any]:
    """(root, member) for every non-root node of the verified edges, and the clusters stat: label propagation
    for `rounds` rounds (one GroupByKey each); if the last round still changed a label, the edges are gathered
    on one worker instead (`_components`). Either way a root is its component's earliest document."""
    if rounds < 1:
        gathered = verified
        members, stats = [], []
    else:
        labels = (verified | "both ways" >> beam.FlatMap(_both_ways) | "adjacency" >> beam.GroupByKey()
                  | "round 0" >> beam.Map(_first_label))
        for r in range(1, rounds + 1):
            labels = (labels | f"send {r}" >> beam.FlatMap(_send_label) | f"gather {r}" >> beam.GroupByKey()
                      | f"round {r}" >> beam.FlatMap(_take_smallest, r == rounds).with_outputs("changed", main="l"))
            changed = labels.changed
            labels = labels.l
        changed = beam.pvalue.AsSingleton(changed | "changes" >> beam.combiners.Count.Globally())
        members = [labels | "converged" >> beam.FlatMap(_if_converged, changed)]
        stats = [members[0] | "roots" >> beam.Keys() | "distinct roots" >> beam.Distinct()
                 | "count roots" >> beam.combiners.Count.Globally()
                 | "clusters stat" >> beam.Map(lambda n: ("near:clusters_with_duplicates", n))]
        gathered = verified | "not converged" >> beam.Filter(lambda _, n: n > 0, changed)
    near = (gathered | "edge batches" >> beam.BatchElements(min_batch_size=1, max_batch_size=1 << 16)
            | "edge arrays" >> beam.Map(lambda batch: np.asarray(batch, np.int64).reshape(-1, 2))
            | "edges" >> beam.combiners.ToList()
            | "components" >> beam.FlatMap(_components).with_outputs("stats", main="members"))
    stats.append(near.stats)
    stats.append(gathered | "count gathered" >> beam.combiners.Count.Globally()
                 | "gathered stat" >> beam.Map(lambda n: ("near:gathered_edges", n)))
    return (*members, near.members) | "roots and members" >> beam.Flatten(), stats


def _near_drops(joined: tuple[int, dict]) -> Iterator:
    """Each duplicate's drop, naming its root (joined with the root's document for the name)."""
    _, group = joined
    members = list(group["member"])
    if members:
        name = next(iter(group["name"]))
        for member in members:
            yield _pos(member), ("near", name)


def _dedup_verdict(joined: tuple[Pos, dict], config: ml_collections.ConfigDict) -> Iterator:
    pos, group = joined
    name, record = next(iter(group["doc"]))
    drops = list(group.get("exact", ())) or list(group.get("near", ()))  # exact first, as the local runner
    if drops:
        rule, of = drops[0]
        yield _stat(f"removed:{rule}")
        yield _example(steps.example_row(rule, id=name, duplicate_of=of, text=record[config.text_key]), pos)
        return
    yield pos, name, record


def _paragraph_owners(group: tuple[int, Iterable[Pos]]) -> Iterator:
    h, docs = group
    docs = list(docs)
    if len(docs) > 1:  # repeated, in two documents or within one
        owner = min(docs)
        for doc in set(docs):
            yield doc, (h, owner)


def _cut(joined: tuple[Pos, dict], config: ml_collections.ConfigDict, stages: tuple[str, ...]) -> Iterator:
    pos, group = joined
    name, record = next(iter(group["doc"]))
    record = dict(record)
    text = record[config.text_key]
    gone, chars = steps.cut_paragraphs(record, dict(group["owner"]), pos, config, stages)
    if chars:
        yield _stat("paragraph_chars", chars)
    if gone:
        yield _stat("removed:paragraph")
        yield _example(steps.example_row("paragraph", id=name, text=text), pos)
        return
    yield pos, name, record


def _repository(group: tuple[str, Iterable[tuple]], config: ml_collections.ConfigDict) -> Iterator:
    members = sorted(group[1], key=lambda m: m[0])
    record, files, cyclic = steps.repository_record([m[2] for m in members], config)
    yield _stat("code:repositories")
    yield _stat("code:files", files)
    yield _stat("code:repositories_with_import_cycles", int(cyclic))
    yield members[0][0], members[0][1], record


@functools.lru_cache(maxsize=1)
def _scorer(workdir: str, step: int):
    """The perplexity model, loaded once per worker process."""
    model_config, params, tok_path = pretrained.load_base(workdir, step, key="perplexity.workdir")
    return model_config, params, tokenizer_lib.load(tok_path)


def _score_shard(shard: tuple[int, dict], config: ml_collections.ConfigDict) -> Iterator:
    """A shard's kept records in input order, with their perplexities (the local runner's batches)."""
    k, group = shard
    docs = sorted(group["doc"], key=lambda d: d[0])
    pp = config.perplexity
    model_config, params, tok = _scorer(pp.workdir, pp.step)
    scores = perplexity.perplexities(model_config, params, tok, [d[2][config.text_key] for d in docs],
                                     max_tokens=pp.max_tokens, batch_size=pp.batch_size)
    yield k, docs, scores


def _write_shard(shard: tuple, out_dir: str, config: ml_collections.ConfigDict, cuts: dict | None = None
                 ) -> Iterator:
    """part-k.jsonl: the shard's kept records in input order (after the perplexity verdict, with `cuts`)."""
    if cuts is None:
        k, group = shard
        docs, scores = sorted(group["doc"], key=lambda d: d[0]), None
    else:
        k, docs, scores = shard
    docs_out = bytes_out = 0
    with open(os.path.join(out_dir, f"part-{k:05d}.jsonl"), "w", encoding="utf-8") as out:
        for i, (line, _, record) in enumerate(docs):
            if scores is not None:
                record = dict(record)
                gone = steps.score_record(record, scores[i], cuts, config)
                if gone is not None:
                    yield _stat(f"removed:{gone['rule']}")
                    yield _example(gone, (k, line))
                    continue
                yield _stat(f"quality:{record['quality']}")
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            docs_out += 1
            bytes_out += len(record[config.text_key].encode("utf-8"))
    yield _stat("docs_out", docs_out)
    yield _stat("bytes_out", bytes_out)


def _dump(value: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False)


def _by_position(rows: list[tuple[Pos, dict]]) -> list[dict]:
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def pipeline_options(config: ml_collections.ConfigDict) -> list[str]:
    """Beam's flags: `beam_options` as written, or the DirectRunner with `workers` processes."""
    if config.beam_options.strip():
        return shlex.split(config.beam_options)
    workers = config.workers or os.cpu_count() or 1
    mode = "multi_processing" if workers > 1 else "in_memory"
    return ["--runner=DirectRunner", f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"]


def run(config: ml_collections.ConfigDict, stages: tuple[str, ...], shards: list[Shard], work: str,
        log: Callable[[str], None] = print) -> dict:
    """The configured stages over `shards` into `work`/out (part-k.jsonl, removed_examples.jsonl), as the local
    runner; returns the report."""
    beam = _import_beam()
    argv = pipeline_options(config)
    log(f"beam: {' '.join(argv)}")
    params = steps.lsh_params(config)
    out_dir = os.path.join(work, "out")
    stats_path, examples_path = os.path.join(work, "stats.json"), os.path.join(work, "examples.json")
    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(argv)) as p:
        shard_list = p | "shards" >> beam.Create(list(enumerate(shards)))
        read = (shard_list | "spread shards" >> beam.Reshuffle()
                | "read" >> beam.FlatMap(_read, config).with_outputs("stats", main="docs"))
        stats, examples = [read.stats], []
        boilerplate = np.zeros(0, np.int64)
        if "boilerplate" in stages:
            boilerplate = beam.pvalue.AsSingleton(
                read.docs
                | "line hashes" >> beam.FlatMap(lambda d: steps.line_hashes(d[2], config, stages))
                | "documents per line" >> beam.combiners.Count.PerElement()
                | "frequent lines" >> beam.Filter(lambda kv: kv[1] >= config.boilerplate.min_docs)
                | "line" >> beam.Keys()
                | "boilerplate list" >> beam.combiners.ToList()
                | "sorted" >> beam.Map(lambda hashes: np.unique(np.asarray(hashes, np.int64))))
        kept = (read.docs | "filter" >> beam.FlatMap(_filter, config, stages, boilerplate)
                .with_outputs("stats", "examples", main="docs"))
        stats.append(kept.stats)
        examples.append(kept.examples)
        survivors = kept.docs
        stats.append(survivors | "survivors" >> beam.combiners.Count.Globally()
                     | "survivors stat" >> beam.Map(lambda n: ("survivors", n)))
        drops = {}
        if "exact" in stages:
            drops["exact"] = (survivors
                              | "exact key" >> beam.Map(lambda d: (steps.exact_hash(d[2][config.text_key]), d[:2]))
                              | "same text" >> beam.GroupByKey()
                              | "exact duplicates" >> beam.FlatMap(_exact_duplicates))
        if "near" in stages:
            log(params.describe(config.dedup.threshold))
            hashed = (survivors
                      | "batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=steps.SIGNATURE_BATCH)
                      | "minhash" >> beam.FlatMap(_signatures, config, params).with_outputs("bands", main="sigs"))
            pairs = (hashed.bands | "same band" >> beam.GroupByKey()
                     | "bucket pairs" >> beam.FlatMap(_bucket_pairs) | "distinct pairs" >> beam.Distinct())
            halves = ({"sig": hashed.sigs, "pair": pairs} | "join first" >> beam.CoGroupByKey()
                      | "first half" >> beam.FlatMap(_first_half))
            verified = ({"sig": hashed.sigs, "half": halves} | "join second" >> beam.CoGroupByKey()
                        | "verify" >> beam.FlatMap(_verify, config.dedup.threshold))
            for name, pc in (("candidate_pairs", pairs), ("verified_pairs", verified)):
                stats.append(pc | f"count {name}" >> beam.combiners.Count.Globally()
                             | f"{name} stat" >> beam.Map(lambda n, key: (f"near:{key}", n), name))
            members, component_stats = _component_roots(beam, verified, COMPONENT_ROUNDS)
            stats += component_stats
            names = survivors | "names" >> beam.Map(lambda d: (_key(d[0]), d[1]))
            near = ({"name": names, "member": members} | "join roots" >> beam.CoGroupByKey()
                    | "near duplicates" >> beam.FlatMap(_near_drops))
            drops["near"] = near
        alive = survivors
        if drops:
            joined = ({"doc": survivors | "by position" >> beam.Map(lambda d: (d[0], d[1:])), **drops}
                      | "join drops" >> beam.CoGroupByKey())
            verdict = (joined | "drop duplicates" >> beam.FlatMap(_dedup_verdict, config)
                       .with_outputs("stats", "examples", main="docs"))
            stats.append(verdict.stats)
            examples.append(verdict.examples)
            alive = verdict.docs
        final = alive
        if "paragraph" in stages:
            owners = (alive
                      | "paragraphs" >> beam.FlatMap(lambda d: [(h, d[0]) for h in steps.paragraph_hashes(
                          d[2], d[2][config.text_key], config)])
                      | "same paragraph" >> beam.GroupByKey()
                      | "owners" >> beam.FlatMap(_paragraph_owners))
            cut = ({"doc": alive | "alive by position" >> beam.Map(lambda d: (d[0], d[1:])), "owner": owners}
                   | "join owners" >> beam.CoGroupByKey()
                   | "cut paragraphs" >> beam.FlatMap(_cut, config, stages).with_outputs("stats", "examples",
                                                                                         main="docs"))
            stats.append(cut.stats)
            examples.append(cut.examples)
            final = cut.docs
        if "code" in stages:
            parts = final | "repository files" >> beam.Partition(
                lambda d, n: int(steps.in_repository(d[2], config)), 2)
            merged = (parts[1] | "by repository" >> beam.Map(lambda d: (d[2][config.code.repo_key], d))
                      | "same repository" >> beam.GroupByKey()
                      | "merge repository" >> beam.FlatMap(_repository, config).with_outputs("stats", main="docs"))
            stats.append(merged.stats)
            final = (parts[0], merged.docs) | "with repositories" >> beam.Flatten()
        by_shard = ({"doc": final | "by shard" >> beam.Map(lambda d: (d[0][0], (d[0][1], d[1], d[2]))),
                     "shard": shard_list | "every shard" >> beam.Map(lambda s: (s[0], None))}
                    | "join shards" >> beam.CoGroupByKey())
        if "perplexity" in stages:
            scored = by_shard | "score" >> beam.FlatMap(_score_shard, config)
            cuts = (scored | "scores" >> beam.Map(lambda s: s[2]) | "all scores" >> beam.combiners.ToList()
                    | "percentiles" >> beam.Map(lambda s: steps.perplexity_cuts(
                        np.concatenate(s) if s else np.zeros(0), config)))
            written = scored | "write" >> beam.FlatMap(_write_shard, out_dir, config, beam.pvalue.AsSingleton(
                cuts)).with_outputs("stats", "examples", main="nothing")
            stats.append(scored | "scored" >> beam.Map(lambda s: ("perplexity:scored", len(s[2]))))
            _ = cuts | "keep cuts" >> beam.Map(_dump, os.path.join(work, "cuts.json"))
        else:
            written = by_shard | "write" >> beam.FlatMap(_write_shard, out_dir, config).with_outputs(
                "stats", "examples", main="nothing")
        stats.append(written.stats)
        examples.append(written.examples)
        _ = (stats | "all stats" >> beam.Flatten() | "sum stats" >> beam.CombinePerKey(sum)
             | "stats dict" >> beam.combiners.ToDict() | "write stats" >> beam.Map(_dump, stats_path))
        _ = (examples | "all examples" >> beam.Flatten()
             | "first by position" >> beam.combiners.Top.PerKey(config.examples_per_rule, key=lambda e: e[0],
                                                                 reverse=True)
             | "rule rows" >> beam.MapTuple(lambda rule, rows: (rule, _by_position(rows)))
             | "examples dict" >> beam.combiners.ToDict() | "write examples" >> beam.Map(_dump, examples_path))
    with open(stats_path, encoding="utf-8") as f:
        totals = json.load(f)
    with open(examples_path, encoding="utf-8") as f:
        steps.write_examples(os.path.join(out_dir, "removed_examples.jsonl"), json.load(f), config, stages)
    if "near" in stages:
        gathered = totals.get("near:gathered_edges", 0)
        log(f"near: {gathered} verified edges gathered on one worker for the components" if gathered else
            f"near: components found inside the pipeline ({COMPONENT_ROUNDS} rounds of label propagation)")
    return _report(config, stages, len(shards), work, params, totals)


def _report(config: ml_collections.ConfigDict, stages: tuple[str, ...], n_shards: int, work: str,
            params: dedup.LshParams, totals: dict) -> dict:
    near = None
    if "near" in stages and totals.get("survivors"):
        near = steps.near_report(params, *(totals.get(f"near:{k}", 0)
                                           for k in ("candidate_pairs", "verified_pairs", "clusters_with_duplicates")))
    code_counts = None
    if "code" in stages:
        code_counts = {k: int(totals.get(f"code:{k}", 0))
                       for k in ("repositories", "files", "repositories_with_import_cycles")}
    ppl = None
    if "perplexity" in stages:
        with open(os.path.join(work, "cuts.json"), encoding="utf-8") as f:
            cuts = json.load(f)
        buckets = {b: totals.get(f"quality:{b}", 0) for b in ("high", "medium", "low")}
        ppl = steps.perplexity_report(totals.get("perplexity:scored", 0), cuts, buckets, config)
    return steps.build_report(config, stages, n_shards, totals, near, code_counts, ppl)
