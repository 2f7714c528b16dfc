"""The package layout stays readable: no import cycles, imports point one way, no huge files, a light CLI start.

How imports are read (`ast`, no module is imported): `import a.b` and `from .x import y` at any depth,
relative ones resolved against the importing module; `from pkg import name` counts as an import of
the submodule `pkg.name` when that is a module, else of `pkg`. Imports under `if TYPE_CHECKING:` never
run and do not count.

Function-level (lazy) imports COUNT, for cycles and for direction: a lazy import is the same
dependency, only deferred (it fails at run time the same way, and hides the real order of the
stages). The one exception is the public-API facade `diffprune/__init__.py`, whose function-level
imports (`finetune()` -> train, `__getattr__` -> the stage packages) sit above every stage by
design; its module-level imports count like any other.

The allow-lists below name what is known to be wrong today (work in progress elsewhere). They must
shrink to empty: an entry that no longer applies fails the test, so it is removed when its cause is.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "diffprune"
MAX_LINES = 450  # hard limit for any file in src/ (the house style asks for < 400)

# Import edges (importer, imported) that close a cycle today. MUST SHRINK TO EMPTY.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()

# Import edges against the stage order (LAYERS) today. MUST SHRINK TO EMPTY.
KNOWN_ARROWS_AGAINST: set[tuple[str, str]] = set()

# Files in src/ over MAX_LINES today, with the size they may not exceed meanwhile. MUST SHRINK TO EMPTY.
OVERSIZED: dict[str, int] = {}

# Stages in data-flow order, after the shared layers; a module may import its own layer and the ones
# before it, never a later one (docs/ARCHITECTURE.md). Keys are folders (packages) or root modules
# (without "diffprune."); every module must be mapped, so a new module declares where it belongs.
LAYERS: list[tuple[str, list[str]]] = [
    ("shared", ["errors", "fsutil", "fslock", "config", "plots", "stage_call"]),
    ("data", ["data"]),
    ("families", ["families", "diffusion"]),
    ("io", ["io"]),
    ("prune", ["prune"]),
    ("train", ["train"]),
    ("sample", ["sample"]),
    ("evaluate", ["metrics", "evaluate"]),
    ("report", ["report"]),
    ("cli", ["cli"]),
]
ROOT = "diffprune"  # the public-API facade (diffprune/__init__.py)


# --------------------------------------------------------------------------- reading the imports


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST, lazy: bool = False):
    """(Import | ImportFrom node, inside a function?) for every import that can run."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]), lazy)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, lazy
        yield from _import_nodes(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The diffprune modules one import statement loads (explicitly named ones)."""
    if isinstance(node, ast.Import):
        found = []
        for alias in node.names:
            parts = alias.name.split(".")
            found += [".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in MODULES][:1]
        return found
    base = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    if node.level:
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        full = f"{base}.{node.module}" if node.module else base
    else:
        full = node.module or ""
    return [f"{full}.{a.name}" if f"{full}.{a.name}" in MODULES else full
            for a in node.names if f"{full}.{a.name}" in MODULES or full in MODULES]


@functools.cache
def import_edges() -> dict[tuple[str, str], bool]:
    """(importer, imported) -> True if every such import is function-level (lazy)."""
    edges: dict[tuple[str, str], bool] = {}
    for module, path in MODULES.items():
        for node, lazy in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _targets(module, node):
                if target != module:
                    edges[(module, target)] = edges.get((module, target), True) and lazy
    return edges


def counted_edges() -> set[tuple[str, str]]:
    """The edges that count (all but the root facade's lazy ones)."""
    return {e for e, lazy in import_edges().items() if not (e[0] == ROOT and lazy)}


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            succ = graph.get(v, [])
            if i < len(succ):
                work.append((v, i + 1))
                w = succ[i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return found


def layer_of(module: str) -> int | None:
    names = {f"{ROOT}.{m}": k for k, (_, ms) in enumerate(LAYERS) for m in ms}
    parts = module.split(".")
    for k in range(len(parts), 1, -1):
        if ".".join(parts[:k]) in names:
            return names[".".join(parts[:k])]
    return None


# --------------------------------------------------------------------------- the rules


def test_the_import_reader_sees_every_kind_of_import():
    """Guards the reader itself: relative, nested-function and submodule imports are edges."""
    edges = import_edges()
    assert edges[("diffprune.cli", "diffprune.errors")] is False  # from .errors import ... (module level)
    assert edges[("diffprune.cli.report", "diffprune.report")] is True  # inside register()/run()
    assert edges[("diffprune.report.stage", "diffprune.fsutil")] is False  # from ..fsutil import ...
    assert ("diffprune.metrics.features", "diffprune.metrics.digits_net") in edges
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert cycles({("a", "b"), ("b", "c")}) == []
    assert layer_of("diffprune.io.pipeline") < layer_of("diffprune.prune.stage") < layer_of("diffprune.cli.prune")
    assert layer_of("diffprune.stage_call") == 0 and layer_of("diffprune.nowhere") is None


def test_no_import_cycles():
    edges = counted_edges()
    stale = sorted(KNOWN_CYCLE_EDGES - edges)
    assert not stale, f"KNOWN_CYCLE_EDGES lists imports that no longer exist, remove them: {stale}"
    found = cycles(edges - KNOWN_CYCLE_EDGES)
    assert not found, "import cycles (function-level imports count, see the module docstring): " + "; ".join(
        " <-> ".join(c) for c in found)
    still_cyclic = sorted(e for e in KNOWN_CYCLE_EDGES if any(set(e) <= set(c) for c in cycles(edges)))
    assert still_cyclic == sorted(KNOWN_CYCLE_EDGES), (
        "these KNOWN_CYCLE_EDGES close no cycle any more, remove them: "
        f"{sorted(KNOWN_CYCLE_EDGES - set(still_cyclic))}")


def test_imports_point_one_way():
    """Shared layers never import a stage; a stage never imports a later stage (LAYERS order)."""
    unmapped = sorted(m for m in MODULES if m != ROOT and layer_of(m) is None)
    assert not unmapped, f"map these modules to a layer in LAYERS (and docs/ARCHITECTURE.md): {unmapped}"
    against = {(a, b) for a, b in counted_edges() if ROOT not in (a, b) and layer_of(b) > layer_of(a)}
    stale = sorted(KNOWN_ARROWS_AGAINST - against)
    assert not stale, f"KNOWN_ARROWS_AGAINST lists imports that are fine now, remove them: {stale}"
    new = sorted(against - KNOWN_ARROWS_AGAINST)
    assert not new, "imports against the stage order: " + "; ".join(
        f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})" for a, b in new)


def test_no_source_file_over_the_limit():
    sizes = {str(p.relative_to(SRC.parent)): len(p.read_text(encoding="utf-8").splitlines())
             for p in sorted(SRC.rglob("*.py"))}
    stale = sorted(f for f in OVERSIZED if sizes.get(f, 0) <= MAX_LINES)
    assert not stale, f"OVERSIZED lists files now within {MAX_LINES} lines (or gone), remove them: {stale}"
    over = {f: n for f, n in sizes.items() if n > max(MAX_LINES, OVERSIZED.get(f, 0))}
    assert not over, f"files over {MAX_LINES} lines (split them by job): {over}"


# --------------------------------------------------------------------------- a light CLI start


def test_cli_summaries_are_the_subcommands_own_help():
    """`diffprune --help` lists the subcommands without importing them: the same text they register."""
    from diffprune import cli

    full = cli.build_parser()
    registered = {a.dest: a.help for a in full._subparsers._group_actions[0]._choices_actions}
    assert registered == cli.SUMMARIES
    assert cli.build_parser(()).format_help() == full.format_help()
    assert cli.requested_command(["report", "--help"]) == "report" and cli.requested_command(["--version"]) is None


_PROBE = """
import sys
from diffprune.cli import main
for argv in (["--version"], ["--help"], ["report", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
print("HEAVY:", sorted(m for m in ("torch", "diffusers", "transformers", "accelerate") if m in sys.modules))
"""


def test_help_and_version_start_without_torch():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                         cwd=SRC.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY: []" in out.stdout, out.stdout[-500:]


def test_no_module_needs_a_posix_only_import():
    """The output lock is `filelock`'s (flock or msvcrt inside it): no module imports fcntl or another
    POSIX-only module itself, so every module imports on Windows."""
    def imported(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        return [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []

    posix_only = sorted(f"{m}: {name}" for m, p in MODULES.items()
                        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))) for name in imported(node)
                        if name.split(".")[0] in ("fcntl", "termios", "pwd", "grp", "resource"))
    assert not posix_only, posix_only
