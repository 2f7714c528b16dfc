"""diffprune: Diff-Pruning (Fang, Ma, Wang, NeurIPS 2023) for diffusers models."""

__version__ = "0.1.0"

from .errors import DiffpruneError  # noqa: E402
from .io import PrunedUNet2DModel, load_pipeline, load_unet, save_pipeline  # noqa: E402


def prune(*args, **kwargs):
    """`diffprune prune` as a function: see `prune_job.run_prune(PruneConfig(...), output_dir)`."""
    from .prune_job import run_prune

    return run_prune(*args, **kwargs)


def evaluate(*args, **kwargs):
    """`diffprune evaluate` as a function: see `evaluation.evaluate(EvaluateConfig(...))`."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["DiffpruneError", "PrunedUNet2DModel", "evaluate", "load_pipeline", "load_unet", "prune",
           "save_pipeline", "__version__"]
