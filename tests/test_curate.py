"""The curation pipeline (python -m maxlm.curate) end to end on small corpora built here: malformed input
counted and skipped with nothing valid lost, fields carried through, byte-identical reruns, boilerplate,
exact / near / paragraph dedup, HTML, compressed input, the perplexity stage against transformers, and the
command line's one-line errors."""

import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from maxlm import config as config_lib
from maxlm.curation import clean
from maxlm.curation import pipeline as curate
from maxlm.data import records
from maxlm.data.sources import StdlibSource
from tests.helpers import GOOD_EN, ROOT, build_tiny_tfds


def _config(**overrides):
    c = config_lib.curate_config()
    c.workers = 1
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _write(path, records):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) + "\n")


def _read(folder):
    rows = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("part-"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                rows += [json.loads(line) for line in f]
    return rows


def _prose(rng, n_paragraphs=3, zh=False):
    """Random but well-formed text: sentences of real-looking words (or characters) ending in stops."""
    if zh:
        chars = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
        return "\n\n".join("".join("".join(rng.choice(chars) for _ in range(rng.randint(8, 20))) + "。"
                                   for _ in range(rng.randint(4, 8))) for _ in range(n_paragraphs))
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(3, 8))) for _ in range(3000)]
    return "\n\n".join(" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
                                for _ in range(rng.randint(4, 8))) for _ in range(n_paragraphs))


def test_malformed_lines_are_counted_and_nothing_valid_is_lost(tmp_path):
    rng = random.Random(0)
    good = [{"id": f"g{i}", "text": _prose(rng, zh=i % 2 == 1), "meta": {"n": i}} for i in range(6)]
    lines = [good[0], "{not json\n", good[1], b"\xff\xfe not utf-8\n", {"title": "no text"}, good[2],
             {"text": 42}, {"text": "   "}, '"a string, not an object"\n', good[3],
             json.dumps({"id": "huge", "text": "x" * (50 << 20)}) + "\n", good[4], "\n", good[5]]
    with open(tmp_path / "in.jsonl", "wb") as f:
        for r in lines:
            f.write(r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) + "\n"
                                                    ).encode("utf-8"))
    with open(tmp_path / "truncated.jsonl.gz", "wb") as f:
        f.write(gzip.compress((json.dumps({"id": "t0", "text": _prose(rng)}) + "\n").encode() * 50)[:-40])
    report = curate.curate(_config(stages="normalize"), str(tmp_path / "*.jsonl*"), str(tmp_path / "out"))
    m = report["malformed"]
    assert (m["bad_json"], m["bad_utf8"], m["missing_text"], m["not_string"], m["empty"], m["too_long"],
            m["corrupt_file"]) == (1, 1, 2, 1, 1, 1, 1)  # a JSON string is not a record: missing_text
    out = _read(tmp_path / "out")
    mine = [r for r in out if r["id"].startswith("g")]
    assert [r["id"] for r in mine] == [g["id"] for g in good]
    assert all(r["meta"] == g["meta"] for r, g in zip(mine, good))  # every field carried through
    assert sum(r["id"] == "t0" for r in out) >= 40  # the readable part of a truncated gzip is kept
    assert report["output"]["documents"] == len(out) == report["input"]["documents"]


def _corpus(tmp_path, rng):
    """Two shards: clean prose in both languages, a boilerplate line on many pages, an exact and a near
    copy, a copied long paragraph, a low-quality page, and an HTML page."""
    banner_en, banner_zh = "We use cookies to improve your experience.", "本网站使用cookie以改善您的体验。"
    docs = []
    for i in range(40):
        zh = i % 4 == 3
        docs.append({"id": f"p{i}", "url": f"https://site.example/{i}",
                     "text": (banner_zh if zh else banner_en) + "\n\n" + _prose(rng, zh=zh)})
    docs.append({"id": "exact-of-p1", "text": docs[1]["text"].replace("\n\n", "\n\n\n")})  # layout only
    near = docs[2]["text"].split(" ")
    near[40] = "changed"
    docs.append({"id": "near-of-p2", "text": " ".join(near)})
    shared = docs[5]["text"].split("\n\n")[1]
    docs.append({"id": "copies-a-paragraph", "text": _prose(rng) + "\n\n" + shared})
    docs.append({"id": "menu", "text": "\n".join(["Home", "Shop", "Cart", "Login"] * 20)})
    docs.append({"id": "html", "text": "<html><head><style>p{}</style></head><body><nav>Home | Shop</nav><h1>Title"
                                       "</h1><p>" + _prose(rng, 1) + "</p><ul><li>First point.</li></ul></body></html>"})
    _write(tmp_path / "a.jsonl", docs[:23])
    _write(tmp_path / "b.jsonl.gz", docs[23:])
    return docs


