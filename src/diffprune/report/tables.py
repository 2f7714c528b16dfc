"""The teacher-vs-student metric table: one `Row` per metric, every value with its source.

Owns which metrics the report shows and from which key of which input (the candidates, in order
of preference), plus the consistency notes between inputs (different feature extractors,
references, or params of another model). A new metric row goes here.
"""

from __future__ import annotations

import dataclasses

from .cells import EMPTY, Cell, cell, fmt_macs, join, macs_unit, pm, suffix
from .inputs import INPUT_LABELS, Inputs

EV, TEV, PR, FT = "evaluation", "teacher_evaluation", "prune", "finetune"


@dataclasses.dataclass
class Row:
    metric: str
    teacher: Cell
    student: Cell
    compare: Cell
    note: str = ""

    def cells(self) -> list[Cell]:
        return [self.teacher, self.student, self.compare]


def metric_rows(inputs: Inputs, notes: list[str]) -> list[Row]:
    """Teacher vs student, each value with its source; rows with no value at all are left out."""
    rows = _size_rows(inputs, notes) + _speed_rows(inputs) + _fidelity_rows(inputs, notes)
    rows += _clip_rows(inputs, notes) + _consistency_rows(inputs) + _training_rows(inputs)
    return [r for r in rows if any(c is not EMPTY and c.sources for c in r.cells())]


def _size_rows(inputs: Inputs, notes: list[str]) -> list[Row]:
    """params and MACs: measured by `evaluate` on the final models, else counted by `prune`."""
    rows = [Row("params",
                cell(inputs, "params", (EV, "cost.teacher.params"), (PR, "params.before")),
                cell(inputs, "params", (EV, "cost.student.params"), (PR, "params.after")),
                suffix(cell(inputs, "ratio", (EV, "cost.ratios.params_student_over_teacher"),
                            (PR, "params.fraction")), " (student / teacher)"))]
    mac_values = [inputs.first((EV, f"cost.{w}.macs"), (PR, f"macs.{k}"))
                  for w, k in (("teacher", "before"), ("student", "after"))]
    known = [h[0] for h in mac_values if h is not None]
    unit = macs_unit(max(known)) if known else (1e9, "G")
    rows.append(Row("MACs (one forward, batch 1)",
                    cell(inputs, lambda v: fmt_macs(v, unit), (EV, "cost.teacher.macs"), (PR, "macs.before")),
                    cell(inputs, lambda v: fmt_macs(v, unit), (EV, "cost.student.macs"), (PR, "macs.after")),
                    join(suffix(cell(inputs, "ratio", (EV, "cost.ratios.macs_student_over_teacher"),
                                     (PR, "macs.fraction")), " (student / teacher)"),
                         suffix(cell(inputs, "x", (EV, "cost.ratios.macs_speedup_teacher_over_student")),
                                " speed-up by MACs"))))
    _check_agree(inputs, notes, "params", (EV, "cost.student.params"), (PR, "params.after"))
    _check_agree(inputs, notes, "MACs", (EV, "cost.student.macs"), (PR, "macs.after"))
    return rows


def _speed_rows(inputs: Inputs) -> list[Row]:
    lat = inputs.get(EV, "cost.latency.settings") or {}
    lat_note = ", ".join(f"{k} {lat[k]}" for k in ("device", "torch_threads", "repeats") if k in lat)
    batch = inputs.get(EV, "cost.latency.batch_size")
    if batch is not None:
        lat_note = f"batch {batch}, " + lat_note
    tp = inputs.get(EV, "cost.throughput.settings") or {}
    return [Row("forward latency (median)",
                cell(inputs, "ms", (EV, "cost.latency.teacher.median_ms")),
                cell(inputs, "ms", (EV, "cost.latency.student.median_ms")),
                suffix(cell(inputs, "x", (EV, "cost.ratios.latency_speedup")), " measured speed-up"),
                lat_note.replace("torch_threads", "threads")),
            Row("sampling throughput",
                cell(inputs, "ips", (EV, "cost.throughput.teacher.images_per_s")),
                cell(inputs, "ips", (EV, "cost.throughput.student.images_per_s")),
                suffix(cell(inputs, "x", (EV, "cost.ratios.throughput_speedup")), " measured speed-up"),
                tp.get("scheduler") or (f"{tp.get('sampler', 'ddim')} {tp['steps']} steps" if "steps" in tp else ""))]


