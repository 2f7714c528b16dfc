"""Measured cost next to counted cost: forward latency and sampling throughput, teacher vs student.

MACs (PAPER.md: one UNet forward, batch 1, the model's resolution) predict speed only roughly:
memory traffic, kernel launch overhead and thread counts matter too. So we time the real thing:
- forward latency: repeated forward passes on the same input batch after warm-up; median, p10/p90
  and IQR in milliseconds;
- sampling throughput: full sampling runs (`diffprune.sample.loop.sample`, or any callable), images/s.
Teacher and student runs are interleaved in counterbalanced order (AB BA AB ...), so slow drift of
the machine (thermal, other load) hits both alike; speed-ups are ratios of medians.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from ..errors import DiffpruneError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000.0
    q10, q25, q50, q75, q90 = np.percentile(ms, [10, 25, 50, 75, 90])
    return {
        "median_ms": float(q50),
        "p10_ms": float(q10),
        "p90_ms": float(q90),
        "iqr_ms": float(q75 - q25),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "repeats": int(ms.size),
    }


def _interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _settings(device: torch.device, repeats: int, warmup: int) -> dict:
    return {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "order": "interleaved, counterbalanced (AB BA ...)",
        "torch": torch.__version__,
    }


@torch.no_grad()
def forward_latency(
    models: dict[str, torch.nn.Module],
    example_inputs: dict,
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: str | torch.device = "cpu",
) -> dict:
    """Latency of `model(**example_inputs)` for each model (same inputs), interleaved.

    Returns {"settings": {...}, "batch_size", "<name>": {"median_ms", "p10_ms", "p90_ms", "iqr_ms",
    "mean_ms", "min_ms", "repeats"}, ...}. Models are put in eval mode on `device`.
    """
    if repeats < 1 or warmup < 0:
        raise DiffpruneError(f"latency repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    device = torch.device(device)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example_inputs.items()}
    fns = {}
    for name, model in models.items():
        model.to(device).eval()
        fns[name] = (lambda m: lambda: m(**inputs))(model)
    times = _interleaved(fns, repeats, warmup, device)
    first = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
    out = {
        "settings": _settings(device, repeats, warmup),
        "batch_size": int(first.shape[0]) if first is not None else None,
    }
    out.update({name: _summary_ms(t) for name, t in times.items()})
    return out


def sampling_throughput(
    samplers: dict[str, Callable[[], int]],
    *,
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device = "cpu",
) -> dict:
    """Images per second of each `sampler()` call (which returns how many images it made), interleaved.

    Returns {"settings", "<name>": {"images_per_s" (from the median time), "median_s", "images", ...}}.
    """
    if repeats < 1 or warmup < 0:
        raise DiffpruneError(f"throughput repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    device = torch.device(device)
    counts: dict[str, int] = {}

    def wrap(name, fn):
        def run():
            counts[name] = int(fn())

        return run

    times = _interleaved({n: wrap(n, f) for n, f in samplers.items()}, repeats, warmup, device)
    out = {"settings": _settings(device, repeats, warmup)}
    for name, t in times.items():
        med = float(np.median(t))
        out[name] = {
            "images": counts[name],
            "median_s": med,
            "min_s": float(min(t)),
            "max_s": float(max(t)),
            "images_per_s": counts[name] / med if med > 0 else None,
            "repeats": len(t),
        }
    return out


def image_sampler(
    unet: torch.nn.Module,
    scheduler,
    num_images: int,
    *,
    steps: int = 100,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    ctx=None,
    sampler: str = "pipeline",
) -> Callable[[], int]:
    """A callable that samples `num_images` as `diffprune sample` does: by default with the folder's own
    scheduler (`sampler="pipeline"`), or the paper's deterministic DDIM (`sampler="ddim"`: eta 0,
    uniform spacing). `ctx` (families.conditioning.PipelineContext) supplies conditioning and the
    latent decode.
    """
    from ..sample.loop import sample

    bs = batch_size or num_images

    def run() -> int:
        images = sample(
            unet,
            scheduler,
            num_images,
            batch_size=bs,
            seed=seed,
            steps=steps,
            eta=0.0,
            sampler=sampler,
            spacing="uniform",
            device=device,
            progress=False,
            ctx=ctx,
        )
        return int(images.shape[0])

    return run


def ratio(teacher: float | None, student: float | None) -> float | None:
    """teacher / student, or None when either is missing or the student is 0."""
    if teacher is None or student is None or student == 0:
        return None
    return float(teacher) / float(student)


__all__ = ["forward_latency", "image_sampler", "ratio", "sampling_throughput"]


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor() elsewhere), for reports."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
