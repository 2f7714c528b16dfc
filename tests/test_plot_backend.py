"""diffprune draws its figures without touching matplotlib's global state (plots.figure: a Figure on an
Agg canvas): importing diffprune, drawing every package figure and every benchmarks/ figure leaves the
backend a program chose, and never imports pyplot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: matplotlib first, on "svg" (a non-Agg backend every install has).
PROBE = r"""
import sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")
sys.path.insert(0, str(Path(sys.argv[1]) / "benchmarks"))
out = Path(sys.argv[2])

import diffprune, diffprune.io, diffprune.plots, diffprune.report.figures  # noqa: E401
from diffprune.plots import plot_timestep_losses
from diffprune.report.figures import plot_training, plot_widths

plot_timestep_losses({"losses": [[0, 1.0], [5, 0.5]], "tail_losses": [[6, 0.4]], "kept_timesteps": [[0, 6]],
                      "cut_timestep": 5, "threshold": 0.05, "method": "taylor", "num_kept_timesteps": 6},
                     out / "losses.png")
plot_widths({"down_blocks.0.conv": 32, "mid_block.conv": 64}, {"down_blocks.0.conv": 16, "mid_block.conv": 40},
            out / "widths.png")
plot_training({"records": [{"step": s, "loss": 1.0 / s} for s in range(1, 40)], "log_every": 1}, out / "train.png")

import _budget_report, allocation, threshold_sweep  # noqa: E401
stat = lambda m: {"mean": m, "std": 0.1, "n": 2}  # noqa: E731
_budget_report.plot({"prune": {k: {"fid": stat(5.0 / k), "ssim": stat(0.5)} for k in (10, 100)}},
                    {"fid": 0.01}, 0.5, out / "budget.png")
threshold_sweep.plot({"prefix": {k: {"ssim": stat(0.5)} for k in (10, 100)},
                      "threshold": {0.05: {"cut": stat(60.0), "ssim": stat(0.6)}},
                      "magnitude": {"ssim": stat(0.4)}, "random": {"ssim": stat(0.3)}},
                     [{"losses": [[0, 1.0], [10, 0.5]]}], out / "sweep.png")
allocation.plot_widths({a: [{"groups": [{"layer": "l0", "kept": 2, "total": 4}]}] for a in allocation.ALLOCATIONS},
                       {"rows": {a: {"widths": {"transformer_blocks.0.ff": [2, 4]}} for a in allocation.ALLOCATIONS}},
                       out / "allocation.png")
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_drawing_keeps_the_programs_matplotlib_backend(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["svg", "False"]  # backend unchanged, pyplot never imported
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["allocation.png", "budget.png", "losses.png", "sweep.png", "train.png", "widths.png"]
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)  # Agg wrote them, whatever the backend


def test_no_module_selects_a_matplotlib_backend():
    """`matplotlib.use` and pyplot change global state: not in src/ nor benchmarks/ (plots.figure instead)."""
    files = [*sorted((ROOT / "src" / "diffprune").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]
    bad = [str(f.relative_to(ROOT)) for f in files
           if any(s in f.read_text(encoding="utf-8") for s in ("matplotlib.use(", "import matplotlib.pyplot",
                                                                "from matplotlib import pyplot"))]
    assert not bad