def test_pipeline_removes_what_each_stage_targets(tmp_path):
    rng = random.Random(1)
    _corpus(tmp_path, rng)
    stages = "normalize,boilerplate,quality,exact,near,paragraph"
    report = curate.curate(_config(stages=stages, **{"boilerplate.min_docs": 5}), str(tmp_path / "*.jsonl*"),
                           str(tmp_path / "out"))
    out = {r["id"]: r for r in _read(tmp_path / "out")}
    assert report["modified"]["boilerplate_lines"] >= 40  # both banners, on every page
    assert not any("cookie" in r["text"] for r in out.values())
    assert "exact-of-p1" not in out and "p1" in out
    assert "near-of-p2" not in out and "p2" in out
    assert report["removed"]["exact"] == 1 and report["removed"]["near"] == 1
    assert "menu" not in out and report["removed"]["line_punctuation"] + report["removed"]["repeated_lines"] >= 1
    assert "copies-a-paragraph" in out and report["modified"]["paragraph_chars"] > 0
    assert out["p5"]["text"].count(out["p5"]["text"].split("\n\n")[1]) == 1
    assert out["copies-a-paragraph"]["text"].split("\n\n")[-1] != out["p5"]["text"].split("\n\n")[1]
    assert out["html"]["text"].startswith("# Title") and "<" not in out["html"]["text"] and "Shop" not in out["html"]["text"]
    assert report["output"]["documents"] == len(out)
    assert report["input"]["documents"] == len(out) + sum(report["removed"].values())
    examples = [json.loads(line) for line in open(tmp_path / "out" / "removed_examples.jsonl", encoding="utf-8")]
    by_rule = {e["rule"]: e for e in examples}
    assert by_rule["exact"]["duplicate_of"] == "p1" and by_rule["near"]["duplicate_of"] == "p2"


def test_dedup_only_and_byte_identical_reruns(tmp_path):
    rng = random.Random(2)
    _corpus(tmp_path, rng)
    outputs = []
    for k, workers in enumerate((1, 2, 1)):
        folder = tmp_path / f"out{k}"
        curate.curate(_config(stages="dedup", workers=workers), str(tmp_path / "*.jsonl*"), str(folder))
        outputs.append({n: open(folder / n, "rb").read() for n in sorted(os.listdir(folder))})
    assert outputs[0] == outputs[1] == outputs[2]
    out = _read(tmp_path / "out0")
    assert len(out) == 45 - 2 and {"menu", "html"} <= {r["id"] for r in out}  # only the two duplicates go
    html = next(r for r in out if r["id"] == "html")
    assert html["text"].startswith("<html>")  # normalize was off: text untouched


def test_tfds_and_stdlib_input(tmp_path):
    rng = random.Random(6)
    texts = [_prose(rng, 1) for _ in range(5)]
    build_tiny_tfds(str(tmp_path / "tfds"), texts + texts[:2])
    report = curate.curate(_config(stages="dedup", tfds_data_dir=str(tmp_path / "tfds")), "tfds:maxlm_tiny_text:train",
                           str(tmp_path / "out"))
    out = _read(tmp_path / "out")
    assert report["removed"]["exact"] == 2 and sorted(r["text"] for r in out) == sorted(texts)
    ids = [r["id"] for r in out]  # the dataset's own id field, carried through (TFDS stores its own order)
    assert len(set(ids)) == 5 and set(ids) <= set(range(7))
    shards = records.resolve_input("stdlib")
    assert shards and shards[-1].hi == len(StdlibSource())


