"""The prune stage's config (`PruneConfig`, written as prune_config.json) and the names of its choices.

Version 2 (issue 16/18) added `allocation` and made `estimator="fast"` the default. A version-1
config reads as it was meant: its `estimator` as saved (absent: "exact", the old default) and
`allocation="uniform"` (the only allocation version 1 had).
Version 3 (issues 24, 26) added how the sweep runs: `micro_batch_size`, `gradient_checkpointing`,
`sweep_precision` (sweep_runtime.py), and depth pruning: `structure`, `depth_include_mid`
(depth_stage.py). Versions 1 and 2 read with their defaults: the whole batch at once, no
checkpointing, fp32, width pruning, which is how those runs pruned.
Version 4 (issue 26) added `depth_split` ("sqrt" | "joint", structure 'both' only); a version-3 config
reads with "sqrt", the only split version 3 had.
"""

from __future__ import annotations

import dataclasses

from ..config import StageConfig
from ..errors import DiffpruneError, check_range
from .importance import ESTIMATORS
from .sweep_runtime import PRECISIONS

RATIO_RULES = ("torch-pruning", "paper")
# How the pruned channels are spread over the layers (prune/allocation.py): "uniform" = the paper
# (every group loses the same fraction); "global" ranks all groups together (torch-pruning's
# global_pruning=True); "isomorphic" ranks groups of the same structure together (Fang et al.,
# Isomorphic Pruning, ECCV 2024; torch-pruning's isomorphic=True).
ALLOCATIONS = ("uniform", "global", "isomorphic")
# What is removed (depth_stage.py): channels (the paper), whole layers, or layers then channels.
STRUCTURES = ("width", "depth", "both")
# Structure 'both': depth to sqrt(target) then width on a new sweep, or one joint ranking (depth_split.py).
DEPTH_SPLITS = ("sqrt", "joint")
DEPTH_ONLY_METHODS = ("block-influence",)  # scores layers, not channels


