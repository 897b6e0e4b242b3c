"""The package layout's rules (issue 20): the import contracts in .importlinter hold, no import cycle exists
among maxlm's and kernels' modules (imports inside functions included), and no function imports a project
module -- except the documented lazy imports in LAZY_IMPORTS."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import grimp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("maxlm", "kernels")

# (importing module, imported module) -> why the import is inside a function. Only a heavy optional
# dependency loaded on first use qualifies; a project module imported late to dodge a cycle does not.
LAZY_IMPORTS: dict[tuple[str, str], str] = {}


def _graph() -> grimp.ImportGraph:
    sys.path.insert(0, ROOT)
    try:
        return grimp.build_graph(*PACKAGES, cache_dir=None)
    finally:
        sys.path.remove(ROOT)


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted; also self-imports."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}

    def strongconnect(v: str) -> None:  # iterative, so a long chain cannot hit the recursion limit
        work = [(v, iter(edges[v]))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(edges[w])))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1 or node in edges[node]:
                        out.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            strongconnect(m)
    return sorted(out)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _is_module(name: str) -> bool:
    p = os.path.join(ROOT, *name.split("."))
    return os.path.exists(p + ".py") or os.path.exists(os.path.join(p, "__init__.py"))


def function_local_imports(paths) -> list[tuple[str, str, str]]:
    """(file:line, importing module, imported project module) for each import inside a function body."""
    found = []
    for path in paths:
        module = _module_name(path)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = _resolve(module, node, path.endswith("__init__.py"))
                    for target in (names[1:] if isinstance(node, ast.ImportFrom) else names):
                        if isinstance(node, ast.ImportFrom) and not _is_module(target):
                            target = names[0]
                        if target.split(".")[0] in PACKAGES:
                            found.append((f"{os.path.relpath(path, ROOT)}:{node.lineno}", module, target))
    return sorted(set(found))


def _sources() -> list[str]:
    out = []
    for pkg in PACKAGES:
        for d, dirs, files in os.walk(os.path.join(ROOT, pkg)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            out += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return sorted(out)


def test_import_contracts_hold():
    """kernels import nothing from maxlm; data never imports training, post-training or evaluation; the model
    never imports training; each life-cycle layer imports only the ones below it (.importlinter)."""
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    cmd = [lint] if os.path.exists(lint) else [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd + ["--no-cache"], cwd=ROOT, env=env,  # reads ROOT/.importlinter
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_no_import_cycles():
    found = cycles(_graph())
    assert not found, "import cycles (each a set of modules that reach each other):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_no_function_local_project_imports():
    bad = [f"{where}: {mod} imports {target}" for where, mod, target in function_local_imports(_sources())
           if (mod, target) not in LAZY_IMPORTS]
    assert not bad, "function-local imports of project modules (import at module level, or document the lazy " \
                    "import of a heavy optional dependency in LAZY_IMPORTS):\n" + "\n".join(bad)


def test_the_checks_see_what_they_must(tmp_path):
    """The cycle finder and the function-local scan catch a planted cycle and a planted local import."""
    g = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.c")
    g.add_import(importer="p.c", imported="p.a")
    assert cycles(g) == [["p.a", "p.b", "p.c"]]
    src = tmp_path / "x.py"
    src.write_text("import os\n\ndef f():\n    from maxlm import config\n    return config\n")
    assert [t for _, _, t in function_local_imports([str(src)])] == ["maxlm.config"]


def test_stable_names_importable():
    """The stable surface of the old flat layout still imports (checked in a fresh interpreter)."""
    names = {"maxlm.model": "init apply", "maxlm.convert": "from_hf to_hf", "maxlm.evaluate": "loglikelihoods",
             "maxlm.tokenizer": "load", "maxlm.data.dedup": "MinHasher near_duplicates lsh_params",
             "kernels": "flash_attention"}
    code = "import importlib\n" + "".join(
        f"assert all(hasattr(importlib.import_module({m!r}), n) for n in {n.split()!r}), {m!r}\n"
        for m, n in names.items())
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
