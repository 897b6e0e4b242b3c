"""The curation stages as an Apache Beam pipeline (`--config.runner=beam`, maxlm/curation/beam_runner.py) against
the local runner, its oracle: on a planted corpus held out from both runners' development (four shards, every
kind of plant spread across them), Beam's DirectRunner with two worker processes writes byte for byte the same
part files, report.json and removed_examples.jsonl -- and the plants are shown to have been exercised, so the
equality is not that of two empty outputs."""

import filecmp
import gzip
import json
import os
import random
import sys

import numpy as np
import pytest

from maxlm import config as config_lib
from maxlm.curation import beam_runner, dedup, pipeline

beam = pytest.importorskip("apache_beam")

ROWS = [json.loads(line) for line in open(os.path.join(os.path.dirname(__file__), "data", "langid.jsonl"),
                                          encoding="utf-8")]
REPO = {"pkg/__init__.py": "from .core import run\n", "pkg/core.py": "from . import util\n\n\ndef run():\n"
        "    return util.helper()\n", "pkg/util.py": "def helper():\n    return 1\n", "a.py": "import b\n",
        "b.py": "import a\n"}  # spread over the shards; a <-> b is a cycle
STAGES = "normalize,boilerplate,language,quality,exact,near,paragraph,code"


def _prose(rng, lang, n_paragraphs=3):
    """Sentences of one language's words (the words of tests/data/langid.jsonl), or real Chinese sentences."""
    if lang == "zh":
        sentences = [r["text"] for r in ROWS if r["lang"] == "zh"]
        picked = rng.sample(sentences, 4 * n_paragraphs)  # no sentence twice: that is the repeated_ngrams rule's
        return "\n\n".join("".join(picked[4 * i:4 * i + 4]) for i in range(n_paragraphs))
    words = sorted({w.strip(".,;:!?\"'()").lower() for r in ROWS if r["lang"] == lang for w in r["text"].split()})
    words = [w for w in words if w]
    return "\n\n".join(" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))).capitalize() + "."
                                for _ in range(rng.randint(4, 7))) for _ in range(n_paragraphs))


def _edit(text, rng, n):
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n):
        words[i] = "altered"
    return " ".join(words)


def _planted(tmp_path):
    rng = random.Random(2026)
    shards = [[] for _ in range(4)]
    banner = "Subscribe to our newsletter for weekly updates."
    for i in range(48):
        lang = "zh" if i % 6 == 5 else "en"
        text = _prose(rng, lang)
        if i % 4 == 0:
            text = banner + "\n\n" + text
        shards[i % 4].append({"id": f"d{i}", "text": text, "n": i})
    base = _prose(rng, "en")
    shards[0].append({"id": "exact-a", "text": base})
    shards[1].append({"id": "exact-b", "text": base.upper().replace(" ", "  ")})  # case and layout only
    shards[3].insert(0, {"id": "exact-c", "text": base.replace("\n\n", "\n\n\n")})
    chain = _prose(rng, "en", 4)
    shards[0].append({"id": "near-0", "text": chain})
    shards[2].insert(1, {"id": "near-1", "text": _edit(chain, rng, 3)})
    shards[3].append({"id": "near-2", "text": _edit(_edit(chain, rng, 3), rng, 3)})
    copied = _prose(rng, "en", 1) + " " + _prose(rng, "en", 1)  # one long paragraph (over the length rule's 50 words)
    shards[1].append({"id": "para-owner", "text": _prose(rng, "en", 2) + "\n\n" + copied})
    shards[3].insert(2, {"id": "para-copier", "text": _prose(rng, "en", 2) + "\n\n" + copied})
    shards[2].append({"id": "para-only", "text": copied + "\n\nThe end of the story, as told."})  # too short once cut
    for j, lang in enumerate(("de", "fr", "ru", "de")):
        shards[j].append({"id": f"lang-{lang}-{j}", "text": _prose(rng, lang)})
    shards[2].append({"id": "menu", "text": "\n".join(["Home", "Shop", "Cart", "Login"] * 20)})
    shards[1].append({"id": "html", "text": "<html><body><nav>Home | Shop</nav><h1>Title</h1><p>" + _prose(rng, "en", 1)
                                            + "</p></body></html>"})
    for j, (path, source) in enumerate(sorted(REPO.items())):
        shards[(2 * j) % 4].append({"id": f"acme-{j}", "repo": "acme/tool", "path": path, "text": source})
    shards[1].append({"id": "beta-0", "repo": "beta/lib", "path": "lib.py", "text": "X = 1\n"})
    for k, docs in enumerate(shards):
        lines = [json.dumps(d, ensure_ascii=False) + "\n" for d in docs]
        lines.insert(5, "{broken json\n" if k % 2 else json.dumps({"title": "no text"}) + "\n")
        path = tmp_path / "in" / (f"shard-{k}.jsonl" + (".gz" if k == 3 else ""))
        path.parent.mkdir(exist_ok=True)
        with (gzip.open if k == 3 else open)(path, "wt", encoding="utf-8") as f:
            f.writelines(lines)
    return str(tmp_path / "in" / "shard-*")


def _config(runner, **overrides):
    return config_lib.override(config_lib.curate_config(), **{
        "runner": runner, "workers": 2, "boilerplate.min_docs": 5, "language.keep": ("en", "zh"), **overrides})


def _same_output(tmp_path, spec, **overrides):
    reports = {r: pipeline.curate(_config(r, **overrides), spec, str(tmp_path / r)) for r in ("local", "beam")}
    names = sorted(os.listdir(tmp_path / "local"))
    assert names == sorted(os.listdir(tmp_path / "beam"))
    assert "removed_examples.jsonl" in names and "report.json" in names
    for name in names:
        assert filecmp.cmp(tmp_path / "local" / name, tmp_path / "beam" / name, shallow=False), name
    assert reports["local"] == reports["beam"]
    return reports["local"]


