"""Repository-level code data (maxlm/curation/code.py and the curate `code` stage): module names, imports and
the dependency order against answers worked out by hand, cycles broken the documented way, and a curate run
whose repositories -- spread over two shards -- come out as one document each, indentation intact, readable by
the pretraining loader."""

import json
import os

from maxlm import config as C
from maxlm import data
from maxlm.curation import code, pipeline


def test_module_names_and_imports():
    assert code.module_names("src/pkg/mod.py") == ["src.pkg.mod", "pkg.mod", "mod"]
    assert code.module_names("pkg/__init__.py") == ["pkg"]
    assert code.module_names("README.md") == []
    source = ("import os, pkg.a as a\nfrom . import b\nfrom .c import d\nfrom ..up import e\nfrom pkg.x import *\n"
              "def f():\n    import pkg.lazy\n")
    assert sorted(code.imports(source, "pkg/sub/m.py")) == sorted([
        ("os", ()), ("pkg.a", ()), ("pkg.sub", ("b",)), ("pkg.sub.c", ("d",)), ("pkg.up", ("e",)), ("pkg.x", ()),
        ("pkg.lazy", ())])
    assert code.imports("def (:", "x.py") == []


# A repository whose order is worked out by hand: util <- models <- core <- __init__ <- cli, a src/ layout
# (`import lib.helpers` answers to src/lib/helpers.py), a cycle a <-> b that c waits on, a file that does not
# parse, and a README.
REPO = {
    "tool/__init__.py": "from .core import run\n",
    "tool/core.py": "from . import util\nimport tool.models as m\n",
    "tool/util.py": "import os\nimport lib.helpers\n",
    "tool/models.py": "from tool.util import helper\n",
    "tool/cli.py": "from tool import core, VERSION\n",
    "src/lib/helpers.py": "X = 1\n",
    "a.py": "import b\n",
    "b.py": "from a import thing\n",
    "c.py": "import a\nimport b\n",
    "broken.py": "def (:\n",
    "README.md": "# tool\n",
}


def test_dependencies_and_order_worked_out_by_hand():
    assert code.dependencies(REPO) == {
        "tool/__init__.py": {"tool/core.py"}, "tool/core.py": {"tool/util.py", "tool/models.py"},
        "tool/util.py": {"src/lib/helpers.py"}, "tool/models.py": {"tool/util.py"},
        "tool/cli.py": {"tool/core.py", "tool/__init__.py"},  # VERSION is not a module: the package itself
        "src/lib/helpers.py": set(), "a.py": {"b.py"}, "b.py": {"a.py"}, "c.py": {"a.py", "b.py"},
        "broken.py": set()}
    # Ready files go smallest path first; when only the cycle is left waiting, a.py (its smallest path) breaks it.
    assert code.dependency_order(REPO) == [
        "broken.py", "src/lib/helpers.py", "tool/util.py", "tool/models.py", "tool/core.py", "tool/__init__.py",
        "tool/cli.py", "a.py", "b.py", "c.py", "README.md"]
    assert code.cycles(REPO) == 1
    # every dependency outside a cycle comes first
    order = code.dependency_order(REPO)
    for path, deps in code.dependencies(REPO).items():
        for d in deps - {"a.py", "b.py"} if path in ("a.py", "b.py") else deps:
            assert order.index(d) < order.index(path), (d, path)


def test_order_does_not_depend_on_the_input_order():
    shuffled = dict(reversed(list(REPO.items())))
    assert code.dependency_order(shuffled) == code.dependency_order(REPO)
    text, order = code.repository_document(REPO)
    assert text.startswith("# broken.py\ndef (:\n\n# src/lib/helpers.py\nX = 1\n") and order[-1] == "README.md"


def test_curate_code_stage_across_shards(tmp_path):
    shard0 = [{"repo": "acme/tool", "path": p, "text": REPO[p], "license": "mit"} for p in ("tool/cli.py",
                                                                                           "tool/__init__.py")]
    shard0.append({"text": "A prose document that is not code, carried through unchanged."})
    shard1 = [{"repo": "acme/tool", "path": p, "text": REPO[p]} for p in REPO if p not in ("tool/cli.py",
                                                                                         "tool/__init__.py")]
    shard1.append({"repo": "other/x", "path": "x.py", "text": "class X:\r\n\tdef f(self):   \r\n\t\treturn 1\r\n"})
    for k, rows in enumerate((shard0, shard1)):
        (tmp_path / f"in{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = C.override(C.curate_config(), stages="normalize,exact,near,code", workers=1)
    report = pipeline.curate(config, str(tmp_path / "in*.jsonl"), str(tmp_path / "out"))
    out0 = [json.loads(line) for line in open(tmp_path / "out" / "part-00000.jsonl")]
    out1 = [json.loads(line) for line in open(tmp_path / "out" / "part-00001.jsonl")]
    # acme/tool where its first file was (shard 0, line 0), the prose document after it, other/x in shard 1
    assert [r.get("repo") for r in out0] == ["acme/tool", None] and [r["repo"] for r in out1] == ["other/x"]
    tool = out0[0]
    assert tool["files"] == code.dependency_order(REPO) and tool["license"] == "mit" and "path" not in tool
    assert tool["text"] == code.repository_document(REPO)[0]
    assert out1[0]["text"] == "# x.py\nclass X:\n\tdef f(self):\n\t\treturn 1\n"  # layout kept, CRLF and trailing gone
    assert report["code"] == {"repositories": 2, "files": len(REPO) + 1, "repositories_with_import_cycles": 1}
    assert report["output"]["documents"] == 3
    # the output trains with the pretraining loader: the jsonl source reads the three documents
    source = data.make_source(C.override(C.default_config(), **{"data.source": "jsonl", "data.eval_fraction": 0.0,
                                                                "data.path": str(tmp_path / "out")}), "train")
    texts = [source.lookup(i)[0] for i in range(len(source))]
    assert len(texts) == 3 and texts.count(tool["text"]) == 1
