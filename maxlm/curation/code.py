"""Repository-level code data: a repository's files as one document, each file after the files it imports.

The seed notes' code step (as in DeepSeek-Coder's repository-level data): a model that reads a file only after
the files it depends on learns cross-file context -- a function's definition comes before its uses. For Python,
the dependencies are the `import` / `from ... import` statements (relative ones resolved against the file's
package); an import names a file of the same repository when its dotted name is that file's module path or
a suffix of it (so `src/pkg/mod.py` answers both `pkg.mod` and `src.pkg.mod`). The order is a topological sort
of "imports before importers", smallest path first among the files that are ready; files in an import cycle
are ordered deterministically: when every remaining file waits on another, the file with the smallest path
among those waiting only on their own cycle goes next. Files that do not parse have no dependencies; files
that are not Python follow the Python files in path order.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import heapq
import warnings


def module_names(path: str) -> list[str]:
    """The dotted names a repository file answers to: 'src/pkg/mod.py' -> ['src.pkg.mod', 'pkg.mod', 'mod'];
    a package's `__init__.py` answers to the package ('pkg/__init__.py' -> ['pkg'])."""
    parts = [p for p in path.replace("\\", "/").split("/") if p and p != "."]
    if not parts or not parts[-1].endswith(".py"):
        return []
    parts[-1] = parts[-1][:-3]
    if parts[-1] == "__init__":
        parts.pop()
    return [".".join(parts[i:]) for i in range(len(parts))]


def imports(source: str, path: str) -> list[tuple[str, tuple[str, ...]]]:
    """What a Python file imports, as (module, names): `import a.b` -> ("a.b", ()), `from a import b, c` ->
    ("a", ("b", "c")), relative imports resolved against the file's package. Empty for a file that does not
    parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    names = module_names(path)
    own = names[0].split(".") if names else []
    package = own if path.endswith("__init__.py") else own[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = len(package) - (node.level - 1)
                if up < 0:
                    continue
                base = ".".join(package[:up] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.append((base, tuple(alias.name for alias in node.names if alias.name != "*")))
    return out


def dependencies(files: dict[str, str]) -> dict[str, set[str]]:
    """For every Python file of a repository (path -> source), the repository's files it imports: `import a.b`
    depends on a/b.py; `from a import b` on a/b.py when b is a module there, else on a (a.py or a/__init__.py)."""
    by_name: dict[str, list[str]] = {}
    for path in sorted(files):
        for name in module_names(path):
            by_name.setdefault(name, []).append(path)

    def resolve(name: str) -> str | None:
        candidates = by_name.get(name, [])  # several files answer to `name`: the fewest extra leading folders
        return min(candidates, key=lambda p: (len(module_names(p)[0]), p)) if candidates else None

    deps = {}
    for path in sorted(files):
        if not path.endswith(".py"):
            continue
        found = set()
        for base, names in imports(files[path], path):
            targets = [resolve(f"{base}.{n}" if base else n) for n in names]
            if not names or any(t is None for t in targets):
                targets.append(resolve(base) if base else None)
            found.update(t for t in targets if t is not None and t != path)
        deps[path] = found
    return deps


def _components(deps: dict[str, set[str]]) -> dict[str, int]:
    """Strongly connected components (Tarjan, iterative): path -> component id."""
    index, low, comp, on_stack, stack = {}, {}, {}, set(), []
    counter = 0
    for root in sorted(deps):
        if root in index:
            continue
        work = [(root, iter(sorted(deps[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(deps[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                cid = len(set(comp.values()))
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp[member] = cid
                    if member == node:
                        break
    return comp


def dependency_order(files: dict[str, str]) -> list[str]:
    """The repository's paths with every Python file after the files it imports (see the module docstring for
    ties and cycles), then the other files in path order."""
    deps = dependencies(files)
    comp = _components(deps)
    waiting = {p: set(d) for p, d in deps.items()}
    importers: dict[str, set[str]] = {p: set() for p in deps}
    for p, d in deps.items():
        for q in d:
            importers[q].add(p)
    ready = [p for p, d in waiting.items() if not d]
    heapq.heapify(ready)
    order, done = [], set()
    while len(order) < len(deps):
        if not ready:  # a cycle: the smallest path among files that wait only on their own component
            stuck = sorted(p for p in waiting if p not in done and all(comp[q] == comp[p] for q in waiting[p]))
            heapq.heappush(ready, stuck[0])
        p = heapq.heappop(ready)
        if p in done:
            continue
        done.add(p)
        order.append(p)
        for q in sorted(importers[p]):
            waiting[q].discard(p)
            if not waiting[q] and q not in done:
                heapq.heappush(ready, q)
    return order + sorted(p for p in files if p not in deps)


def cycles(files: dict[str, str]) -> int:
    """How many import cycles (strongly connected components of more than one file) the repository has."""
    comp = _components(dependencies(files))
    sizes = collections.Counter(comp.values())
    return sum(1 for n in sizes.values() if n > 1)


def repository_document(files: dict[str, str], header: str = "# {path}\n", separator: str = "\n"
                        ) -> tuple[str, list[str]]:
    """(the repository as one text in dependency order, each file preceded by `header`; the paths in order)."""
    order = dependency_order(files)
    text = separator.join(header.format(path=p) + files[p].rstrip("\n") + "\n" for p in order)
    return text, order


def repo_bucket(repo: str, buckets: int) -> int:
    """A stable bucket for a repository name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repo.encode("utf-8"), digest_size=8).digest(), "little") % buckets
