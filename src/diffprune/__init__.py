"""diffprune: Diff-Pruning (Fang, Ma, Wang, NeurIPS 2023) for diffusers models."""

__version__ = "0.1.0"

from .errors import DiffpruneError  # noqa: E402

# Loaded on first use (PEP 562), so `import diffprune` (and `diffprune --help` / `--version`) does
# not import torch and diffusers.
_FROM_IO = ("PrunedDiTTransformer2DModel", "PrunedPixArtTransformer2DModel", "PrunedUNet2DConditionModel",
            "PrunedUNet2DModel", "load_pipeline", "load_unet", "save_pipeline")


def __getattr__(name: str):
    if name in _FROM_IO:
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prune(*args, **kwargs):
    """`diffprune prune` as a function: see `prune_job.run_prune(PruneConfig(...), output_dir)`."""
    from .prune_job import run_prune

    return run_prune(*args, **kwargs)


def evaluate(*args, **kwargs):
    """`diffprune evaluate` as a function: see `evaluation.evaluate(EvaluateConfig(...))`."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def finetune(*args, **kwargs):
    """`diffprune finetune` as a function: see `training.finetune(model, data, output_dir, **kw)`."""
    from .training import finetune as _finetune

    return _finetune(*args, **kwargs)


def train(*args, **kwargs):
    """`diffprune train` as a function: see `training.train(data, output_dir, model_config, **kw)`."""
    from .training import train as _train

    return _train(*args, **kwargs)


def sample(*args, **kwargs):
    """`diffprune sample` as a function: see `sampling.sample_to_folder(model, output_dir, n, **kw)`."""
    from .sampling import sample_to_folder

    return sample_to_folder(*args, **kwargs)


def report(*args, **kwargs):
    """`diffprune report` as a function: see `report.write_report(output_dir, **inputs)`."""
    from .report import write_report

    return write_report(*args, **kwargs)


__all__ = ["DiffpruneError", "PrunedDiTTransformer2DModel", "PrunedPixArtTransformer2DModel", "PrunedUNet2DConditionModel", "PrunedUNet2DModel",
           "evaluate", "finetune", "load_pipeline", "load_unet", "prune", "report", "sample", "save_pipeline",
           "train", "__version__"]
