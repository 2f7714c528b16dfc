"""`write_report`: the report stage, from checked inputs to a complete output folder.

Reads every input first (one line per bad one), then writes report.html, report.md, the PNGs and
report_data.json into a staging folder that replaces `output_dir` only when complete (`atomic_dir`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DiffpruneError, check_range
from ..fsutil import atomic_dir, check_output_dir, check_output_location, write_json_atomic
from .document import Section
from .html import render_html
from .inputs import INPUT_LABELS, Inputs, load_evaluation, load_prune, load_samples, load_training
from .markdown import render_markdown
from .sections import metrics_section, samples_section, timestep_section, training_section, widths_section
from .settings import settings_section
from .tables import Row, metric_rows

DEFAULT_TITLE = "Diff-Pruning report"
DEFAULT_NUM_PAIRS = 32
HTML_FILE = "report.html"
MD_FILE = "report.md"
DATA_FILE = "report_data.json"  # also the marker that `report` wrote a folder (fsutil.marker_file)
STAGE = "report"

_SKIPPED = {
    "prune": "no pruning settings, loss-over-timestep curve or per-layer widths",
    "finetune": "no training loss curve or fine-tune step count",
    "evaluation": "no measured params/MACs, latency, student FID/KID, CLIP score or SSIM",
    "teacher_evaluation": "no teacher FID/KID or CLIP score",
}
_OPTIONS = (("prune", "--prune"), ("finetune", "--finetune"), ("evaluation", "--evaluation"),
            ("teacher_evaluation", "--teacher-evaluation"))


def write_report(output_dir: str | Path, *, prune: str | Path | None = None, finetune: str | Path | None = None,
                 evaluation: str | Path | None = None, teacher_evaluation: str | Path | None = None,
                 teacher_samples: str | Path | None = None, student_samples: str | Path | None = None,
                 title: str = DEFAULT_TITLE, num_pairs: int = DEFAULT_NUM_PAIRS,
                 overwrite: bool = False) -> dict[str, Path]:
    """Write report.html (self-contained), report.md, report_data.json and the PNGs into `output_dir`.

    Every input is optional (at least one is needed); a missing one is named in the report's notes.
    Inputs are read and checked before anything is written; the folder appears complete or not at all.
    Returns {"html", "markdown", "data", and one key per PNG written} -> final paths.
    """
    check_range("num_pairs", num_pairs, 1)
    if int(num_pairs) != num_pairs:
        raise DiffpruneError(f"num_pairs={num_pairs!r} must be an integer >= 1")
    given = {k: v for k, v in dict(prune=prune, finetune=finetune, evaluation=evaluation,
                                   teacher_evaluation=teacher_evaluation, teacher_samples=teacher_samples,
                                   student_samples=student_samples).items() if v is not None}
    if not given:
        raise DiffpruneError("nothing to report: give at least one of --prune, --finetune, --evaluation, "
                             "--teacher-evaluation, --teacher-samples, --student-samples")
    output_dir = check_output_location(output_dir, {f"--{k.replace('_', '-')}": v for k, v in given.items()})
    check_output_dir(output_dir, overwrite, STAGE)  # again under the lock, in atomic_dir

    inputs, notes, train_log = _load_inputs(given)
    t_samples = load_samples(teacher_samples, "--teacher-samples") if teacher_samples is not None else None
    s_samples = load_samples(student_samples, "--student-samples") if student_samples is not None else None
    notes += _skipped_notes(inputs, given)

    written: dict[str, Path] = {}
    with atomic_dir(output_dir, overwrite, STAGE) as tmp:
        rows = metric_rows(inputs, notes)
        sections = [metrics_section(rows, inputs),
                    samples_section(tmp, t_samples, s_samples, num_pairs, inputs, notes, written),
                    timestep_section(tmp, inputs, notes, written),
                    widths_section(tmp, inputs, notes, written),
                    training_section(tmp, train_log, given, written),
                    settings_section(inputs, t_samples, s_samples, given)]
        sections.insert(0, Section("Notes", [("note", n) for n in notes] or ["nothing was skipped"]))
        (tmp / HTML_FILE).write_text(render_html(title, sections, tmp, inputs.files))
        (tmp / MD_FILE).write_text(render_markdown(title, sections))
        write_json_atomic(tmp / DATA_FILE, _report_data(title, given, rows, inputs, notes))
    final = Path(output_dir).absolute()
    out = {"html": final / HTML_FILE, "markdown": final / MD_FILE, "data": final / DATA_FILE}
    out.update({k: final / v.name for k, v in written.items()})
    return out


def _load_inputs(given: dict) -> tuple[Inputs, list[str], dict | None]:
    """The JSON inputs (prune report, train log + config, evaluations), checked; (inputs, notes, train log)."""
    inputs, notes, train_log = Inputs(), [], None
    if "prune" in given:
        inputs.data["prune"], inputs.files["prune"] = load_prune(given["prune"])
    if "finetune" in given:
        train_log, train_config, more, files = load_training(given["finetune"])
        notes += more
        inputs.files.update(files)
        if train_log is not None:
            inputs.data["finetune"] = train_log
        if train_config is not None:
            inputs.data["finetune_config"] = train_config
    for name, option in _OPTIONS[2:]:
        if name in given:
            inputs.data[name], inputs.files[name] = load_evaluation(given[name], option)
    return inputs, notes, train_log


def _skipped_notes(inputs: Inputs, given: dict) -> list[str]:
    notes = [f"{option} not given: {_SKIPPED[name]}" for name, option in _OPTIONS if name not in given]
    for name in ("evaluation", "teacher_evaluation"):
        notes += [f"{INPUT_LABELS[name]} warning: {w}" for w in inputs.get(name, "warnings") or []]
    return notes


def _report_data(title: str, given: dict, rows: list[Row], inputs: Inputs, notes: list[str]) -> dict:
    """report_data.json: the metric table with the source (input:key path) and raw value of every number."""
    return {
        "format": "diffprune-report", "format_version": 1, "stage": STAGE, "title": title,
        "inputs": {k: str(Path(v).absolute()) for k, v in given.items()},
        "metrics": [{"metric": r.metric, "note": r.note, **{
            col: {"text": c.text, "sources": [f"{i}:{p}" for i, p in c.sources],
                  "values": [inputs.get(i, p) for i, p in c.sources]}
            for col, c in zip(("teacher", "student", "compare"), r.cells(), strict=True)}} for r in rows],
        "notes": notes,
    }


__all__ = ["DATA_FILE", "DEFAULT_NUM_PAIRS", "DEFAULT_TITLE", "HTML_FILE", "MD_FILE", "STAGE", "write_report"]
