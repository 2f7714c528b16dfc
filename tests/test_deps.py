"""pyproject.toml's runtime dependencies are exactly what src/diffprune imports (issue 23).

Every third-party top-level module imported anywhere in src/diffprune (module level, inside functions,
`importlib.import_module("name")` with a literal) must be declared in `[project] dependencies`, and
every declared runtime dependency must be imported somewhere in src, or be in `INDIRECT` with the
source text that makes it needed. Test-only and benchmark-only packages belong to the extras.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (requires-python allows 3.10: skipped there)

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "diffprune"
BENCH = ROOT / "benchmarks"

# distribution (normalized) -> top-level module, where the names differ beyond "-" vs "_"
MODULE_OF = {"pillow": "PIL", "scikit-learn": "sklearn", "pytorch-msssim": "pytorch_msssim"}
# Runtime dependencies never imported by name: distribution -> the source text in src that needs it.
INDIRECT = {"tensorboard": 'log_with="tensorboard"'}  # accelerate's TensorBoard tracker (train/setup.py)


def _normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _dist_name(requirement: str) -> str:
    return _normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def _module(dist: str) -> str:
    return MODULE_OF.get(dist, dist.replace("-", "_"))


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def imported_modules(root: Path) -> dict[str, set[str]]:
    """Top-level modules imported by absolute name in any .py under `root` -> the files importing them."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                  == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
                names = [node.args[0].value]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(root)))
    return found


def third_party(modules: dict[str, set[str]], local: set[str]) -> dict[str, set[str]]:
    return {m: f for m, f in modules.items() if m not in sys.stdlib_module_names and m not in local}


def test_the_import_reader_sees_lazy_and_literal_imports():
    found = imported_modules(SRC)
    assert "weight_checks.py" in " ".join(found["psutil"])  # inside a function, in a try block
    assert "io/portable_template.py" in found["accelerate"]  # importlib.import_module("accelerate")
    assert "data.py" in found["sklearn"]  # function level


def test_every_third_party_import_in_src_is_a_declared_dependency():
    declared = {_module(_dist_name(r)) for r in _project()["dependencies"]}
    used = third_party(imported_modules(SRC), {"diffprune"})
    missing = {m: sorted(f) for m, f in used.items() if m not in declared}
    assert not missing, f"imported by src/diffprune but not in pyproject dependencies: {missing}"


def test_every_runtime_dependency_is_used_by_src():
    used = set(imported_modules(SRC))
    unused = []
    for requirement in _project()["dependencies"]:
        dist = _dist_name(requirement)
        if dist in INDIRECT:
            text = INDIRECT[dist]
            assert any(text in p.read_text() for p in SRC.rglob("*.py")), f"{dist} is declared for {text!r}, gone"
        elif _module(dist) not in used:
            unused.append(dist)
    assert not unused, f"runtime dependencies nothing in src/diffprune imports (move to an extra or drop): {unused}"


def test_test_and_benchmark_imports_are_declared_somewhere():
    """Tests and benchmarks may use more than the package; each extra module is in the matching extra."""
    project = _project()
    runtime = {_module(_dist_name(r)) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    for folder, extra in ((ROOT / "tests", "test"), (BENCH, "bench")):
        local = {p.stem for p in folder.rglob("*.py")} | {"diffprune"}
        declared = runtime | {_module(_dist_name(r)) for r in extras[extra]}
        missing = sorted(set(third_party(imported_modules(folder), local)) - declared)
        assert not missing, f"{folder.name}/ imports {missing}, not in dependencies or the {extra!r} extra"
