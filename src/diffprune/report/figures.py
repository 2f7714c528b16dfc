"""The report's pictures: teacher/student sample pairs, layer widths, the training loss curve.

Owns the report-only figures; shared picture helpers (`image_grid`, `save_png`, the Agg `figure`,
the loss-over-timesteps plot of the prune stage) live in `diffprune.plots`. Every value drawn is
read from an input; nothing is measured here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..plots import figure, image_grid
from .inputs import Samples, is_number

# Per-layer width bars are drawn up to this many layers; beyond it, one bar pair per block.
MAX_LAYER_BARS = 200

# Data-flow order of a UNet (diffusers registers mid_block after up_blocks); other names keep their place.
_BLOCK_ORDER = {"down_blocks": 1, "mid_block": 2, "up_blocks": 3, "conv_norm_out": 4, "conv_act": 4, "conv_out": 4}


def upscale_for(h: int) -> int:
    """Nearest-neighbour enlargement that makes tiny images (e.g. 16x16 digits) visible."""
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


def group_by_block(names: Sequence[str]) -> dict[str, list[str]]:
    """'down_blocks.1.resnets.0.conv1' -> 'down_blocks.1'; 'mid_block.x' -> 'mid_block'; else first part."""
    groups: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]
        groups.setdefault(key, []).append(n)
    return dict(sorted(groups.items(), key=lambda kv: _BLOCK_ORDER.get(kv[0].split(".")[0], 0)))


def _width_bars(before: dict[str, int], after: dict[str, int]) -> tuple[list, list, list, list, bool, str]:
    """(labels, before, after, colours, per_block, how): one bar per layer, or per block if too many."""
    names = [n for n in before if n in after]
    grouped = group_by_block(names)
    if len(names) > MAX_LAYER_BARS:
        labels = list(grouped)
        b = [sum(before[n] for n in grouped[g]) for g in labels]
        a = [sum(after[n] for n in grouped[g]) for g in labels]
        colors = [f"C{k % 10}" for k in range(len(labels))]
        return labels, b, a, colors, True, (f"summed output widths per block ({len(names)} layers is more than "
                                            f"{MAX_LAYER_BARS} bars; the per-layer table is below)")
    names = [n for ns in grouped.values() for n in ns]
    block_of = {n: g for g, ns in grouped.items() for n in ns}
    order = list(grouped)
    colors = [f"C{order.index(block_of[n]) % 10}" for n in names]
    return (names, [before[n] for n in names], [after[n] for n in names], colors, False,
            "output width of each layer (conv/linear out, norm channels), coloured by block")


def plot_widths(before: dict[str, int], after: dict[str, int], path: Path) -> tuple[Path, str]:
    """Horizontal bars per layer (or per block for big models): width before (light) and after."""
    labels, b, a, colors, per_block, how = _width_bars(before, after)
    fig = figure((7.5, max(2.5, 0.13 * len(labels) + 1.0)), dpi=90)
    ax = fig.subplots()
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
    return Path(path), how


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over `window` records (fewer at the start)."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    k = np.arange(1, len(v) + 1)
    lo = np.maximum(k - window, 0)
    return (c[k] - c[lo]) / (k - lo)


def plot_training(log: dict, path: Path) -> tuple[Path, str]:
    """Training loss per logged record (raw and smoothed, plus the KD parts when logged)."""
    recs = [r for r in log["records"] if is_number(r.get("step")) and is_number(r.get("loss"))]
    steps = np.array([r["step"] for r in recs], dtype=float)
    loss = np.array([r["loss"] for r in recs], dtype=float)
    window = max(1, round(len(recs) / 20))
    fig = figure((6.4, 3.4), dpi=120)
    ax = fig.subplots()
    ax.plot(steps, loss, color="C0", lw=0.8, alpha=0.35, marker="." if len(recs) < 30 else None,
            label="loss (raw records)")
    if window > 1:
        ax.plot(steps, smooth(loss, window), color="C0", lw=1.6, label=f"loss, moving average of {window}")
    for k, key in enumerate(("loss_task", "loss_output_kd", "loss_feature_kd")):
        vals = [r.get(key) for r in recs]
        if all(is_number(v) for v in vals) and key in recs[-1] and any(vals):
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
    every = log.get("log_every")
    how = (f"each record is the mean loss over {every} optimizer steps" if every else "one point per record")
    smoothing = (f"thick line: trailing moving average over {window} records" if window > 1 else
                 "not smoothed (fewer than 30 records)")
    return Path(path), f"{how}; {smoothing}"
