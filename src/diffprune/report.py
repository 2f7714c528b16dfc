"""The report stage: one self-contained HTML page (and a Markdown twin) from the other stages' files.

Reads whatever it is given, skipping (with a visible note) whatever it is not:

- a prune folder (`prune_report.json`, `loss_over_timesteps.png`; prune_job.py),
- a finetune/train folder (`train_log.json`, `finetune_config.json` / `train_config.json`; training.py),
- the student's evaluation JSON and the teacher's (format "diffprune-evaluation"; evaluation.py),
- the teacher's and the student's sample folders (`samples.npz`; sampling.py), paired by index.

It writes `report.html` (every image embedded as a base64 PNG data URI, inline CSS, no scripts, no
external resources), `report.md` (the same content, referencing the PNGs written beside it), the PNGs,
and `report_data.json` (the metric table with the source of every value).

Rule for numbers: every number shown is read from an input file and names where it came from (input
and JSON key path, e.g. `evaluation › cost.ratios.latency_speedup`); the report computes none of the
metrics itself, it only formats them (params in M, MACs in G or M, latency in ms).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DiffpruneError, check_range
from .fsutil import atomic_dir, check_output_dir, check_output_location, read_json, write_json_atomic

DEFAULT_TITLE = "Diff-Pruning report"
DEFAULT_NUM_PAIRS = 32
HTML_FILE = "report.html"
MD_FILE = "report.md"
DATA_FILE = "report_data.json"  # also the marker that `report` wrote a folder (fsutil.marker_file)
STAGE = "report"
EVALUATION_FORMAT = "diffprune-evaluation"
EVALUATION_VERSION = 1
PRUNE_REPORT = "prune_report.json"
PRUNE_LOSS_PNG = "loss_over_timesteps.png"
TRAIN_LOG = "train_log.json"
TRAIN_CONFIGS = ("finetune_config.json", "train_config.json")
SAMPLES_NPZ = "samples.npz"
SAMPLE_CONFIG = "sample_config.json"
# Per-layer width bars are drawn up to this many layers; beyond it, one bar pair per block.
MAX_LAYER_BARS = 200

# Human names of the inputs, used in every "source" cell.
INPUT_LABELS = {
    "prune": "prune report",
    "finetune": "train log",
    "finetune_config": "finetune config",
    "evaluation": "student evaluation",
    "teacher_evaluation": "teacher evaluation",
}


# --------------------------------------------------------------------------- reading inputs


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DiffpruneError(f"{what}: {path} does not exist" if not path.exists() else
                             f"{what}: {path} is not a file")
    data = read_json(path, f"{what}:", expect=None)
    if not isinstance(data, dict):
        raise DiffpruneError(f"{what}: {path} holds a JSON {type(data).__name__}, not a diffprune result object")
    return data


def _existing_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DiffpruneError(f"{what}: {p} does not exist")
    if not p.is_dir():
        raise DiffpruneError(f"{what}: {p} is a file; give the folder the stage wrote")
    return p


def load_prune(path: str | Path) -> tuple[dict[str, Any], Path]:
    """prune_report.json of a prune folder (or the JSON itself); refuses anything else."""
    p = Path(path)
    file = p if p.is_file() else _existing_dir(p, "--prune") / PRUNE_REPORT
    if not file.exists():
        raise DiffpruneError(f"--prune: {p} has no {PRUNE_REPORT}; is it a folder written by `diffprune prune`?")
    data = _read_json(file, "--prune")
    missing = [k for k in ("params", "macs", "importance") if k not in data]
    if missing or not isinstance(data.get("params"), dict) or not isinstance(data.get("importance"), dict):
        raise DiffpruneError(f"--prune: {file} is not a diffprune prune report (missing {missing or 'fields'})")
    return data, file


def load_training(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str], dict]:
    """(train_log, stage config, notes, files) of a finetune/train folder; either part may be missing.

    A folder with neither train_log.json nor a finetune/train config is refused.
    """
    folder = _existing_dir(path, "--finetune")
    notes: list[str] = []
    files: dict[str, Path] = {}
    config = None
    for name in TRAIN_CONFIGS:
        if (folder / name).is_file():
            config = _read_json(folder / name, "--finetune")
            if config.get("stage") not in ("finetune", "train"):
                raise DiffpruneError(f"--finetune: {folder / name} is not a finetune/train config "
                                     f"(stage={config.get('stage')!r})")
            files["finetune_config"] = folder / name
            break
    log = None
    if (folder / TRAIN_LOG).is_file():
        log = _read_json(folder / TRAIN_LOG, "--finetune")
        if not isinstance(log.get("records"), list) or not all(
                isinstance(r, dict) and "step" in r and "loss" in r for r in log["records"]):
            raise DiffpruneError(f"--finetune: {folder / TRAIN_LOG} is not a diffprune train log "
                                 "(needs 'records' with 'step' and 'loss')")
        files["finetune"] = folder / TRAIN_LOG
    if log is None and config is None:
        raise DiffpruneError(f"--finetune: {folder} has neither {TRAIN_LOG} nor {' / '.join(TRAIN_CONFIGS)}; "
                             "is it a folder written by `diffprune finetune` or `diffprune train`?")
    if log is None:
        notes.append(f"training loss curve skipped: {folder / TRAIN_LOG} is missing "
                     "(the run wrote no log yet)")
    elif not log["records"]:
        notes.append(f"training loss curve skipped: {folder / TRAIN_LOG} has no records yet")
    return log, config, notes, files


def load_evaluation(path: str | Path, option: str) -> tuple[dict[str, Any], Path]:
    """An evaluation JSON (or a folder holding evaluation.json); refuses anything else."""
    p = Path(path)
    if p.is_dir():
        p = p / "evaluation.json"
        if not p.exists():
            raise DiffpruneError(f"{option}: {path} is a folder without evaluation.json; give the JSON file")
    data = _read_json(p, option)
    if data.get("format") != EVALUATION_FORMAT:
        raise DiffpruneError(f"{option}: {p} is not a diffprune evaluation (format={data.get('format')!r}, "
                             f"expected {EVALUATION_FORMAT!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version > EVALUATION_VERSION:
        raise DiffpruneError(f"{option}: {p} has format_version={version!r}; this diffprune reads "
                             f"versions <= {EVALUATION_VERSION}")
    return data, p


@dataclasses.dataclass
class Samples:
    images: np.ndarray  # uint8 NHWC
    indices: np.ndarray  # int, one per image
    folder: Path
    config: dict[str, Any] | None


def load_samples(path: str | Path, option: str) -> Samples:
    """A sample folder's samples.npz (uint8 NHWC images + indices) and sample_config.json if present."""
    folder = _existing_dir(path, option)
    npz = folder / SAMPLES_NPZ
    if not npz.is_file():
        raise DiffpruneError(f"{option}: {folder} has no {SAMPLES_NPZ}; is it a finished `diffprune sample` folder?")
    try:
        with np.load(npz, allow_pickle=False) as data:
            images, indices = data["images"], data["indices"]
    except (OSError, ValueError, KeyError) as err:
        raise DiffpruneError(f"{option}: {npz} is not a diffprune samples file ({err})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise DiffpruneError(f"{option}: {npz} 'images' must be uint8 (N, H, W, C) with C in 1, 3, 4; "
                             f"got {images.dtype} {images.shape}")
    if indices.ndim != 1 or len(indices) != len(images):
        raise DiffpruneError(f"{option}: {npz} has {len(images)} images but indices of shape {indices.shape}")
    config = None
    if (folder / SAMPLE_CONFIG).is_file():
        config = _read_json(folder / SAMPLE_CONFIG, option)
    return Samples(images, indices.astype(np.int64), folder, config)


