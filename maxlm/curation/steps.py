"""What the curation runners share: each stage applied to one document, and the report.

`maxlm.curation.pipeline` runs these over process-pool workers on one machine, `maxlm.curation.beam_runner` as an
Apache Beam pipeline. Only the global steps (counting boilerplate lines, exact and near dedup, paragraph owners,
code grouping, perplexity percentiles) are written twice, once per engine; everything a document goes through
is here, once, so the two runners keep the same documents by construction and the tests check that they do.
"""

from __future__ import annotations

import collections
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from maxlm import config as config_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.curation import clean, code, dedup, language, long, quality
from maxlm.data.records import MALFORMED, Shard
from maxlm.errors import UserError



class CurateError(UserError):
    """A user mistake (no input, bad output folder, a runner's missing package): one line, exit status 2."""


SIGNATURE_BATCH = 512  # documents per MinHash call
EXAMPLE_CHARS = 2000


def prepare(text: str, config: ml_collections.ConfigDict, stages: tuple[str, ...]) -> str:
    """The normalize stage: HTML to text (when asked or when it looks like HTML), then `clean.normalize`."""
    if "normalize" not in stages:
        return text
    if config.html == "always" or (config.html == "auto" and clean.looks_like_html(text)):
        return clean.html_to_text(text)
    return clean.normalize(text)


def is_code(record: dict, config: ml_collections.ConfigDict) -> bool:
    """A source file (its `code.path_key` ends with one of `code.extensions`): kept out of the prose stages."""
    path = record.get(config.code.path_key)
    return isinstance(path, str) and path.lower().endswith(tuple(config.code.extensions))


@functools.lru_cache(maxsize=2)
def long_tokenizer(path: str):
    """The long stage's token counter in this worker (None: count units)."""
    return tokenizer_lib.load(path) if path else None


def doc_id(record: dict, shard: Shard, line: int) -> str:
    """A document's name in the examples and `duplicate_of`: its `id`, else FILE:LINE."""
    return str(record.get("id", f"{os.path.basename(shard.path) or shard.kind}:{line}"))


def example_row(rule: str, **row: Any) -> dict:
    """One line of removed_examples.jsonl: the rule, then the fields given, the text cut to EXAMPLE_CHARS."""
    row["text"] = row["text"][:EXAMPLE_CHARS]
    return dict(rule=rule, **row)


def line_hashes(record: dict, config: ml_collections.ConfigDict, stages: tuple[str, ...]) -> set[int]:
    """The distinct line hashes of a prose document, for the boilerplate count (documents per line)."""
    if is_code(record, config):
        return set()
    return {clean.text_hash(line) for line in clean.lines_of(prepare(record[config.text_key], config, stages))}


def filter_record(record: dict, config: ml_collections.ConfigDict, stages: tuple[str, ...], boilerplate: np.ndarray
                  ) -> tuple[str | None, str, int]:
    """The per-document stages before dedup: normalise, strip boilerplate lines, identify the language, apply
    the quality and long rules. Returns (the rule that removes it or None, its text now, boilerplate lines cut);
    the language fields are written into `record`."""
    original = record[config.text_key]
    source = is_code(record, config)
    if source:
        text = clean.normalize_code(original) if "normalize" in stages else original
    else:
        text = prepare(original, config, stages)
    cut = 0
    if "boilerplate" in stages and len(boilerplate) and not source:
        text, cut = clean.drop_lines(text, boilerplate)
    if not text.strip():
        return ("boilerplate" if original.strip() else "normalize"), text, cut
    rule = None
    if "language" in stages:
        if source:
            record["language"] = language.CODE
        else:
            verdict = language.identify(text, config.language)
            record["language"] = verdict.language
            record["language_confidence"] = round(verdict.confidence, 4)
            if verdict.second:
                record["language_second"] = verdict.second
            rule = language.check(verdict, config.language)
    if rule is None and "quality" in stages and not source:
        rule = quality.check(text, config.quality, url=str(record.get("url", "")))
    if rule is None and "long" in stages:
        rule = long.check(text, config.long, long_tokenizer(config.long.tokenizer))
    return rule, text, cut


