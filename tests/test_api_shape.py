"""The package's shape: private names stay inside their module.

A name with a leading underscore is private to the module that defines it. No module of
`src/diffprune` may import one from another diffprune module (`from .setup import _run`) or reach one
through an imported diffprune module or name (`setup._run`, `Run._state`); a name used across modules
gets a public name. Dunder names (`__version__`, `__all__`) are public. Read with `ast`: nothing is
imported. `tests/` may use private names (they test them).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "diffprune"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imported_module(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name a `from X import ...` statement reads from."""
    if not node.level:
        return node.module or ""
    base = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def imported_names(module: str, tree: ast.AST) -> tuple[list[str], dict[str, str]]:
    """(private names imported from other diffprune modules, {local name: what it is bound to} for
    every name an import binds to a diffprune module or to a name of one)."""
    crossing, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = imported_module(module, node)
            if not source.startswith("diffprune"):
                continue
            for alias in node.names:
                if is_private(alias.name) and source != module:
                    crossing.append(f"from {source} import {alias.name}")
                bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("diffprune"):
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
    return crossing, bound


def dotted(node: ast.AST) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def private_accesses(module: str, tree: ast.AST, bound: dict[str, str]) -> list[str]:
    """`X._name` where X is (an attribute path from) a diffprune module or name this module imported."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not is_private(node.attr):
            continue
        chain = dotted(node.value)
        if chain and chain[0] in bound:
            owner = ".".join([bound[chain[0]], *chain[1:]])
            if owner != module:
                found.append(f"{owner}.{node.attr}")
    return found


def private_names_across_modules() -> dict[str, list[str]]:
    bad = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        crossing, bound = imported_names(module, tree)
        found = crossing + private_accesses(module, tree, bound)
        if found:
            bad[module] = found
    return bad


def test_the_reader_sees_private_imports_and_accesses():
    tree = ast.parse("from .setup import _run, run\nfrom . import setup\nimport diffprune.io as io\n"
                     "setup._x(); io._y; run._z; self._ok; setup.__name__\n")
    crossing, bound = imported_names("diffprune.train.loop", tree)
    assert crossing == ["from diffprune.train.setup import _run"]
    assert sorted(private_accesses("diffprune.train.loop", tree, bound)) == \
        ["diffprune.io._y", "diffprune.train.setup._x", "diffprune.train.setup.run._z"]


def test_no_private_name_crosses_a_module_boundary():
    bad = private_names_across_modules()
    assert not bad, "private names used outside their module (give them public names):\n" + "\n".join(
        f"  {m}: {', '.join(names)}" for m, names in sorted(bad.items()))


# --------------------------------------------------------------------------- dead code

ROOT = SRC.parent
# Top-level names kept though nothing in src/, tests/ or benchmarks/ uses them, each with its reason.
UNUSED_ON_PURPOSE: dict[str, str] = {}


def _all_strings(tree: ast.AST) -> set[int]:
    """ids of the string constants inside `__all__ = [...]` (naming a name there is no use of it)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            found |= {id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
    return found


def used_names(tree: ast.AST) -> set[str]:
    """Names a module reads: loaded names, attributes, imported names, identifier strings (getattr,
    monkeypatch.setattr) other than `__all__` entries."""
    skip, used = _all_strings(tree), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            used |= {a.name for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                and node.value.isidentifier():
            used.add(node.value)
    return used


def top_level_names(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return [n for n in names if not (n.startswith("__") and n.endswith("__"))]


def test_every_top_level_name_in_src_is_used_somewhere():
    """Dead code goes: a function, class or constant of src/diffprune that nothing in src/, tests/ or
    benchmarks/ reads is removed (or listed in UNUSED_ON_PURPOSE with why it stays)."""
    files = [p for d in ("src", "tests", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    trees = {p: ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in files}
    used = set().union(*(used_names(t) for t in trees.values()))
    unused = [f"{p.relative_to(ROOT)}: {n}" for p, t in trees.items() if p.is_relative_to(PACKAGE)
              for n in top_level_names(t) if n not in used and n not in UNUSED_ON_PURPOSE]
    assert not unused, "defined but never used (remove, or list in UNUSED_ON_PURPOSE):\n  " + "\n  ".join(unused)
    stale = [n for n in UNUSED_ON_PURPOSE if n in used]
    assert not stale, f"used now, remove from UNUSED_ON_PURPOSE: {stale}"