# --------------------------------------------------------------------------- values with sources


def lookup(data: Any, path: str) -> Any:
    """Value at a dotted key path ('cost.ratios.latency_speedup', 'records.-1.step'); None if absent."""
    cur = data
    for key in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(key)
        elif isinstance(cur, list):
            try:
                cur = cur[int(key)]
            except (ValueError, IndexError):
                return None
        else:
            return None
        if cur is None:
            return None
    return cur


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass
class Cell:
    """Text of one table cell; `sources` are the (input, key path) of each number in it, in order."""

    text: str
    sources: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def source_text(self, files: dict[str, Path]) -> str:
        return "; ".join(f"{_input_name(i, files)} › {p}" for i, p in self.sources)


def _input_name(name: str, files: dict[str, Path]) -> str:
    label = INPUT_LABELS.get(name, name)
    return f"{label} ({files[name].name})" if name in files else label


EMPTY = Cell("—")


class Inputs:
    """The loaded JSON inputs by name; `value(name, path)` is the only way numbers enter the report."""

    def __init__(self):
        self.data: dict[str, dict] = {}
        self.files: dict[str, Path] = {}

    def get(self, name: str, path: str) -> Any:
        return lookup(self.data[name], path) if name in self.data else None

    def number(self, name: str, path: str) -> float | None:
        v = self.get(name, path)
        return v if _is_number(v) else None

    def first(self, *candidates: tuple[str, str]) -> tuple[float, str, str] | None:
        """The first (value, input, path) among candidates that holds a finite number."""
        for name, path in candidates:
            v = self.number(name, path)
            if v is not None:
                return v, name, path
        return None


def fmt_params(v: float) -> str:
    return f"{v / 1e6:.3f}M"


def macs_unit(v: float) -> tuple[float, str]:
    return (1e9, "G") if abs(v) >= 1e9 else (1e6, "M")


def fmt_macs(v: float, unit: tuple[float, str]) -> str:
    return f"{v / unit[0]:.3f}{unit[1]}"


FORMATS = {
    "params": fmt_params,
    "ms": lambda v: f"{v:.2f} ms",
    "x": lambda v: f"×{v:.2f}",
    "ratio": lambda v: f"{v:.3f}",
    "fid": lambda v: f"{v:.3f}",
    "kid": lambda v: f"{v:.5f}",
    "ssim": lambda v: f"{v:.4f}",
    "db": lambda v: f"{v:.2f}",
    "ips": lambda v: f"{v:.2f} img/s",
    "int": lambda v: f"{int(v)}",
    "s": lambda v: f"{v:.1f} s",
}


def _cell(inputs: Inputs, kind, *candidates: tuple[str, str]) -> Cell:
    """One number, from the first candidate that has it, formatted by `kind` (a FORMATS key or callable)."""
    hit = inputs.first(*candidates)
    if hit is None:
        return EMPTY
    v, name, path = hit
    fmt = FORMATS[kind] if isinstance(kind, str) else kind
    return Cell(fmt(v), [(name, path)])