def removal_example(rule: str, record: dict, name: str, original: str) -> dict:
    """The example row of a document a per-document rule removed (language rules show the verdict)."""
    extra = {k: record[k] for k in ("language", "language_confidence") if rule.startswith("language") and k in record}
    return example_row(rule, id=name, text=original, **extra)


def exact_hash(text: str) -> int:
    """The exact stage's key: identical up to case and whitespace."""
    return clean.text_hash(dedup.normalize_for_shingles(text))


def paragraph_hashes(record: dict, text: str, config: ml_collections.ConfigDict) -> list[int]:
    """The hashes of a prose document's long paragraphs, in order, repeats included (a source file has none:
    cutting a block out of it would break it)."""
    if is_code(record, config):
        return []
    return [clean.text_hash(p) for p in clean.paragraphs_of(text) if len(p) >= config.paragraph.min_chars]


def cut_paragraphs(record: dict, owner: Mapping[int, Any], doc: Any, config: ml_collections.ConfigDict,
                   stages: tuple[str, ...]) -> tuple[bool, int]:
    """The paragraph stage for one kept document: cut the long paragraphs another document owns (`owner`: hash ->
    the earliest document holding it; `doc` is this one, comparable with the owners). Returns (whether the
    document is removed -- nothing left, or too short for the length rule -- and the characters cut); the cut
    text is written into `record`."""
    if not owner or is_code(record, config):
        return False, 0
    text = record[config.text_key]
    cut, chars = clean.drop_paragraphs(text, owner, doc, config.paragraph.min_chars)
    if not chars:
        return False, 0
    if not cut.strip() or ("quality" in stages and "length" in config.quality.rules
                           and quality.check(cut, config.quality, rules=("length",)) is not None):
        return True, chars
    record[config.text_key] = cut
    return False, chars


def repository_record(members: list[dict], config: ml_collections.ConfigDict) -> tuple[dict, int, bool]:
    """One repository's records (in input order) as one document: its files in dependency order, the first
    record's other fields. Returns (the record, the number of distinct files, whether imports had a cycle)."""
    co = config.code
    sources: dict[str, str] = {}
    for record in members:
        sources.setdefault(record[co.path_key], record[config.text_key])  # a repeated path: the first
    text, order = code.repository_document(sources, header=co.header)
    merged = {key: v for key, v in members[0].items() if key not in (co.path_key, config.text_key)}
    return {**merged, config.text_key: text, "files": order}, len(sources), code.cycles(sources) > 0


def in_repository(record: dict, config: ml_collections.ConfigDict) -> bool:
    """The code stage groups records that name a repository and a path."""
    return isinstance(record.get(config.code.repo_key), str) and isinstance(record.get(config.code.path_key), str)


def perplexity_cuts(scores: np.ndarray, config: ml_collections.ConfigDict) -> dict:
    """The perplexity stage's global thresholds from every kept document's score: the `drop_above` percentile
    and the two bucket edges, and the long stage's ceiling (0: none)."""
    pp = config.perplexity
    ceiling = config.long.max_perplexity if "long" in config_lib.curate_stages(config) else 0.0
    if not len(scores):
        return {"drop_above": float("inf"), "high_at_most": 0.0, "medium_at_most": 0.0, "ceiling": ceiling}
    high_at, low_at = (float(np.percentile(scores, q)) for q in pp.buckets)
    drop_at = float(np.percentile(scores, pp.drop_above)) if pp.drop_above < 100 else float("inf")
    return {"drop_above": drop_at, "high_at_most": high_at, "medium_at_most": low_at, "ceiling": ceiling}


