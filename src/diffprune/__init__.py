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


def _register_io_lazily() -> None:
    """Put `diffprune.io` in sys.modules now; its code runs when one of its names is first read.

    The model_index.json of every pruned folder names `diffprune.io` as its components' library, and
    diffusers resolves such a library only from sys.modules (it never imports a module a folder names).
    So the README's `import diffprune; DiffusionPipeline.from_pretrained(folder)` needs the name there
    after `import diffprune` alone, while `diffprune --help` must still start without torch.
    Dunder look-ups never load it: tools that scan sys.modules (torch's import does) ask for
    `__file__`-like names, and loading torch-importing code in the middle of torch's own import fails.
    """
    import importlib.util
    import sys

    name = f"{__name__}.io"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    loading = []

    def load(attr: str):
        if attr.startswith("__") or loading:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        loading.append(True)
        del module.__getattr__
        spec.loader.exec_module(module)
        return getattr(module, attr)

    module.__getattr__ = load
    sys.modules[name] = module
    globals()["io"] = module


_register_io_lazily()


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
