"""Layout of the test suite: what test files share lives in tests/helpers.py (plain helpers) or tests/conftest.py
(fixtures), and no file under tests/ imports a test module (a `test_*` file) or conftest.py -- importing one
runs its module-level code again under another name and couples unrelated test files."""

import ast
import glob
import os

from tests.helpers import ROOT

TESTS = os.path.join(ROOT, "tests")


def _imported_modules(tree: ast.Module) -> list[tuple[int, list[str]]]:
    """(line, candidate dotted module names) for every name an import brings in, anywhere in the module
    (inside functions too), with relative imports resolved against the `tests` package. `from X import Y`
    gives the candidates X and X.Y, since Y may be a module (`from tests import test_train`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # files in tests/ are modules of the `tests` package
                base = ".".join(p for p in ("tests", base) if p)
            found += [(node.lineno, [base, f"{base}.{alias.name}" if base else alias.name]) for alias in node.names]
    return found


def _is_test_module(name: str) -> bool:
    """Whether a dotted module name refers to a test module or conftest of this suite: tests.test_x,
    tests.conftest, or (tests/ on sys.path) a bare test_x / conftest that exists in tests/."""
    parts = name.split(".")
    if parts[0] == "tests" and len(parts) > 1:
        first = parts[1]
    elif os.path.exists(os.path.join(TESTS, parts[0] + ".py")):
        first = parts[0]
    else:
        return False
    return first.startswith("test_") or first == "conftest"


def cross_imports(paths) -> list[str]:
    """'file:line: module' for each import of a test module in the given files."""
    bad = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for line, candidates in _imported_modules(tree):
            hits = [name for name in candidates if _is_test_module(name)]
            if hits:
                bad.append(f"{os.path.relpath(path, ROOT)}:{line}: {hits[0]}")
    return list(dict.fromkeys(bad))  # one line per import statement


def test_no_test_file_imports_another_test_file():
    paths = sorted(glob.glob(os.path.join(TESTS, "*.py")))
    assert any(os.path.basename(p) == "test_train.py" for p in paths)  # the scan sees the suite
    bad = cross_imports(paths)
    assert not bad, "move what is shared to tests/helpers.py (or a fixture to conftest.py):\n" + "\n".join(bad)


def test_the_scan_finds_every_form_of_cross_import(tmp_path):
    forms = ["from tests.test_train import small_config", "import tests.test_convert",
             "from tests import test_data", "from . import test_quality", "from .test_train import WORDS",
             "import test_train", "from tests.conftest import shared_corpus",
             "def f():\n    from tests.test_data import build_tiny_tfds"]
    for i, source in enumerate(forms):
        (tmp_path / f"test_form{i}.py").write_text(source + "\n")
    assert len(cross_imports(sorted(tmp_path.glob("*.py")))) == len(forms)
    fine = tmp_path / "test_fine.py"
    fine.write_text("import os\nimport pytest\nfrom tests.helpers import ROOT\nfrom tests import helpers\n"
                    "from maxlm import train\nfrom . import helpers as h\n")
    assert cross_imports([fine]) == []
