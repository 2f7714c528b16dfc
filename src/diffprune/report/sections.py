"""The report's sections, in page order after the notes: metrics, samples, loss over timesteps,
widths, training loss (settings: `settings.py`).

Each `*_section` reads `Inputs` / sample folders, writes its PNGs into the staging folder (recording
them in `written`), appends what it skipped to `notes`, and returns one `Section`. A new report
section is one more function here (or a module beside it) called from `stage.write_report`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import DiffpruneError
from ..plots import image_grid, plot_timestep_losses, save_png
from .cells import FORMATS, Cell
from .document import Image, Section, Table, ranges_text
from .figures import group_by_block, pair_samples, pairs_grid, plot_training, plot_widths, upscale_for
from .inputs import PRUNE_LOSS_PNG, Inputs, Samples, is_number
from .tables import Row

_SAMPLE_KEYS = ("version", "seed", "steps", "eta", "sampler", "spacing", "clip_sample")


def metrics_section(rows: list[Row], inputs: Inputs) -> Section:
    sec = Section("Teacher vs student")
    if not rows:
        sec.blocks.append(("note", "no metric inputs (prune report, evaluations, train log) were given"))
        return sec
    table_rows = []
    for r in rows:
        srcs = "; ".join(s for s in (c.source_text(inputs.files) for c in r.cells()) if s)
        table_rows.append([r.metric, r.teacher, r.student, r.compare, ("src", r.note), ("src", srcs)])
    sec.blocks.append(Table(["metric", "teacher", "student", "student vs teacher", "details", "source"],
                            table_rows, css="metrics"))
    sec.blocks.append("Every value is copied from the named input file and key (params in millions, MACs in "
                      "G = 1e9 or M = 1e6); the report computes no metric itself. Params/MACs come from the "
                      "evaluation when it measured the models, else from the prune report.")
    return sec


def samples_section(tmp: Path, teacher: Samples | None, student: Samples | None, num_pairs: int,
                    inputs: Inputs, notes: list[str], written: dict[str, Path]) -> Section:
    sec = Section("Samples from the same noise")
    if teacher is not None and student is not None:
        sec.blocks = _pair_blocks(tmp, teacher, student, num_pairs, inputs, notes, written)
        return sec
    for who, s in (("teacher", teacher), ("student", student)):
        if s is None:
            continue
        imgs = s.images[np.argsort(s.indices, kind="stable")][:num_pairs]
        up = upscale_for(imgs.shape[1])
        written[f"{who}_samples"] = save_png(image_grid(imgs, pad=2), tmp / f"{who}_samples.png", upscale=up)
        sec.blocks.append(Image(f"{who}_samples.png", f"{who} samples",
                                f"{who} samples, first {len(imgs)} by index", pixelated=up > 1))
    missing = [o for o, s in (("--teacher-samples", teacher), ("--student-samples", student)) if s is None]
    msg = f"side-by-side pairs skipped: {' and '.join(missing)} not given"
    notes.append(msg)
    sec.blocks.append(("note", msg))
    return sec


def _pair_blocks(tmp: Path, teacher: Samples, student: Samples, num_pairs: int, inputs: Inputs,
                 notes: list[str], written: dict[str, Path]) -> list:
    """The side-by-side grid (+ the lowest-SSIM pairs), or a note saying why there is none."""
    tc, sc = teacher.config or {}, student.config or {}
    for key in _SAMPLE_KEYS:
        if key in tc and key in sc and tc[key] != sc[key]:
            notes.append(f"samples: teacher folder has {key}={tc[key]!r}, student folder has {key}={sc[key]!r}; "
                         "pairs do not start from the same noise / schedule")
    indices, why = pair_samples(teacher, student, num_pairs)
    if why:
        notes.append(f"sample pairs skipped: {why}")
        return [("note", f"sample pairs skipped: {why}")]
    up = upscale_for(teacher.images.shape[1])
    written["samples"] = save_png(pairs_grid(teacher, student, indices), tmp / "sample_pairs.png", upscale=up)
    shown = f"{indices[0]}..{indices[-1]}" if len(indices) > 1 else str(indices[0])
    blocks = [Image("sample_pairs.png", "teacher and student samples, side by side",
                    f"each tile: teacher (left) | student (right), same image index, same "
                    f"initial noise; {len(indices)} pairs, indices {shown} in reading order"
                    + (f"; enlarged {up}x" if up > 1 else ""), pixelated=up > 1),
              _worst_pairs(inputs)]
    return [b for b in blocks if b is not None]


def _worst_pairs(inputs: Inputs) -> Table | None:
    per, idx = inputs.get("evaluation", "consistency.ssim.per_image"), inputs.get("evaluation", "consistency.indices")
    if not isinstance(per, list) or not isinstance(idx, list) or len(per) != len(idx) or not per:
        return None
    order = sorted(range(len(per)), key=lambda k: per[k] if is_number(per[k]) else math.inf)[:5]
    rows = [[str(idx[k]), Cell(FORMATS["ssim"](per[k]), [("evaluation", f"consistency.ssim.per_image.{k}")])]
            for k in order if is_number(per[k])]
    return Table(["image index", "SSIM"], rows, collapsed=f"lowest-SSIM pairs ({len(rows)} of {len(per)}, "
                 "from the student evaluation)")


def timestep_section(tmp: Path, inputs: Inputs, notes: list[str], written: dict[str, Path]) -> Section:
    sec = Section("Loss over timesteps (importance sweep)")
    imp = inputs.get("prune", "importance")
    if imp is None:
        sec.blocks.append(("note", "skipped: no prune report (--prune)"))
        return sec
    kept = ranges_text(imp.get("kept_timesteps", []))
    cut = imp.get("cut_timestep")
    cut_text = (f"cut at t = {cut} (the step that stopped the sweep, kept as in the paper's loop)"
                if cut is not None else "no cut (every timestep kept)")
    text = (f"method {imp.get('method')}, threshold {imp.get('threshold')}: kept timesteps {kept} "
            f"({imp.get('num_kept_timesteps')} timesteps), {cut_text} (from the prune report › importance).")
    sec.blocks += [_timestep_figure(tmp, imp, inputs, notes, written), text]
    return sec


def _timestep_figure(tmp: Path, imp: dict, inputs: Inputs, notes: list[str], written: dict[str, Path]):
    """The curve drawn from the prune report, else the prune folder's PNG, else a note."""
    if imp.get("losses"):
        try:
            written["timestep_losses"] = plot_timestep_losses(imp, tmp / "loss_over_timesteps.png")
        except (KeyError, TypeError, ValueError) as err:
            raise DiffpruneError(f"--prune: {inputs.files['prune']} importance summary is malformed ({err})") \
                from None
        return Image("loss_over_timesteps.png", "loss over timesteps",
                     "L_t over t from prune report › importance.losses (solid, with gradients) and "
                     "tail_losses (dashed, forward only); kept range shaded")
    png = inputs.files["prune"].parent / PRUNE_LOSS_PNG
    if png.is_file():
        (tmp / PRUNE_LOSS_PNG).write_bytes(png.read_bytes())
        written["timestep_losses"] = tmp / PRUNE_LOSS_PNG
        return Image(PRUNE_LOSS_PNG, "loss over timesteps", f"copied from {png}")
    msg = f"loss-over-timestep curve skipped: method {imp.get('method')!r} evaluates no per-timestep loss"
    notes.append(msg)
    return ("note", msg)