def score_record(record: dict, ppl: float, cuts: dict, config: ml_collections.ConfigDict) -> dict | None:
    """The perplexity stage for one document: an example row if it goes (over the long ceiling or the
    percentile), else None with its score and quality bucket written into `record`."""
    for rule, limit in (("long_perplexity", cuts["ceiling"] or float("inf")), ("perplexity", cuts["drop_above"])):
        if ppl > limit:
            return example_row(rule, id=record.get("id"), ppl=round(float(ppl), 3), text=record[config.text_key])
    record["ppl"] = round(float(ppl), 4)
    record["quality"] = "high" if ppl <= cuts["high_at_most"] else "medium" if ppl <= cuts["medium_at_most"] else "low"
    return None


def perplexity_report(scored: int, cuts: dict, buckets: Mapping[str, int], config: ml_collections.ConfigDict
                      ) -> dict:
    if not scored:
        return {"scored": 0}
    return {"scored": scored, "model": config.perplexity.workdir, "drop_above": round(cuts["drop_above"], 4),
            "high_at_most": round(cuts["high_at_most"], 4), "medium_at_most": round(cuts["medium_at_most"], 4),
            "buckets": {b: int(buckets.get(b, 0)) for b in ("high", "medium", "low")}}


def lsh_params(config: ml_collections.ConfigDict) -> dedup.LshParams:
    """The near stage's bands x rows for `dedup.threshold`, weighted towards recall by `dedup.fn_weight`."""
    d = config.dedup
    return dedup.lsh_params(d.threshold, d.num_perm, 1 - d.fn_weight, d.fn_weight)


def near_report(params: dedup.LshParams, candidate_pairs: int, verified_pairs: int, clusters: int) -> dict:
    """report.json's `near_dedup`: the band choice and what it found."""
    return {"bands": params.bands, "rows": params.rows, "false_positive_area": params.false_positive_area,
            "false_negative_area": params.false_negative_area, "candidate_pairs": int(candidate_pairs),
            "verified_pairs": int(verified_pairs), "clusters_with_duplicates": int(clusters)}


def write_examples(path: str, examples: Mapping[str, list[dict]], config: ml_collections.ConfigDict,
                   stages: tuple[str, ...]) -> None:
    """removed_examples.jsonl: each rule's example rows, the rules in the order they apply."""
    with open(path, "w", encoding="utf-8") as f:
        for rule in rule_order(config, stages):
            for row in examples.get(rule, []):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def rule_order(config: ml_collections.ConfigDict, stages: tuple[str, ...]) -> list[str]:
    """Every removal rule the stages can apply, in the order they apply: the report's `removed` keys."""
    rules = [s for s in ("normalize", "boilerplate") if s in stages]
    rules += ["language", "language_unsure"] if "language" in stages else []
    rules += list(config.quality.rules) if "quality" in stages else []
    rules += [f"long_{r}" for r in long.RULES] if "long" in stages else []
    rules += [s for s in ("exact", "near", "paragraph", "perplexity") if s in stages]
    return rules + (["long_perplexity"] if "long" in stages and "perplexity" in stages else [])


def build_report(config: ml_collections.ConfigDict, stages: tuple[str, ...], n_shards: int,
                 totals: Mapping[str, int], near: dict | None = None, code_counts: dict | None = None,
                 perplexity: dict | None = None) -> dict:
    """report.json from the runner's totals: `docs_in`, `bytes_in`, `docs_out`, `bytes_out`, `boilerplate_lines`,
    `paragraph_chars`, `malformed:REASON` and `removed:RULE` (missing keys count 0)."""
    totals = collections.Counter(totals)
    report = {
        "stages": list(stages),
        "input": {"shards": n_shards, "documents": totals["docs_in"], "bytes": totals["bytes_in"]},
        "malformed": {r: totals[f"malformed:{r}"] for r in MALFORMED},
        "removed": {r: totals[f"removed:{r}"] for r in rule_order(config, stages)},
        "modified": {"boilerplate_lines": totals["boilerplate_lines"], "paragraph_chars": totals["paragraph_chars"]},
        "output": {"documents": totals["docs_out"], "bytes": totals["bytes_out"]},
    }
    if near:
        report["near_dedup"] = near
    if code_counts is not None:
        report["code"] = code_counts
    if perplexity is not None:
        report["perplexity"] = perplexity
    return report
