"""diffprune: Diff-Pruning (Fang, Ma, Wang, NeurIPS 2023) for diffusers models."""

__version__ = "0.1.0"

from .errors import DiffpruneError  # noqa: E402
from .io import PrunedUNet2DModel, load_pipeline, load_unet, save_pipeline  # noqa: E402

__all__ = ["DiffpruneError", "PrunedUNet2DModel", "load_pipeline", "load_unet", "save_pipeline",
           "__version__"]