def _pm(inputs: Inputs, kind: str, name: str, mean: str, std: str, unit: str = "") -> Cell:
    """'mean ± std' (+ unit once at the end)."""
    m, s = inputs.number(name, mean), inputs.number(name, std)
    if m is None:
        return EMPTY
    fmt = FORMATS[kind]
    if s is None:
        return Cell(fmt(m) + unit, [(name, mean)])
    return Cell(f"{fmt(m)} ± {fmt(s)}{unit}", [(name, mean), (name, std)])


def _join(*cells: Cell, sep: str = "; ") -> Cell:
    cells = [c for c in cells if c is not EMPTY]
    if not cells:
        return EMPTY
    return Cell(sep.join(c.text for c in cells), [s for c in cells for s in c.sources])


def _suffix(cell: Cell, text: str) -> Cell:
    return cell if cell is EMPTY else Cell(cell.text + text, cell.sources)


# --------------------------------------------------------------------------- the metric table


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
    rows: list[Row] = []
    ev, tev, pr, ft = "evaluation", "teacher_evaluation", "prune", "finetune"

    # params and MACs: measured by `evaluate` on the final models, else counted by `prune`.
    rows.append(Row("params",
                    _cell(inputs, "params", (ev, "cost.teacher.params"), (pr, "params.before")),
                    _cell(inputs, "params", (ev, "cost.student.params"), (pr, "params.after")),
                    _suffix(_cell(inputs, "ratio", (ev, "cost.ratios.params_student_over_teacher"),
                                  (pr, "params.fraction")), " (student / teacher)")))
    mac_values = [inputs.first((ev, f"cost.{w}.macs"), (pr, f"macs.{k}"))
                  for w, k in (("teacher", "before"), ("student", "after"))]
    known = [h[0] for h in mac_values if h is not None]
    unit = macs_unit(max(known)) if known else (1e9, "G")
    rows.append(Row("MACs (one forward, batch 1)",
                    _cell(inputs, lambda v: fmt_macs(v, unit), (ev, "cost.teacher.macs"), (pr, "macs.before")),
                    _cell(inputs, lambda v: fmt_macs(v, unit), (ev, "cost.student.macs"), (pr, "macs.after")),
                    _join(_suffix(_cell(inputs, "ratio", (ev, "cost.ratios.macs_student_over_teacher"),
                                        (pr, "macs.fraction")), " (student / teacher)"),
                          _suffix(_cell(inputs, "x", (ev, "cost.ratios.macs_speedup_teacher_over_student")),
                                  " speed-up by MACs"))))
    _check_agree(inputs, notes, "params", (ev, "cost.student.params"), (pr, "params.after"))
    _check_agree(inputs, notes, "MACs", (ev, "cost.student.macs"), (pr, "macs.after"))

    lat = inputs.get(ev, "cost.latency.settings") or {}
    lat_note = ", ".join(f"{k} {lat[k]}" for k in ("device", "torch_threads", "repeats") if k in lat)
    batch = inputs.get(ev, "cost.latency.batch_size")
    if batch is not None:
        lat_note = f"batch {batch}, " + lat_note
    rows.append(Row("forward latency (median)",
                    _cell(inputs, "ms", (ev, "cost.latency.teacher.median_ms")),
                    _cell(inputs, "ms", (ev, "cost.latency.student.median_ms")),
                    _suffix(_cell(inputs, "x", (ev, "cost.ratios.latency_speedup")), " measured speed-up"),
                    lat_note.replace("torch_threads", "threads")))
    tp = inputs.get(ev, "cost.throughput.settings") or {}
    rows.append(Row("sampling throughput",
                    _cell(inputs, "ips", (ev, "cost.throughput.teacher.images_per_s")),
                    _cell(inputs, "ips", (ev, "cost.throughput.student.images_per_s")),
                    _suffix(_cell(inputs, "x", (ev, "cost.ratios.throughput_speedup")), " measured speed-up"),
                    f"{tp.get('sampler', 'ddim')} {tp['steps']} steps" if "steps" in tp else ""))

    # FID / KID: teacher from the teacher's evaluation, student from the student's.
    for key, label in (("fid", "FID"), ("kid", "KID")):
        extractors = {n: inputs.get(n, f"{key}.feature_extractor") for n in (tev, ev)}
        names = sorted({e for e in extractors.values() if e})
        if key == "fid":
            t, s = _cell(inputs, "fid", (tev, "fid.value")), _cell(inputs, "fid", (ev, "fid.value"))
        else:
            t, s = _pm(inputs, "kid", tev, "kid.mean", "kid.std"), _pm(inputs, "kid", ev, "kid.mean", "kid.std")
        counts = []
        for n, who in ((tev, "teacher"), (ev, "student")):
            ns, nr = inputs.get(n, f"{key}.num_samples"), inputs.get(n, f"{key}.num_reference")
            if ns is not None:
                counts.append(f"{who}: {ns} samples vs {nr} reference images")
        rows.append(Row(f"{label} ({' / '.join(names) or 'no feature extractor recorded'})", t, s, EMPTY,
                        "; ".join(counts)))
        if len(names) > 1:
            notes.append(f"{label}: teacher and student used different feature extractors ({', '.join(names)}); "
                         "the two values are not comparable")
        refs = {n: inputs.get(n, f"{key}.reference") for n in (tev, ev) if inputs.get(n, f"{key}.reference")}
        if key == "fid" and len(refs) == 2 and _ref_id(refs[tev]) != _ref_id(refs[ev]):
            notes.append(f"FID: teacher and student were measured against different references "
                         f"({_ref_id(refs[tev])} vs {_ref_id(refs[ev])}); the values are not comparable")

    n_pairs = inputs.get(ev, "consistency.num_pairs")
    rows.append(Row("SSIM vs teacher (same noise)", Cell("reference") if n_pairs is not None else EMPTY,
                    _pm(inputs, "ssim", ev, "consistency.ssim.mean", "consistency.ssim.std"), EMPTY,
                    f"{n_pairs} pairs by index" if n_pairs is not None else ""))
    rows.append(Row("PSNR vs teacher", Cell("reference") if n_pairs is not None else EMPTY,
                    _pm(inputs, "db", ev, "consistency.psnr_db.mean", "consistency.psnr_db.std",
                        " dB"), EMPTY))

    steps_note = ""
    planned = inputs.get("finetune_config", "steps")
    if planned is not None:
        steps_note = f"of {planned} planned"
    rows.append(Row("fine-tune steps (logged)", EMPTY,
                    _cell(inputs, "int", (ft, "records.-1.step"), ("finetune_config", "steps")), EMPTY,
                    steps_note if inputs.number(ft, "records.-1.step") is not None else
                    ("planned (no log)" if planned is not None else "")))
    return [r for r in rows if any(c is not EMPTY and c.sources for c in r.cells())]