@dataclasses.dataclass(frozen=True)
class PruneConfig(StageConfig):
    """Settings of one pruning run (written as prune_config.json next to the result)."""

    stage = "prune"
    version = 4
    model: str = ""
    data: str = "digits"
    method: str = "diff-pruning"
    ratio: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    threshold: float = 0.05
    batch_size: int = 32
    # "fast": importance.estimate_fast (diff-pruning only; batch_size = image pool); "exact": the paper's
    # loop. None resolves to "fast" for diff-pruning (the default since version 2: issue 18 measured it
    # closer to a truth importance than exact-64) and to "exact" for the other methods (their only one).
    estimator: str | None = None
    round_to: int | None = None
    ratio_rule: str = "torch-pruning"
    allocation: str = "uniform"
    seed: int = 0
    device: str = "cpu"
    # How the calibration sweep runs (sweep_runtime.SweepRuntime): micro-batches of this many images
    # (None: the whole batch at once), activation checkpointing, and "bf16" autocast. Memory, not result:
    # micro-batches and checkpointing give the one-batch sweep's importance up to float rounding.
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False
    sweep_precision: str = "fp32"
    structure: str = "width"
    depth_include_mid: bool = False  # depth/both: the UNet mid block may go too (BK-SDM-Small)
    depth_split: str = "sqrt"  # both: how the target splits between layers and channels (depth_split.py)
    prune_heads: bool = False
    head_pruning_ratio: float | None = None
    prune_residual: bool = False  # transformers (DiT): also prune the residual width (Family.configured)
    prompt: str | None = None
    captions: str | None = None
    prompt_embeds: str | None = None  # families/prompt_embeds.py: the text encoders are not loaded
    class_labels: str | None = None
    portable: bool = False  # also write the code plain diffusers needs to load the folder (portable.py)

    def __post_init__(self):
        given = [n for n in ("ratio", "target_macs", "target_params") if getattr(self, n) is not None]
        if len(given) != 1:
            raise DiffpruneError(f"give exactly one of ratio, target_macs, target_params (got {given or 'none'})")
        if self.ratio is not None:
            check_range("ratio", self.ratio, 0.0, 1.0, low_open=False, high_open=True)
        for name in ("target_macs", "target_params"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 0.0, 1.0, low_open=True)
        check_range("threshold", self.threshold, 0.0, 1.0, high_open=True)
        if self.estimator is None:  # resolved, so the saved config says which one ran
            object.__setattr__(self, "estimator", "fast" if self.method == "diff-pruning" else "exact")
        if self.estimator not in ESTIMATORS:
            raise DiffpruneError(f"estimator={self.estimator!r} is not one of {ESTIMATORS}")
        if self.estimator == "fast" and self.method != "diff-pruning":
            raise DiffpruneError(f"estimator='fast' applies to method 'diff-pruning' only, not {self.method!r}; "
                                 f"use estimator='exact'")
        if self.ratio_rule not in RATIO_RULES:
            raise DiffpruneError(f"ratio_rule={self.ratio_rule!r} is not one of {RATIO_RULES}")
        if self.allocation not in ALLOCATIONS:
            raise DiffpruneError(f"allocation={self.allocation!r} is not one of {ALLOCATIONS}")
        if self.allocation != "uniform" and self.ratio_rule != "torch-pruning":
            raise DiffpruneError(f"ratio_rule={self.ratio_rule!r} applies to allocation 'uniform' only, "
                                 f"not {self.allocation!r}")
        if self.head_pruning_ratio is not None:
            check_range("head_pruning_ratio", self.head_pruning_ratio, 0.0, 1.0, high_open=True)
        if self.round_to is not None and self.round_to < 1:
            raise DiffpruneError(f"round_to={self.round_to} must be an integer >= 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise DiffpruneError(f"micro_batch_size={self.micro_batch_size} must be an integer >= 1")
        if self.sweep_precision not in PRECISIONS:
            raise DiffpruneError(f"sweep_precision={self.sweep_precision!r} is not one of {PRECISIONS}")
        self._check_structure()

    def _check_structure(self) -> None:
        """Depth pruning's settings (depth_stage.py) against the width options."""
        if self.structure not in STRUCTURES:
            raise DiffpruneError(f"structure={self.structure!r} is not one of {STRUCTURES}")
        if self.depth_split not in DEPTH_SPLITS:
            raise DiffpruneError(f"depth_split={self.depth_split!r} is not one of {DEPTH_SPLITS}")
        if self.depth_split != "sqrt" and self.structure != "both":
            raise DiffpruneError(f"depth_split={self.depth_split!r} applies to structure 'both' (layers and "
                                 f"channels), not {self.structure!r}")
        if self.structure == "width":
            if self.method in DEPTH_ONLY_METHODS or self.depth_include_mid:
                what = f"method={self.method!r}" if self.method in DEPTH_ONLY_METHODS else "depth_include_mid=True"
                raise DiffpruneError(f"{what} applies to structure 'depth' (or 'both'); allowed with 'width': "
                                     "diff-pruning, taylor, magnitude, random, reinit")
            return
        if self.ratio is not None:
            raise DiffpruneError(f"structure={self.structure!r} needs target_macs or target_params (a fraction of "
                                 "the model's size); ratio is width pruning's per-group channel ratio")
        if self.method in ("random", "reinit"):
            raise DiffpruneError(f"method={self.method!r} does not score layers; allowed with structure "
                                 f"{self.structure!r}: diff-pruning, taylor, magnitude, block-influence")
        if self.structure == "both" and self.method in DEPTH_ONLY_METHODS:
            raise DiffpruneError(f"method={self.method!r} scores layers only; allowed with structure 'both': "
                                 "diff-pruning, taylor, magnitude")
        widths = {"round_to": None, "prune_heads": False, "head_pruning_ratio": None, "prune_residual": False,
                  "allocation": "uniform", "ratio_rule": "torch-pruning"}
        set_ = [k for k, v in widths.items() if getattr(self, k) != v]
        if self.structure == "depth" and set_:
            raise DiffpruneError(f"{set_[0]}={getattr(self, set_[0])!r} is a width option; structure 'depth' removes "
                                 "whole layers only (use structure 'both' to prune channels too)")

    @classmethod
    def from_dict(cls, data):
        return super().from_dict(upgrade_prune_config(data))


def width_rest(config: PruneConfig, depth: dict) -> PruneConfig | None:
    """Structure 'both': the width config for the rest of the target after depth (`depth["fraction"]` of
    the model's size); None for 'depth', or when depth alone already reached the target."""
    rest = (config.target_macs or config.target_params) / depth["fraction"]
    if config.structure == "depth" or rest >= 1.0:
        return None
    kind = "target_macs" if config.target_macs is not None else "target_params"
    return dataclasses.replace(config, structure="width", depth_include_mid=False, depth_split="sqrt", **{kind: rest})


def upgrade_prune_config(data: dict) -> dict:
    """A version-1, -2 or -3 prune config as the version-4 one of the same run (see the module docstring)."""
    data = dict(data)
    if data.get("stage", PruneConfig.stage) != PruneConfig.stage:
        return data
    if data.get("version") == 1:
        data.update(version=2, estimator=data.get("estimator", "exact"), allocation=data.get("allocation", "uniform"))
    if data.get("version") == 2:  # the new fields' defaults are how a version-2 run swept
        data.update(version=3)
    if data.get("version") == 3:  # "sqrt" is how a version-3 'both' run split its target
        data.update(version=PruneConfig.version)
    return data
