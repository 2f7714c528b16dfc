"""Params and MACs of one forward pass, counted by torch-pruning's op counter.

Protocol (PAPER.md, "Evaluation protocol"): batch 1, the model's own resolution.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch_pruning as tp


@torch.no_grad()
def count_macs_params(model: torch.nn.Module, example_inputs: dict) -> tuple[int, int]:
    """(MACs, params) of `model(**example_inputs)`; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # silence its "No positional inputs" prints
            macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    finally:
        model.train(was_training)
    return int(macs), int(params)