def _ref_id(ref: dict) -> str:
    if not isinstance(ref, dict):
        return str(ref)
    return str(ref.get("path") or ref.get("source") or ref.get("name") or ref.get("kind"))


def _check_agree(inputs: Inputs, notes: list[str], what: str, a: tuple[str, str], b: tuple[str, str]) -> None:
    va, vb = inputs.number(*a), inputs.number(*b)
    if va is not None and vb is not None and va != vb:
        notes.append(f"{what} of the student differ between {INPUT_LABELS[a[0]]} ({a[1]} = {va}) and "
                     f"{INPUT_LABELS[b[0]]} ({b[1]} = {vb}): the evaluated model is not the pruned one?")


# --------------------------------------------------------------------------- pictures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _upscale_for(h: int) -> int:
    return max(1, 64 // max(h, 1))


def _as_rgb(images: np.ndarray) -> np.ndarray:
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    return images[..., :3]


def pair_samples(teacher: Samples, student: Samples, num_pairs: int) -> tuple[list[int], str | None]:
    """Indices present in both folders (sorted, at most num_pairs), or ([], why not)."""
    if teacher.images.shape[1:3] != student.images.shape[1:3]:
        return [], (f"teacher images are {teacher.images.shape[1]}x{teacher.images.shape[2]} but student "
                    f"images are {student.images.shape[1]}x{student.images.shape[2]}; they cannot pair")
    common = sorted(set(teacher.indices.tolist()) & set(student.indices.tolist()))
    if not common:
        return [], "the teacher and student sample folders share no image index"
    return common[:num_pairs], None


def pairs_grid(teacher: Samples, student: Samples, indices: Sequence[int]) -> np.ndarray:
    """uint8 grid of tiles [teacher i | student i], tiles row-major in index order."""
    from .plots import image_grid

    t_pos = {int(i): k for k, i in enumerate(teacher.indices)}
    s_pos = {int(i): k for k, i in enumerate(student.indices)}
    same_c = teacher.images.shape[-1] == student.images.shape[-1]
    t_img = teacher.images if same_c else _as_rgb(teacher.images)
    s_img = student.images if same_c else _as_rgb(student.images)
    h, w, c = t_img.shape[1:]
    tiles = np.full((len(indices), h, 2 * w + 1, c), 255, dtype=np.uint8)
    for k, i in enumerate(indices):
        tiles[k, :, :w] = t_img[t_pos[i]]
        tiles[k, :, w + 1:] = s_img[s_pos[i]]
    per_row = max(1, min(8, len(indices), 1024 // (2 * w + 1)))
    return image_grid(tiles, ncols=per_row, pad=max(3, w // 8))


def plot_widths(before: dict[str, int], after: dict[str, int], path: Path) -> tuple[Path, str]:
    """Horizontal bars per layer (or per block for big models): width before (light) and after."""
    plt = _pyplot()
    names = [n for n in before if n in after]
    per_block = len(names) > MAX_LAYER_BARS
    if per_block:
        groups = group_by_block(names)
        labels = list(groups)
        b = [sum(before[n] for n in groups[g]) for g in labels]
        a = [sum(after[n] for n in groups[g]) for g in labels]
        colors = [f"C{k % 10}" for k in range(len(labels))]
        how = (f"summed output widths per block ({len(names)} layers is more than {MAX_LAYER_BARS} "
               "bars; the per-layer table is below)")
    else:
        grouped = group_by_block(names)
        names = [n for ns in grouped.values() for n in ns]
        labels, b, a = names, [before[n] for n in names], [after[n] for n in names]
        block_of = {n: g for g, ns in grouped.items() for n in ns}
        order = list(grouped)
        colors = [f"C{order.index(block_of[n]) % 10}" for n in names]
        how = "output width of each layer (conv/linear out, norm channels), coloured by block"
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.13 * len(labels) + 1.0)), dpi=90)
    y = np.arange(len(labels))
    ax.barh(y, b, color="#d9d9d9", label="before", height=0.85)
    ax.barh(y, a, color=colors, height=0.55, label="after")
    ax.set_yticks(y, labels, fontsize=max(4, min(8, 900 // max(len(labels), 1))))
    ax.invert_yaxis()
    ax.set_xlabel("channels" + (" (sum over the block)" if per_block else ""))
    ax.set_title("widths before (grey) and after pruning (colour)", fontsize=9)
    ax.margins(y=0.005)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path), how


def group_by_block(names: Sequence[str]) -> dict[str, list[str]]:
    """'down_blocks.1.resnets.0.conv1' -> 'down_blocks.1'; 'mid_block.x' -> 'mid_block'; else first part."""
    groups: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]
        groups.setdefault(key, []).append(n)
    return dict(sorted(groups.items(), key=lambda kv: _BLOCK_ORDER.get(kv[0].split(".")[0], 0)))


# Data-flow order of a UNet (diffusers registers mid_block after up_blocks); other names keep their place.
_BLOCK_ORDER = {"down_blocks": 1, "mid_block": 2, "up_blocks": 3, "conv_norm_out": 4, "conv_act": 4, "conv_out": 4}


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over `window` records (fewer at the start)."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    k = np.arange(1, len(v) + 1)
    lo = np.maximum(k - window, 0)
    return (c[k] - c[lo]) / (k - lo)


def plot_training(log: dict, path: Path) -> tuple[Path, str]:
    plt = _pyplot()
    recs = [r for r in log["records"] if _is_number(r.get("step")) and _is_number(r.get("loss"))]
    steps = np.array([r["step"] for r in recs], dtype=float)
    loss = np.array([r["loss"] for r in recs], dtype=float)
    window = max(1, round(len(recs) / 20))
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=120)
    ax.plot(steps, loss, color="C0", lw=0.8, alpha=0.35, marker="." if len(recs) < 30 else None,
            label="loss (raw records)")
    if window > 1:
        ax.plot(steps, smooth(loss, window), color="C0", lw=1.6, label=f"loss, moving average of {window}")
    for k, key in enumerate(("loss_task", "loss_output_kd", "loss_feature_kd")):
        vals = [r.get(key) for r in recs]
        if all(_is_number(v) for v in vals) and key in recs[-1] and any(vals):
            if key == "loss_task" and np.allclose(vals, loss):
                continue
            ax.plot(steps, smooth(vals, window), color=f"C{k + 1}", lw=1.0, label=f"{key} (smoothed)")
    if np.all(loss > 0):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{log.get('stage', 'training')}: loss per logged record", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    every = log.get("log_every")
    how = (f"each record is the mean loss over {every} optimizer steps" if every else "one point per record")
    smoothing = (f"thick line: trailing moving average over {window} records" if window > 1 else
                 "not smoothed (fewer than 30 records)")
    return Path(path), f"{how}; {smoothing}"


# --------------------------------------------------------------------------- document model


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list[Cell | str]]
    css: str = ""
    collapsed: str | None = None  # summary line of a <details> block


@dataclasses.dataclass
class Image:
    file: str
    alt: str
    caption: str
    pixelated: bool = False


@dataclasses.dataclass
class Section:
    title: str
    blocks: list = dataclasses.field(default_factory=list)  # str (paragraph) | ("note", str) | Table | Image


def _settings_table(items: list[tuple[str, Any]]) -> Table:
    rows = []
    for k, v in items:
        if v is None:
            continue
        if isinstance(v, list | dict):
            v = json.dumps(v, separators=(", ", ": "))
        rows.append([k, str(v)])
    return Table(["setting", "value"], rows, css="kv")


def _seconds(times) -> str | None:
    """{'importance': 42.59, 'prune': 20.49} -> 'importance 42.6 s, prune 20.5 s'."""
    if not isinstance(times, dict):
        return None if times is None else str(times)
    return ", ".join(f"{k} {FORMATS['s'](v)}" if _is_number(v) else f"{k} {v}" for k, v in times.items())


def _ranges_text(ranges) -> str:
    try:
        return ", ".join(f"[{int(a)}, {int(b)})" for a, b in ranges) or "none"
    except (TypeError, ValueError):
        return str(ranges)


# --------------------------------------------------------------------------- rendering


_CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;
vertical-align:top}th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:
tabular-nums;white-space:nowrap}td.src{color:#666;font-size:12px}table.kv td:first-child{color:#555}
.note{background:#fff7e0;border-left:4px solid #f0b400;padding:4px 10px;margin:.4em 0}
figure{margin:.8em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
img.px{image-rendering:pixelated}figcaption{color:#555;font-size:12.5px;margin-top:.3em}
code{background:#f4f4f4;padding:0 3px}details{margin:.5em 0}summary{cursor:pointer;color:#345}
""".strip()


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_html(title: str, sections: list[Section], folder: Path, files: dict[str, Path]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_h(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{_h(title)}</h1>"]
    for sec in sections:
        out.append(f"<h2>{_h(sec.title)}</h2>")
        for block in sec.blocks:
            if isinstance(block, str):
                out.append(f"<p>{_h(block)}</p>")
            elif isinstance(block, tuple) and block[0] == "note":
                out.append(f'<p class="note">{_h(block[1])}</p>')
            elif isinstance(block, Table):
                out.append(_html_table(block, files))
            elif isinstance(block, Image):
                data = base64.b64encode((folder / block.file).read_bytes()).decode("ascii")
                cls = ' class="px"' if block.pixelated else ""
                out.append(f'<figure><img{cls} src="data:image/png;base64,{data}" alt="{_h(block.alt)}">'
                           f"<figcaption>{_h(block.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_table(t: Table, files: dict[str, Path]) -> str:
    cls = f' class="{t.css}"' if t.css else ""
    lines = [f"<table{cls}><thead><tr>" + "".join(f"<th>{_h(h)}</th>" for h in t.header) + "</tr></thead><tbody>"]
    for row in t.rows:
        tds = []
        for c in row:
            if isinstance(c, Cell):
                src = " ".join(f"{i}:{p}" for i, p in c.sources)
                attr = f' data-src="{_h(src)}"' if src else ""
                tds.append(f'<td class="num"{attr}>{_h(c.text)}</td>')
            elif isinstance(c, tuple) and c[0] == "src":
                tds.append(f'<td class="src">{_h(c[1])}</td>')
            else:
                tds.append(f"<td>{_h(c)}</td>")
        lines.append("<tr>" + "".join(tds) + "</tr>")
    lines.append("</tbody></table>")
    body = "\n".join(lines)
    if t.collapsed:
        return f"<details><summary>{_h(t.collapsed)}</summary>\n{body}\n</details>"
    return body


def render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for block in sec.blocks:
            if isinstance(block, str):
                out += [block, ""]
            elif isinstance(block, tuple) and block[0] == "note":
                out += [f"> **Note:** {block[1]}", ""]
            elif isinstance(block, Table):
                if block.collapsed:
                    out += [f"*{block.collapsed}*", ""]
                out.append("| " + " | ".join(_md(h) for h in block.header) + " |")
                out.append("|" + "|".join("---" for _ in block.header) + "|")
                for row in block.rows:
                    cells = [c.text if isinstance(c, Cell) else (c[1] if isinstance(c, tuple) else c) for c in row]
                    out.append("| " + " | ".join(_md(c) for c in cells) + " |")
                out.append("")
            elif isinstance(block, Image):
                out += [f"![{block.alt}]({block.file})", "", f"*{block.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- the stage


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

    inputs, notes = Inputs(), []
    train_log = train_config = None
    if prune is not None:
        inputs.data["prune"], inputs.files["prune"] = load_prune(prune)
    if finetune is not None:
        train_log, train_config, more, files = load_training(finetune)
        notes += more
        inputs.files.update(files)
        if train_log is not None:
            inputs.data["finetune"] = train_log
        if train_config is not None:
            inputs.data["finetune_config"] = train_config
    if evaluation is not None:
        inputs.data["evaluation"], inputs.files["evaluation"] = load_evaluation(evaluation, "--evaluation")
    if teacher_evaluation is not None:
        inputs.data["teacher_evaluation"], inputs.files["teacher_evaluation"] = load_evaluation(
            teacher_evaluation, "--teacher-evaluation")
    t_samples = load_samples(teacher_samples, "--teacher-samples") if teacher_samples is not None else None
    s_samples = load_samples(student_samples, "--student-samples") if student_samples is not None else None

    for name, option in (("prune", "--prune"), ("finetune", "--finetune"), ("evaluation", "--evaluation"),
                         ("teacher_evaluation", "--teacher-evaluation")):
        if name not in given:
            notes.append(f"{option} not given: {_SKIPPED[name]}")
    for name, warns in (("evaluation", inputs.get("evaluation", "warnings")),
                        ("teacher_evaluation", inputs.get("teacher_evaluation", "warnings"))):
        for w in warns or []:
            notes.append(f"{INPUT_LABELS[name]} warning: {w}")

    written: dict[str, Path] = {}
    with atomic_dir(output_dir, overwrite, STAGE) as tmp:
        sections = []
        rows = metric_rows(inputs, notes)
        sections.append(_metrics_section(rows, inputs))
        sections.append(_samples_section(tmp, t_samples, s_samples, num_pairs, inputs, notes, written))
        sections.append(_timestep_section(tmp, inputs, notes, written))
        sections.append(_widths_section(tmp, inputs, notes, written))
        sections.append(_training_section(tmp, train_log, given, notes, written))
        sections.append(_settings_section(inputs, t_samples, s_samples, given))
        sections.insert(0, Section("Notes", [("note", n) for n in notes] or ["nothing was skipped"]))
        (tmp / HTML_FILE).write_text(render_html(title, sections, tmp, inputs.files))
        (tmp / MD_FILE).write_text(render_markdown(title, sections))
        write_json_atomic(tmp / DATA_FILE, {
            "format": "diffprune-report", "format_version": 1, "stage": STAGE, "title": title,
            "inputs": {k: str(Path(v).absolute()) for k, v in given.items()},
            "metrics": [{"metric": r.metric, "note": r.note, **{
                col: {"text": c.text, "sources": [f"{i}:{p}" for i, p in c.sources],
                      "values": [inputs.get(i, p) for i, p in c.sources]}
                for col, c in zip(("teacher", "student", "compare"), r.cells(), strict=True)}} for r in rows],
            "notes": notes,
        })
    final = Path(output_dir).absolute()
    out = {"html": final / HTML_FILE, "markdown": final / MD_FILE, "data": final / DATA_FILE}
    out.update({k: final / v.name for k, v in written.items()})
    return out


_SKIPPED = {
    "prune": "no pruning settings, loss-over-timestep curve or per-layer widths",
    "finetune": "no training loss curve or fine-tune step count",
    "evaluation": "no measured params/MACs, latency, student FID/KID or SSIM",
    "teacher_evaluation": "no teacher FID/KID",
}


def _metrics_section(rows: list[Row], inputs: Inputs) -> Section:
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


def _samples_section(tmp: Path, teacher: Samples | None, student: Samples | None, num_pairs: int,
                     inputs: Inputs, notes: list[str], written: dict[str, Path]) -> Section:
    from .plots import save_png

    sec = Section("Samples from the same noise")
    if teacher is not None and student is not None:
        tc, sc = teacher.config or {}, student.config or {}
        for key in ("version", "seed", "steps", "eta", "sampler", "spacing", "clip_sample"):
            if key in tc and key in sc and tc[key] != sc[key]:
                notes.append(f"samples: teacher folder has {key}={tc[key]!r}, student folder has {key}={sc[key]!r}; "
                             "pairs do not start from the same noise / schedule")
        indices, why = pair_samples(teacher, student, num_pairs)
        if why:
            notes.append(f"sample pairs skipped: {why}")
            sec.blocks.append(("note", f"sample pairs skipped: {why}"))
        else:
            grid = pairs_grid(teacher, student, indices)
            up = _upscale_for(teacher.images.shape[1])
            written["samples"] = save_png(grid, tmp / "sample_pairs.png", upscale=up)
            shown = f"{indices[0]}..{indices[-1]}" if len(indices) > 1 else str(indices[0])
            sec.blocks.append(Image("sample_pairs.png", "teacher and student samples, side by side",
                                    f"each tile: teacher (left) | student (right), same image index, same "
                                    f"initial noise; {len(indices)} pairs, indices {shown} in reading order"
                                    + (f"; enlarged {up}x" if up > 1 else ""), pixelated=up > 1))
            sec.blocks.append(_worst_pairs(inputs))
            sec.blocks = [b for b in sec.blocks if b is not None]
        return sec
    for who, s in (("teacher", teacher), ("student", student)):
        if s is None:
            continue
        from .plots import image_grid

        imgs = s.images[np.argsort(s.indices, kind="stable")][:num_pairs]
        up = _upscale_for(imgs.shape[1])
        written[f"{who}_samples"] = save_png(image_grid(imgs, pad=2), tmp / f"{who}_samples.png", upscale=up)
        sec.blocks.append(Image(f"{who}_samples.png", f"{who} samples",
                                f"{who} samples, first {len(imgs)} by index", pixelated=up > 1))
    missing = [o for o, s in (("--teacher-samples", teacher), ("--student-samples", student)) if s is None]
    msg = f"side-by-side pairs skipped: {' and '.join(missing)} not given"
    notes.append(msg)
    sec.blocks.append(("note", msg))
    return sec


def _worst_pairs(inputs: Inputs) -> Table | None:
    per, idx = inputs.get("evaluation", "consistency.ssim.per_image"), inputs.get("evaluation", "consistency.indices")
    if not isinstance(per, list) or not isinstance(idx, list) or len(per) != len(idx) or not per:
        return None
    order = sorted(range(len(per)), key=lambda k: per[k] if _is_number(per[k]) else math.inf)[:5]
    rows = [[str(idx[k]), Cell(FORMATS["ssim"](per[k]), [("evaluation", f"consistency.ssim.per_image.{k}")])]
            for k in order if _is_number(per[k])]
    return Table(["image index", "SSIM"], rows, collapsed=f"lowest-SSIM pairs ({len(rows)} of {len(per)}, "
                 "from the student evaluation)")


def _timestep_section(tmp: Path, inputs: Inputs, notes: list[str], written: dict[str, Path]) -> Section:
    from .plots import plot_timestep_losses

    sec = Section("Loss over timesteps (importance sweep)")
    imp = inputs.get("prune", "importance")
    if imp is None:
        sec.blocks.append(("note", "skipped: no prune report (--prune)"))
        return sec
    kept = _ranges_text(imp.get("kept_timesteps", []))
    cut = imp.get("cut_timestep")
    cut_text = (f"cut at t = {cut} (the step that stopped the sweep, kept as in the paper's loop)"
                if cut is not None else "no cut (every timestep kept)")
    text = (f"method {imp.get('method')}, threshold {imp.get('threshold')}: kept timesteps {kept} "
            f"({imp.get('num_kept_timesteps')} timesteps), {cut_text} (from the prune report › importance).")
    if imp.get("losses"):
        try:
            written["timestep_losses"] = plot_timestep_losses(imp, tmp / "loss_over_timesteps.png")
        except (KeyError, TypeError, ValueError) as err:
            raise DiffpruneError(f"--prune: {inputs.files['prune']} importance summary is malformed ({err})") \
                from None
        sec.blocks += [Image("loss_over_timesteps.png", "loss over timesteps",
                             "L_t over t from prune report › importance.losses (solid, with gradients) and "
                             "tail_losses (dashed, forward only); kept range shaded"), text]
        return sec
    png = inputs.files["prune"].parent / PRUNE_LOSS_PNG
    if png.is_file():
        (tmp / PRUNE_LOSS_PNG).write_bytes(png.read_bytes())
        written["timestep_losses"] = tmp / PRUNE_LOSS_PNG
        sec.blocks += [Image(PRUNE_LOSS_PNG, "loss over timesteps", f"copied from {png}"), text]
        return sec
    msg = f"loss-over-timestep curve skipped: method {imp.get('method')!r} evaluates no per-timestep loss"
    notes.append(msg)
    sec.blocks += [("note", msg), text]
    return sec


def _widths_section(tmp: Path, inputs: Inputs, notes: list[str], written: dict[str, Path]) -> Section:
    sec = Section("Layer widths before and after pruning")
    before, after = inputs.get("prune", "widths.before"), inputs.get("prune", "widths.after")
    if not isinstance(before, dict) or not isinstance(after, dict) or not before:
        msg = ("widths chart skipped: " + ("no prune report (--prune)" if "prune" not in inputs.data else
                                           "the prune report has no widths"))
        if "prune" in inputs.data:
            notes.append(msg)
        sec.blocks.append(("note", msg))
        return sec
    before = {k: v for k, v in before.items() if _is_number(v)}
    after = {k: v for k, v in after.items() if _is_number(v)}
    written["widths"], how = plot_widths(before, after, tmp / "widths.png")
    sec.blocks.append(Image("widths.png", "layer widths before and after", f"{how}; from prune report › widths"))
    rows = []
    for block, names in group_by_block([n for n in before if n in after]).items():
        b, a = sum(before[n] for n in names), sum(after[n] for n in names)
        rows.append([block, str(len(names)), str(b), str(a)])
    sec.blocks.append(Table(["block", "layers", "channels before (sum)", "channels after (sum)"], rows))
    layer_rows = [[n, str(before[n]), str(after[n])]
                  for ns in group_by_block([n for n in before if n in after]).values() for n in ns]
    sec.blocks.append(Table(["layer", "before", "after"], layer_rows,
                            collapsed=f"per-layer widths ({len(layer_rows)} layers, prune report › widths)"))
    return sec


def _training_section(tmp: Path, log: dict | None, given: dict, notes: list[str],
                      written: dict[str, Path]) -> Section:
    sec = Section("Training loss")
    if "finetune" not in given:
        sec.blocks.append(("note", "skipped: no finetune/train folder (--finetune)"))
    elif log is None or not log.get("records"):
        sec.blocks.append(("note", "skipped: no train_log.json records (see notes)"))
    else:
        written["training"], how = plot_training(log, tmp / "training_loss.png")
        sec.blocks.append(Image("training_loss.png", "training loss", f"{how}; from train log › records"))
    return sec


def _settings_section(inputs: Inputs, teacher: Samples | None, student: Samples | None, given: dict) -> Section:
    from . import __version__

    sec = Section("Settings")
    pr = inputs.data.get("prune")
    if pr is not None:
        cfg, imp = pr.get("config") or {}, pr.get("importance") or {}
        sec.blocks.append("Pruning (prune report):")
        sec.blocks.append(_settings_table([
            ("model", cfg.get("model")), ("family", pr.get("family")), ("method", cfg.get("method", imp.get("method"))),
            ("threshold", imp.get("threshold")), ("ratio (applied)", pr.get("ratio")),
            ("ratio rule", cfg.get("ratio_rule")), ("target MACs", cfg.get("target_macs")),
            ("target params", cfg.get("target_params")), ("round to", cfg.get("round_to")),
            ("calibration data", cfg.get("data")), ("calibration images", lookup(pr, "calibration.images")),
            ("kept timesteps", _ranges_text(imp.get("kept_timesteps", [])) if "kept_timesteps" in imp else None),
            ("number of kept timesteps", imp.get("num_kept_timesteps")), ("cut timestep", imp.get("cut_timestep")),
            ("sample-gradient evaluations", imp.get("sample_gradient_evals")),
            ("wall time", _seconds(pr.get("wall_time_s"))), ("seed", cfg.get("seed")), ("device", cfg.get("device")),
        ]))
    fc = inputs.data.get("finetune_config")
    if fc is not None:
        sec.blocks.append(f"Training ({inputs.files['finetune_config'].name}):")
        sec.blocks.append(_settings_table([(k, v) for k, v in fc.items()]))
    for name in ("evaluation", "teacher_evaluation"):
        ev = inputs.data.get(name)
        if ev is None:
            continue
        c = ev.get("config") or {}
        sec.blocks.append(f"{INPUT_LABELS[name].capitalize()} ({inputs.files[name].name}):")
        sec.blocks.append(_settings_table([
            ("samples", lookup(ev, "samples.path") or c.get("samples")), ("reference", c.get("reference")),
            ("feature net", lookup(ev, "fid.feature_extractor") or c.get("feature_net")),
            ("KID subsets x size", f"{c['kid_subsets']} x {c['kid_subset_size']}" if "kid_subsets" in c else None),
            ("teacher samples", c.get("teacher_samples")), ("model", c.get("model")),
            ("teacher model", c.get("teacher_model")),
            ("latency settings", lookup(ev, "cost.latency.settings")),
            ("MACs protocol", lookup(ev, "cost.macs_protocol")), ("seed", c.get("seed")),
        ]))
    for who, s in (("teacher", teacher), ("student", student)):
        if s is not None and s.config:
            sec.blocks.append(f"Sampling, {who} ({s.folder / SAMPLE_CONFIG}):")
            sec.blocks.append(_settings_table([(k, v) for k, v in s.config.items()]))
    versions = [("report written by diffprune", __version__)]
    for name in ("prune", "evaluation", "teacher_evaluation"):
        v = inputs.get(name, "versions")
        if isinstance(v, dict):
            versions += [(f"{INPUT_LABELS[name]}: {k}", val) for k, val in v.items()]
    sec.blocks.append("Versions:")
    sec.blocks.append(_settings_table(versions))
    sec.blocks.append("Inputs:")
    sec.blocks.append(_settings_table([(k.replace("_", "-"), str(Path(v).absolute())) for k, v in given.items()]))
    return sec


__all__ = ["DEFAULT_NUM_PAIRS", "DEFAULT_TITLE", "lookup", "write_report"]
