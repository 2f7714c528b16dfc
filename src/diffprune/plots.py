"""Pictures next to the numbers: loss-over-timestep curves and sample grids (PNG, matplotlib Agg).

A shared layer: the prune stage (the loss-over-timesteps plot), the sample stage (grid.png) and the
report draw with these. It imports numpy only; matplotlib and PIL are imported when first used.
Figures are drawn with matplotlib's object-oriented API (`figure`: a Figure on an Agg canvas), never
pyplot or `matplotlib.use`, so the backend of a program that imports diffprune stays its own.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def figure(figsize: tuple[float, float], dpi: int = 100):
    """A matplotlib Figure drawn by the non-interactive Agg canvas (no display needed): `fig.subplots(...)`
    to draw, `fig.savefig(path)` to write. No pyplot: the global backend and figure list stay untouched,
    and the figure is freed with its last reference (no `close`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def plot_timestep_losses(summary: dict, path: str | Path, title: str = "") -> Path:
    """L_t over t for the calibration sweep, the kept range shaded and the threshold cut marked.

    `summary` is `ImportanceResult.summary()` (losses, tail_losses, kept ranges, threshold).
    """
    fig = figure((6.4, 3.6), dpi=120)
    ax = fig.subplots()
    swept = np.array(summary["losses"], dtype=float).reshape(-1, 2)
    tail = np.array(summary["tail_losses"], dtype=float).reshape(-1, 2)
    ax.plot(swept[:, 0], swept[:, 1], color="C0", lw=1.2, label="L_t (with gradients)")
    if len(tail):
        ax.plot(tail[:, 0], tail[:, 1], color="C0", lw=1.0, ls="--", alpha=0.7, label="L_t (forward only)")
    for lo, hi in summary["kept_timesteps"]:
        ax.axvspan(lo, hi - 1, color="C2", alpha=0.15, label=f"kept: t in [{lo}, {hi})")
    if summary.get("cut_timestep") is not None:
        cut = summary["cut_timestep"]
        ax.axvline(cut, color="C3", lw=1.0, label=f"cut at t={cut} (last kept, as the paper)")
        thr_line = summary["threshold"] * float(swept[:, 1].max())
        ax.axhline(thr_line, color="C3", lw=0.8, ls=":", label=f"thr x L_max (thr={summary['threshold']})")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("noise-prediction loss L_t")
    ax.set_yscale("log")
    ax.set_title(title or f"{summary['method']}: {summary['num_kept_timesteps']} timesteps kept")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1,
               max_images: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (H', W', C) grid, row-major, `pad` px white borders.

    `ncols` defaults to a near-square grid (ceil(sqrt(N)) columns); `max_images` keeps the first ones.
    The one grid function of the package: sample folders' grid.png and the report's pictures.
    """
    if max_images is not None:
        images = images[:max_images]
    n, h, w, c = images.shape
    ncols = max(1, ncols or math.ceil(math.sqrt(n)))
    nrows = max(1, math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_png(array: np.ndarray, path: str | Path, upscale: int = 1) -> Path:
    """Save a uint8 HxWxC (C in 1, 3) array; `upscale` enlarges tiny images with nearest neighbour."""
    from PIL import Image

    arr = array[..., 0] if array.shape[-1] == 1 else array
    im = Image.fromarray(arr)
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    im.save(path)
    return Path(path)