def _fidelity_rows(inputs: Inputs, notes: list[str]) -> list[Row]:
    """FID / KID: teacher from the teacher's evaluation, student from the student's."""
    rows = []
    for key, label in (("fid", "FID"), ("kid", "KID")):
        extractors = {n: inputs.get(n, f"{key}.feature_extractor") for n in (TEV, EV)}
        names = sorted({e for e in extractors.values() if e})
        if key == "fid":
            t, s = cell(inputs, "fid", (TEV, "fid.value")), cell(inputs, "fid", (EV, "fid.value"))
        else:
            t, s = pm(inputs, "kid", TEV, "kid.mean", "kid.std"), pm(inputs, "kid", EV, "kid.mean", "kid.std")
        counts = []
        for n, who in ((TEV, "teacher"), (EV, "student")):
            ns, nr = inputs.get(n, f"{key}.num_samples"), inputs.get(n, f"{key}.num_reference")
            if ns is not None:
                counts.append(f"{who}: {ns} samples vs {nr} reference images")
        rows.append(Row(f"{label} ({' / '.join(names) or 'no feature extractor recorded'})", t, s, EMPTY,
                        "; ".join(counts)))
        if len(names) > 1:
            notes.append(f"{label}: teacher and student used different feature extractors ({', '.join(names)}); "
                         "the two values are not comparable")
        refs = {n: inputs.get(n, f"{key}.reference") for n in (TEV, EV) if inputs.get(n, f"{key}.reference")}
        if key == "fid" and len(refs) == 2 and _ref_id(refs[TEV]) != _ref_id(refs[EV]):
            notes.append(f"FID: teacher and student were measured against different references "
                         f"({_ref_id(refs[TEV])} vs {_ref_id(refs[EV])}); the values are not comparable")
    return rows


def clip_model(inputs: Inputs, name: str) -> str | None:
    """The CLIP checkpoint an evaluation scored with: `clip_score.clip_model`, else a top-level `clip_model`."""
    for path in ("clip_score.clip_model", "clip_model"):
        value = inputs.get(name, path)
        if isinstance(value, str) and value:
            return value
    return None


def _clip_rows(inputs: Inputs, notes: list[str]) -> list[Row]:
    """CLIP score (metrics/clip_score.py: {"value", "clip_model", "num_images", ...}, or a bare number)
    of each evaluation that has one; none at all: no row."""
    t, s = (cell(inputs, "clip", (n, "clip_score.value"), (n, "clip_score")) for n in (TEV, EV))
    if t is EMPTY and s is EMPTY:
        return []
    models = {n: clip_model(inputs, n) for n, c in ((TEV, t), (EV, s)) if c is not EMPTY}
    names = sorted({m for m in models.values() if m})
    if len(names) > 1:
        notes.append(f"CLIP score: teacher and student were scored with different CLIP models "
                     f"({', '.join(names)}); the two values are not comparable")
    counts = [f"{who}: {inputs.get(n, 'clip_score.num_images')} images"
              for n, who in ((TEV, "teacher"), (EV, "student")) if inputs.get(n, "clip_score.num_images")]
    return [Row(f"CLIP score ({' / '.join(names) or 'no CLIP model recorded'})", t, s, EMPTY, "; ".join(counts))]


def _consistency_rows(inputs: Inputs) -> list[Row]:
    n_pairs = inputs.get(EV, "consistency.num_pairs")
    reference = Cell("reference") if n_pairs is not None else EMPTY
    return [Row("SSIM vs teacher (same noise)", reference,
                pm(inputs, "ssim", EV, "consistency.ssim.mean", "consistency.ssim.std"), EMPTY,
                f"{n_pairs} pairs by index" if n_pairs is not None else ""),
            Row("PSNR vs teacher", reference,
                pm(inputs, "db", EV, "consistency.psnr_db.mean", "consistency.psnr_db.std", " dB"), EMPTY)]


def _training_rows(inputs: Inputs) -> list[Row]:
    planned = inputs.get("finetune_config", "steps")
    steps_note = f"of {planned} planned" if planned is not None else ""
    return [Row("fine-tune steps (logged)", EMPTY,
                cell(inputs, "int", (FT, "records.-1.step"), ("finetune_config", "steps")), EMPTY,
                steps_note if inputs.number(FT, "records.-1.step") is not None else
                ("planned (no log)" if planned is not None else ""))]


def _ref_id(ref: dict) -> str:
    if not isinstance(ref, dict):
        return str(ref)
    return str(ref.get("path") or ref.get("source") or ref.get("name") or ref.get("kind"))


def _check_agree(inputs: Inputs, notes: list[str], what: str, a: tuple[str, str], b: tuple[str, str]) -> None:
    va, vb = inputs.number(*a), inputs.number(*b)
    if va is not None and vb is not None and va != vb:
        notes.append(f"{what} of the student differ between {INPUT_LABELS[a[0]]} ({a[1]} = {va}) and "
                     f"{INPUT_LABELS[b[0]]} ({b[1]} = {vb}): the evaluated model is not the pruned one?")
