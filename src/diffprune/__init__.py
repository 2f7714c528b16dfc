"""diffprune: Diff-Pruning (Fang, Ma, Wang, NeurIPS 2023) for diffusers models."""

__version__ = "0.1.0"

from .errors import DiffpruneError  # noqa: E402

# Loaded on first use (PEP 562), so `import diffprune` (and `diffprune --help` / `--version`) does
# not import torch and diffusers.
_FROM_IO = ("PrunedDiTTransformer2DModel", "PrunedPixArtTransformer2DModel", "PrunedSD3Transformer2DModel",
            "PrunedUNet2DConditionModel", "PrunedUNet2DModel", "load_pipeline", "load_unet", "save_pipeline")


# The stage verbs are the stage packages themselves, callable (stage_call.py), imported on first use:
# diffprune.prune(...) -> prune.stage.run_prune, train(...) -> train.train, sample(...) ->
# sample.sample_to_folder, evaluate(...) -> evaluate.evaluate, report(...) -> report.write_report.
_STAGES = ("prune", "train", "sample", "evaluate", "report")


def __getattr__(name: str):
    if name in _FROM_IO:
        from . import io

        return getattr(io, name)
    if name in _STAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def finetune(*args, **kwargs):
    """`diffprune finetune` as a function: see `train.finetune(model, data, output_dir, **kw)`."""
    from .train import finetune as _finetune

    return _finetune(*args, **kwargs)


__all__ = ["DiffpruneError", "PrunedDiTTransformer2DModel", "PrunedPixArtTransformer2DModel",
           "PrunedSD3Transformer2DModel", "PrunedUNet2DConditionModel", "PrunedUNet2DModel",
           "evaluate", "finetune", "load_pipeline", "load_unet", "prune", "report", "sample", "save_pipeline",
           "train", "__version__"]
