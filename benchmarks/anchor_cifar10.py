"""Anchor to the paper: the google/ddpm-cifar10-32 architecture before and after pruning.

Builds the architecture from its config with random weights (sizes do not depend on weights) and
prunes it at the settings below; prints a table and writes benchmarks/results/anchor_cifar10.json.
Paper (PAPER.md): 35.7M params / 6.1G MACs -> 19.8M / 3.4G at ratio 0.3.

    python benchmarks/anchor_cifar10.py
    python benchmarks/anchor_cifar10.py --smoke --out DIR   # the code path on a tiny UNet of the same layout
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from bench_args import add_smoke_options, results_dir
from diffusers import UNet2DModel

from diffprune.families import family_for
from diffprune.io import library_versions
from diffprune.prune.importance import ImportanceResult
from diffprune.prune.pruning import PruneConfig, prune_model

SETTINGS = [
    {"ratio": 0.3, "ratio_rule": "paper"},
    {"ratio": 0.3, "ratio_rule": "torch-pruning"},
    {"ratio": 0.25, "ratio_rule": "torch-pruning"},
    {"target_macs": 3.39 / 6.07},
    {"target_params": 19.85 / 35.75},
]


def cifar10_unet() -> UNet2DModel:
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2, norm_num_groups=32, attention_head_dim=None, dropout=0.1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def smoke_unet() -> UNet2DModel:
    """cifar10_unet's block layout (4 levels, attention at level 1) at 16x16, 16-32 channels, 1 layer per block."""
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32),
                       layers_per_block=1, norm_num_groups=4, attention_head_dim=None, dropout=0.1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smoke_options(parser, "smoke_unet() instead of the CIFAR-10 UNet")
    args = parser.parse_args()
    out_dir = results_dir(parser, args)
    torch.manual_seed(0)
    model = (smoke_unet() if args.smoke else cifar10_unet()).eval()
    family = family_for(model)
    importance = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)  # sizes only
    rows = []
    for setting in SETTINGS:
        out = prune_model(model, family, PruneConfig(model="google/ddpm-cifar10-32 (config)", method="magnitude",
                                                **setting), importance, progress=False)
        rows.append({"setting": setting, "ratio": out.ratio, "params_before": out.params[0],
                     "params_after": out.params[1], "macs_before": out.macs[0], "macs_after": out.macs[1],
                     "conv_in_width": out.model.conv_in.out_channels})
    print(f"{'setting':<44}{'params':>16}{'MACs':>16}{'conv_in':>9}")
    base = rows[0]
    print(f"{'unpruned':<44}{base['params_before'] / 1e6:>15.2f}M{base['macs_before'] / 1e9:>15.2f}G"
          f"{model.conv_in.out_channels:>9}")
    for r in rows:
        label = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["setting"].items())
        print(f"{label:<44}{r['params_after'] / 1e6:>15.2f}M{r['macs_after'] / 1e9:>15.2f}G{r['conv_in_width']:>9}")
    result = {"paper": {"params_before": 35.7e6, "macs_before": 6.1e9, "params_after": 19.8e6, "macs_after": 3.4e9},
              "rows": rows, "machine": platform.platform(), "python": sys.version.split()[0],
              "versions": library_versions()}
    if args.smoke:
        result["smoke"] = "smoke_unet(), not the CIFAR-10 UNet"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "anchor_cifar10.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
