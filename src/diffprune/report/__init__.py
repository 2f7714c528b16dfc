"""The report stage: one self-contained HTML page (and a Markdown twin) from the other stages' files.

Reads whatever it is given, skipping (with a visible note) whatever it is not:

- a prune folder (`prune_report.json`, `loss_over_timesteps.png`; prune/stage.py),
- a finetune/train folder (`train_log.json`, `finetune_config.json` / `train_config.json`; train/),
- the student's evaluation JSON and the teacher's (format "diffprune-evaluation"; evaluate/stage.py),
- the teacher's and the student's sample folders (`samples.npz`; sample/loop.py), paired by index.

It writes `report.html` (every image embedded as a base64 PNG data URI, inline CSS, no scripts, no
external resources), `report.md` (the same content, referencing the PNGs written beside it), the PNGs,
and `report_data.json` (the metric table with the source of every value).

Rule for numbers: every number shown is read from an input file and names where it came from (input
and JSON key path, e.g. `evaluation › cost.ratios.latency_speedup`); the report computes none of the
metrics itself, it only formats them (params in M, MACs in G or M, latency in ms).

Modules, in the order data flows through them (each imports only those before it, plus the shared
layers `errors`, `fsutil`, `plots`, `stage_call`; nothing here imports torch). `diffprune.report(...)`
calls this package: `stage.write_report` (see `stage_call`):

- `inputs`: load and check the input files; `Inputs` / `lookup`, the only way numbers enter,
- `cells`: `Cell` (text + sources) and the number formats,
- `tables`: the teacher-vs-student metric rows (a new metric goes here),
- `document`: `Section` / `Table` / `Image`, the document both renderers read,
- `figures`: sample pairs, layer widths, training loss (PNG),
- `sections`, `settings`: one function per report section (a new section goes here),
- `html`, `markdown`: the two renderers,
- `stage`: `write_report`, the stage itself.
"""

from __future__ import annotations

from ..stage_call import make_callable
from .figures import (
    MAX_LAYER_BARS,
    group_by_block,
    pair_samples,
    pairs_grid,
    plot_training,
    plot_widths,
    smooth,
)
from .inputs import (
    EVALUATION_FORMAT,
    EVALUATION_VERSION,
    Inputs,
    Samples,
    load_evaluation,
    load_prune,
    load_samples,
    load_training,
    lookup,
)
from .stage import DATA_FILE, DEFAULT_NUM_PAIRS, DEFAULT_TITLE, HTML_FILE, MD_FILE, STAGE, write_report
from .tables import Row, metric_rows

make_callable(__name__, "diffprune.report.stage:write_report")

__all__ = [
    "DATA_FILE", "DEFAULT_NUM_PAIRS", "DEFAULT_TITLE", "EVALUATION_FORMAT", "EVALUATION_VERSION", "HTML_FILE",
    "MAX_LAYER_BARS", "MD_FILE", "STAGE", "Inputs", "Row", "Samples", "group_by_block", "load_evaluation",
    "load_prune", "load_samples", "load_training", "lookup", "metric_rows", "pair_samples", "pairs_grid",
    "plot_training", "plot_widths", "smooth", "write_report",
]