def widths_section(tmp: Path, inputs: Inputs, notes: list[str], written: dict[str, Path]) -> Section:
    sec = Section("Layer widths before and after pruning")
    before, after = inputs.get("prune", "widths.before"), inputs.get("prune", "widths.after")
    if not isinstance(before, dict) or not isinstance(after, dict) or not before:
        msg = ("widths chart skipped: " + ("no prune report (--prune)" if "prune" not in inputs.data else
                                           "the prune report has no widths"))
        if "prune" in inputs.data:
            notes.append(msg)
        sec.blocks.append(("note", msg))
        return sec
    before = {k: v for k, v in before.items() if is_number(v)}
    after = {k: v for k, v in after.items() if is_number(v)}
    written["widths"], how = plot_widths(before, after, tmp / "widths.png")
    sec.blocks.append(Image("widths.png", "layer widths before and after", f"{how}; from prune report › widths"))
    groups = group_by_block([n for n in before if n in after])
    rows = [[block, str(len(names)), str(sum(before[n] for n in names)), str(sum(after[n] for n in names))]
            for block, names in groups.items()]
    sec.blocks.append(Table(["block", "layers", "channels before (sum)", "channels after (sum)"], rows))
    layer_rows = [[n, str(before[n]), str(after[n])] for ns in groups.values() for n in ns]
    sec.blocks.append(Table(["layer", "before", "after"], layer_rows,
                            collapsed=f"per-layer widths ({len(layer_rows)} layers, prune report › widths)"))
    allocation = allocation_table(inputs.get("prune", "allocation"))
    if allocation is not None:
        sec.blocks += allocation
    return sec


def allocation_table(allocation) -> list | None:
    """How the budget was spread (prune report › allocation): a line, then kept/total per ranked group."""
    if not isinstance(allocation, dict) or not isinstance(allocation.get("groups"), list):
        return None  # reports written before issue 16 part 3
    rows = [g for g in allocation["groups"] if isinstance(g, dict) and is_number(g.get("kept"))
            and is_number(g.get("total")) and g["total"] > 0]
    cap = allocation.get("max_group_ratio")
    kept = [g["kept"] / g["total"] for g in rows]
    line = (f"Allocation {allocation.get('mode')!r}" + (f" (each group loses at most {cap:.0%})" if is_number(cap)
                                                         else " (every group pruned by the same ratio)")
            + (f": kept fraction per ranked group {min(kept):.2f} to {max(kept):.2f}, median "
               f"{float(np.median(kept)):.2f}" if kept else "") + " (prune report › allocation).")
    table = Table(["group (first layer)", "kept / total", "kept"],
                  [[str(g.get("layer")), f"{g['kept']} / {g['total']}", f"{g['kept'] / g['total']:.0%}"]
                   for g in rows], collapsed=f"kept width per ranked channel group ({len(rows)} groups)")
    return [line, table]


def training_section(tmp: Path, log: dict | None, given: dict, written: dict[str, Path]) -> Section:
    sec = Section("Training loss")
    if "finetune" not in given:
        sec.blocks.append(("note", "skipped: no finetune/train folder (--finetune)"))
    elif log is None or not log.get("records"):
        sec.blocks.append(("note", "skipped: no train_log.json records (see notes)"))
    else:
        written["training"], how = plot_training(log, tmp / "training_loss.png")
        sec.blocks.append(Image("training_loss.png", "training loss", f"{how}; from train log › records"))
    return sec
