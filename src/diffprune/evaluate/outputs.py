"""Where `evaluate` may write: never over an input, and over an existing file only if it wrote it.

Shared by the API (`evaluate.stage.evaluate`) and the CLI, so a script calling `evaluate()` is protected
the same way as `diffprune evaluate`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DiffpruneError
from ..fsutil import check_output_file, read_json

RESULT_FORMAT = "diffprune-evaluation"  # the "format" of every evaluation JSON evaluate writes
DEFAULT_OUTPUT_NAME = "evaluation.json"


def check_outputs(config, overwrite: bool) -> None:
    """Before any work: the JSON and the --save-stats file must not be (or lie inside) an input, and
    an existing one is replaced only with --overwrite and only if `evaluate` wrote it."""
    inputs = {"--samples": config.samples, "--reference": config.reference,
              "--teacher-samples": config.teacher_samples, "--model": config.model,
              "--teacher-model": config.teacher_model, "--inception-weights": config.inception_weights,
              "--digits-weights": config.digits_weights, "--prompt-embeds": getattr(config, "prompt_embeds", None),
              "--clip-model": config.clip_model if getattr(config, "clip_score", False) and
              Path(config.clip_model).expanduser().exists() else None}
    out = config.output_path()
    if out is not None:
        beside = dict(inputs)
        if config.samples and Path(config.samples).is_dir() and \
                _same_path(out, Path(config.samples) / DEFAULT_OUTPUT_NAME):
            del beside["--samples"]  # the default place: evaluation.json in the sample folder it judges
        check_output_file(out, overwrite, beside, _is_evaluation, "a diffprune evaluation JSON")
    if config.save_stats:
        check_output_file(config.save_stats, overwrite, inputs, _is_stats, "a diffprune statistics file",
                          what="--save-stats")


def _same_path(a, b) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _is_evaluation(path) -> bool:
    try:
        return read_json(path, "evaluation").get("format") == RESULT_FORMAT
    except DiffpruneError:
        return False


def _is_stats(path) -> bool:
    from ..metrics.fid import STATS_FORMAT

    try:
        with np.load(path, allow_pickle=False) as data:
            return "format" in data.files and str(data["format"]) == STATS_FORMAT
    except Exception:  # noqa: BLE001 - whatever np.load raises, the file is not one of ours
        return False