def test_beam_runner_keeps_exactly_what_the_local_runner_keeps(tmp_path, capfd):
    report = _same_output(tmp_path, _planted(tmp_path), stages=STAGES)
    assert "components found inside the pipeline" in capfd.readouterr().err  # no edge gathered on one worker
    removed = report["removed"]
    assert report["malformed"]["bad_json"] == 2 and report["malformed"]["missing_text"] == 2
    assert report["modified"]["boilerplate_lines"] >= 12
    assert removed["exact"] == 2 and removed["near"] == 2 and removed["language"] == 5  # de, fr, ru, de and the menu
    assert removed["paragraph"] == 1 and report["modified"]["paragraph_chars"] >= 2 * 200
    assert report["code"] == {"repositories": 2, "files": 6, "repositories_with_import_cycles": 1}
    # the near chain and the exact copies (near duplicates too; exact takes them first): two clusters
    assert report["near_dedup"]["verified_pairs"] >= 2 and report["near_dedup"]["clusters_with_duplicates"] == 2
    kept = {}
    for name in sorted(os.listdir(tmp_path / "beam")):
        if name.startswith("part-"):
            with open(tmp_path / "beam" / name, encoding="utf-8") as f:
                kept.update((r["id"], r) for r in map(json.loads, f))
    assert {"exact-a", "near-0", "para-owner", "acme-0", "beta-0"} <= set(kept)
    assert not {"exact-b", "exact-c", "near-1", "near-2", "para-only", "acme-1", "menu"} & set(kept)
    assert copied_once(kept["para-copier"]["text"], kept["para-owner"]["text"])
    assert sum(r.get("language") == "zh" for r in kept.values()) == 8  # every Chinese page, punctuation and all
    files = kept["acme-0"]["files"]
    assert sorted(files) == sorted(REPO) and files.index("pkg/util.py") < files.index("pkg/core.py")  # imports first


@pytest.mark.parametrize("rounds, path, gathered", [(8, 5, False), (1, 12, True), (0, 5, True)])
def test_components_inside_the_pipeline_and_the_fallback(rounds, path, gathered):
    """Label propagation inside the pipeline against `dedup.connected_components`: a path of `path` nodes
    (diameter path - 1) and random small clusters. Eight rounds settle a 5-node path in the pipeline; one round
    cannot settle a 12-node path, so every edge goes to the one-worker fallback -- which rounds=0 always takes."""
    from apache_beam.testing.util import assert_that, equal_to

    rng = random.Random(rounds)
    nodes = sorted(rng.sample(range(1 << 40), 60))  # sparse keys, as (shard << 32) | line are
    edges = [(nodes[i], nodes[i + 1]) for i in range(path - 1)]
    for lo in range(path, 60, 5):
        group = nodes[lo:lo + 5]
        edges += [tuple(sorted(rng.sample(group, 2))) for _ in range(4)]
    edges = sorted(set(edges))
    index = {n: i for i, n in enumerate(nodes)}
    label = dedup.connected_components(len(nodes), np.array([[index[a], index[b]] for a, b in edges]))
    linked = {n for edge in edges for n in edge}
    expected = [(nodes[label[index[n]]], n) for n in linked if nodes[label[index[n]]] != n]
    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(["--runner=DirectRunner"])) as p:
        members, stats = beam_runner._component_roots(beam, p | beam.Create(edges), rounds)
        assert_that(members, equal_to(expected))
        totals = tuple(stats) | beam.Flatten() | beam.CombinePerKey(sum)
        for key, value in (("gathered_edges", len(edges) if gathered else 0),
                           ("clusters_with_duplicates", len({root for root, _ in expected}))):
            assert_that(totals | f"{key} only" >> beam.Filter(lambda kv, k: kv[0] == f"near:{k}", key)
                        | f"{key} value" >> beam.Values(), equal_to([value]), label=key)


def copied_once(copier, owner):
    """The owner's last (copied) paragraph is in the owner and no longer in the copier."""
    last = owner.split("\n\n")[-1]
    return len(last) >= 200 and last not in copier


def test_beam_runner_perplexity_stage(tmp_path, hf_base):
    rng = random.Random(9)
    for k in range(3):
        docs = [{"id": f"s{k}-{i}", "text": _prose(rng, "en", 1)[: rng.randint(40, 400)]} for i in range(6)]
        with open(tmp_path / f"in-{k}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    report = _same_output(tmp_path, str(tmp_path / "in-*.jsonl"), stages="exact,perplexity",
                          **{"perplexity.workdir": hf_base, "perplexity.max_tokens": 32, "perplexity.drop_above": 80.0})
    assert report["perplexity"]["scored"] == 18 and report["removed"]["perplexity"] == 4  # above the 80th of 18


def test_beam_options_and_a_missing_beam(tmp_path, monkeypatch):
    assert beam_runner.pipeline_options(_config("beam", workers=2)) == [
        "--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    assert beam_runner.pipeline_options(_config("beam", beam_options="--runner=FlinkRunner --parallelism='4'")) == [
        "--runner=FlinkRunner", "--parallelism=4"]
    with pytest.raises(config_lib.ConfigError, match="runner"):
        pipeline.validate_curate(_config("spark"))
    with pytest.raises(config_lib.ConfigError, match="beam_options"):
        pipeline.validate_curate(_config("beam", beam_options="--runner='DirectRunner"))
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if not installed: importing it raises
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(pipeline.CurateError, match="pip install"):
        pipeline.curate(_config("beam", stages="normalize"), str(tmp_path / "in.jsonl"), str(tmp_path / "out"))
