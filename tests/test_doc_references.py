"""Files the docs cite exist: every `x.py`, `dir/x.py`, `benchmarks/...`, `tests/...`, `docs/...` or `README.md`
named in a src/diffprune module (docstrings, comments, strings), README.md or docs/*.md is a file of the
repository, or is in ALLOWED with the reason it names a file outside it.

How a name resolves: a path with folders (`io/pipeline.py`, `benchmarks/results/x.json`) must be the
end of a repository file's path; a bare module name (`importance.py`) may be any file of that name under
src/diffprune, benchmarks or tests; a bare upper-case `X.md` a file in the repository root or docs/.
Output file names (`evaluation.json`, `grid.png`, `report.md`) are not checked unless they carry a
repository folder.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Names of files outside the repository, each with why it is cited.
ALLOWED: dict[str, str] = {
    "ddpm_prune.py": "the paper's own pruning script (VainF/Diff-Pruning), cited as the reference",
    "train_text_to_image_sdxl.py": "diffusers' example training script the SDXL recipe follows",
    "train_dreambooth_sd3.py": "diffusers' example training script the SD3 recipe follows",
    "diffprune_pruned_model.py": "the module `--portable` writes into an output folder (io/portable.py)",
    "unet/diffprune_pruned_model.py": "the same module inside a portable pipeline folder's unet/",
    "PAPER.md": "the project's notes on the paper, in ../shared/ beside the repository",
    "DESIGN.md": "the project's first design, in ../shared/ beside the repository",
    "../shared/DESIGN.md": "the project's first design, beside the repository",
    "benchmarks/X.py": "a placeholder for any benchmark script",
}
# The flat modules of before the package moved to folders (issue 17): named only in the move table of
# docs/ARCHITECTURE.md ("before" column), where they are history, not references.
MOVED = {"structure.py", "io.py", "model_checks.py", "portable.py", "portable_template.py", "importance.py",
         "size_search.py", "pruning.py", "prune_job.py", "metrics/complexity.py", "training.py", "train_config.py",
         "train_parts.py", "train_setup.py", "train_loop.py", "train_files.py", "checkpoints.py", "distillation.py",
         "fresh_model.py", "schedules.py", "sampling.py", "sample_files.py", "evaluation.py", "evaluation_cost.py",
         "evaluation_outputs.py", "cli.py", "commands/common.py", "demo.py", "report.py"}
HISTORY = ROOT / "docs" / "ARCHITECTURE.md"

_REFERENCE = re.compile(r"(?<![\w./-])((?:\.\./)?(?:[\w.-]+/)*[\w-]+\.(?:py|md|json|png|txt|toml))(?![\w/])")
_FOLDERS = ("benchmarks/", "tests/", "docs/", "src/")


def sources() -> list[Path]:
    return [*sorted((ROOT / "src" / "diffprune").rglob("*.py")), ROOT / "README.md",
            *sorted((ROOT / "docs").glob("*.md"))]


def repo_files() -> list[str]:
    skip = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
            if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)]


def checked(name: str) -> bool:
    """Whether `name` is a reference to a repository file, not an output file name (`report.md`)."""
    return name.endswith(".py") or name.startswith(_FOLDERS) or bool(re.fullmatch(r"[A-Z_]+\.md", name))


def resolves(name: str, files: list[str]) -> bool:
    if "/" in name:
        return any(f == name or f.endswith("/" + name) for f in files)
    if name.endswith(".md"):
        return name in files or f"docs/{name}" in files
    return any(f.rpartition("/")[2] == name for f in files
               if f.startswith(("src/diffprune/", "benchmarks/", "tests/")))


def missing_references() -> dict[str, list[str]]:
    files, bad = repo_files(), {}
    for source in sources():
        text = source.read_text(encoding="utf-8")
        for name in sorted(set(_REFERENCE.findall(text))):
            if not checked(name) or name in ALLOWED or (source == HISTORY and name in MOVED):
                continue
            if not resolves(name, files):
                bad.setdefault(source.relative_to(ROOT).as_posix(), []).append(name)
    return bad


def test_the_reader_finds_file_references():
    text = "see `prune/stage.py` and benchmarks/results/x.json (importance.py); writes grid.png, v1.2"
    assert _REFERENCE.findall(text) == ["prune/stage.py", "benchmarks/results/x.json", "importance.py", "grid.png"]
    files = ["src/diffprune/prune/stage.py", "benchmarks/results/x.json", "src/diffprune/prune/importance.py"]
    assert all(resolves(n, files) for n in ("prune/stage.py", "benchmarks/results/x.json", "importance.py"))
    assert not resolves("sample/stage.py", files) and not resolves("tests/test_x.py", files)


def test_every_cited_file_exists():
    bad = missing_references()
    assert not bad, "cited files that do not exist (fix the reference, or add it to ALLOWED with why):\n" + \
        "\n".join(f"  {source}: {', '.join(names)}" for source, names in sorted(bad.items()))


def test_the_allow_list_is_needed():
    files = repo_files()
    assert not [n for n in ALLOWED if resolves(n, files)], "ALLOWED names a file that exists: remove it"