def test_zstd_input(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    rng = random.Random(3)
    payload = "".join(json.dumps({"id": i, "text": _prose(rng)}) + "\n" for i in range(5)).encode()
    (tmp_path / "x.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    curate.curate(_config(stages="normalize"), str(tmp_path / "x.jsonl.zst"), str(tmp_path / "out"))
    assert [r["id"] for r in _read(tmp_path / "out")] == list(range(5))


def test_normalize_and_html():
    assert clean.normalize("Cafe\u0301\r\n\r\n\r\n\tA  b\u200b\x07c  \n") == "Café\n\nA bc"
    text = clean.html_to_text("<p>One &amp; two</p><script>var x;</script><h2>Head</h2><ul><li>a</li><li>b</li>"
                              "</ul><table><tr><td>1</td><td>2</td></tr></table>")
    assert text == "One & two\n\n## Head\n\n- a\n- b\n\n1 | 2"
    assert clean.looks_like_html("<div class=x>hi</div>") and not clean.looks_like_html("a < b and c > d")


def test_perplexity_stage_matches_transformers(tmp_path, hf_base):
    import torch
    from transformers import LlamaForCausalLM

    from maxlm import tokenizer
    from maxlm.curation import perplexity
    from maxlm.interop import pretrained

    rng = random.Random(4)
    texts = [_prose(rng, 1)[: rng.randint(20, 400)] for _ in range(7)]
    config, params, tok_path = pretrained.load_base(hf_base)
    tok = tokenizer.load(tok_path)
    got = perplexity.perplexities(config, params, tok, texts, max_tokens=32, batch_size=4)
    hf = LlamaForCausalLM.from_pretrained(hf_base).eval()
    for text, ppl in zip(texts, got):
        ids = torch.tensor([[tok.bos_id] + tok.encode(text)[:31]])
        with torch.no_grad():
            loss = hf(ids, labels=ids).loss.item()  # mean NLL of every next token
        assert ppl == pytest.approx(np.exp(loss), rel=1e-4)

    _write(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts * 3)])
    report = curate.curate(_config(stages="perplexity", **{"perplexity.workdir": hf_base, "perplexity.max_tokens": 32,
                                                           "perplexity.drop_above": 80.0}),
                           str(tmp_path / "in.jsonl"), str(tmp_path / "out"))
    out = _read(tmp_path / "out")
    # 7 distinct scores x 3 copies: the 80th percentile is the 6th score, so the worst text's copies go;
    # buckets at the 30th / 70th percentiles (3rd / 5th scores): 3 + 2 + 1 texts of 3 copies each
    assert report["removed"]["perplexity"] == 3 and len(out) == 18
    assert max(r["ppl"] for r in out) <= report["perplexity"]["drop_above"]
    assert report["perplexity"]["buckets"] == {"high": 9, "medium": 6, "low": 3}
    for r in out:
        assert r["ppl"] == pytest.approx(got[r["id"] % 7], rel=1e-3)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "maxlm.curate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_command_line(tmp_path):
    rng = random.Random(5)
    _write(tmp_path / "in.jsonl", [{"id": i, "text": _prose(rng)} for i in range(4)] + [{"id": 9, "text": GOOD_EN},
                                                                                      {"id": 10, "text": GOOD_EN}])
    done = _cli("--config=configs/curate_default.py", f"--input={tmp_path}/in.jsonl", f"--output={tmp_path}/out",
                "--config.stages=dedup", "--config.dedup.threshold=0.7")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["documents_in"] == 6 and summary["documents_out"] == 5 and summary["removed"]["exact"] == 1
    assert "for Jaccard threshold 0.7" in done.stderr  # the band choice is printed
    bad = _cli(f"--input={tmp_path}/in.jsonl", f"--output={tmp_path}/o2", "--config.dedup.treshold=0.7")
    assert bad.returncode == 2 and "did you mean dedup.threshold" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli(f"--input={tmp_path}/nothing*.jsonl", f"--output={tmp_path}/o3", "--config.stages=dedup")
    assert missing.returncode == 2 and "matches no file" in missing.stderr and "Traceback" not in missing.stderr
    stage = _cli(f"--input={tmp_path}/in.jsonl", f"--output={tmp_path}/o4", "--config.stages=dedup,typo")
    assert stage.returncode == 2 and "stages" in stage.stderr and "Traceback" not in stage.stderr
    scorer = _cli(f"--input={tmp_path}/in.jsonl", f"--output={tmp_path}/o5", f"--config.perplexity.workdir={tmp_path}/no")
    assert scorer.returncode == 2 and "perplexity.workdir" in scorer.stderr and not os.path.exists(tmp_path / "o5")


def test_chinese_boilerplate_and_paragraphs():
    owner = {clean.text_hash("长" * 30): 0}
    text, removed = clean.drop_paragraphs("开头。\n\n" + "长" * 30 + "\n\n结尾。", owner, doc=1, min_chars=20)
    assert text == "开头。\n\n结尾。" and removed == 30
    assert clean.drop_paragraphs("长" * 30, owner, doc=0, min_chars=20) == ("长" * 30, 0)
    banners = np.array(sorted([clean.text_hash("导航 首页"), clean.text_hash("版权所有")]), np.int64)
    assert clean.drop_lines("导航 首页\n正文。\n\n版权所有", banners) == ("正文。", 2)
