"""Pickle-free pipeline folders (layer 3, io): save, load, the checks before loading, the
diffusers-only `--portable` loader, and module-tree shapes as JSON.

Modules: `pipeline` (save/load, the Pruned* classes), `pretrained_options` (diffusers' save_pretrained /
from_pretrained keyword arguments for them), `folder_files` (a component folder's files, hub ids),
`model_checks` + `weight_checks` (what a folder must hold before anything is loaded), `structure`
(record/apply layer widths, saved buffers, the weights fingerprint), `portable` + `portable_template`.
May import the shared layers, `data` and `families` (never prune/train/sample/evaluate/report/cli).

`diffprune.io` is a public name: model_index.json files name it as the library of pruned
components, so it re-exports the Pruned* classes (and ModelMixin, which diffusers looks up here).
"""

from .pipeline import (  # noqa: F401
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    PRUNED_CLASSES,
    PRUNING_FILE,
    WEIGHTS_FILE,
    ModelMixin,
    PrunedDiTTransformer2DModel,
    PrunedModelMixin,
    PrunedPixArtTransformer2DModel,
    PrunedSD3Transformer2DModel,
    PrunedUNet2DConditionModel,
    PrunedUNet2DModel,
    library_versions,
    load_pipeline,
    load_unet,
    save_pipeline,
    to_pruned,
)

__all__ = ["CONFIG_FILE", "FORMAT_NAME", "FORMAT_VERSION", "PRUNED_CLASSES", "PRUNING_FILE", "WEIGHTS_FILE",
           "ModelMixin", "PrunedDiTTransformer2DModel", "PrunedModelMixin", "PrunedPixArtTransformer2DModel",
           "PrunedSD3Transformer2DModel",
           "PrunedUNet2DConditionModel", "PrunedUNet2DModel", "library_versions", "load_pipeline", "load_unet",
           "save_pipeline", "to_pruned"]
