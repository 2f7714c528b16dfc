"""The embedded digits feature network ("digits-cnn-v1") for digits-FID/KID.

Inception features are meaningless on 16x16 grayscale digits, so the embedded digits DDPM is judged
with the penultimate-layer features (64-d, before the last ReLU) of a small CNN classifier trained
on `data.digits_images(16, 1, "train")`, held-out accuracy measured on the "test" split. FID/KID
computed with it follow the same definitions (Heusel et al. 2017; Binkowski et al. 2018) but are
only comparable with other numbers from this extractor.

Input: (N, 1, 16, 16) in [-1, 1]. Other inputs are converted: RGB -> grayscale (channel mean, as
`data.py` does), other sizes -> 16x16 bilinear (antialiased when shrinking).

Weights: `assets/digits_features/` (safetensors + config.json + README.md model card), made by
    python -m diffprune.metrics.digits_net --train --output src/diffprune/assets/digits_features
"""

from __future__ import annotations

import argparse
import json
import math
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffpruneError
from .extractor_base import FeatureExtractor, resize_bilinear

EXTRACTOR_NAME = "digits-cnn-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_TRAIN = {
    "epochs": 40,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "max_shift": 2,
    "seed": 0,
    "feature_dim": 64,
    "width": 32,
}


class DigitsNet(nn.Module):
    """conv(w)x2 -> pool -> conv(2w)x2 -> pool -> fc(feature_dim) [features] -> ReLU -> fc(10)."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.feature = nn.Linear(2 * w * 16, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.features(x))))


def default_weights_dir() -> Path:
    return Path(str(resources.files("diffprune") / "assets" / "digits_features"))


def load_digits_net(folder: str | Path | None = None) -> tuple[DigitsNet, dict]:
    """The trained net (eval mode) and its config from a folder (default: the embedded asset)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else default_weights_dir()
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise DiffpruneError(
            f"digits feature net not found in {str(folder)!r} (needs {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}); rebuild it with `python -m diffprune.metrics.digits_net "
            f"--train --output {folder}`"
        )
    config = json.loads(cfg_path.read_text())
    model = DigitsNet(config["width"], config["feature_dim"])
    try:
        model.load_state_dict(load_file(str(w_path)), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise DiffpruneError(
            f"{w_path}: could not load the digits feature net ({str(err).splitlines()[0]})"
        ) from None
    return model.eval().requires_grad_(False), config


class DigitsFeatureExtractor(FeatureExtractor):
    """64-d penultimate features of the digits CNN; inputs converted to 16x16 grayscale [-1, 1]."""

    name = EXTRACTOR_NAME
    input_size = 16
    input_channels = 1

    def __init__(self, weights: str | Path | None = None, device="cpu", batch_size: int = 256):
        super().__init__(device, batch_size)
        self.model, self.config = load_digits_net(weights)
        self.model.to(self.device)
        self.dim = int(self.config["feature_dim"])
        self.name = self.config.get("name", EXTRACTOR_NAME)
        self.scale = float(self.config.get("feature_scale", 1.0))

    def prepare(self, x):
        x = super().prepare(x)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            self._note(
                f"{self.name}: {x.shape[-2]}x{x.shape[-1]} images resized to "
                f"{self.input_size}x{self.input_size} (bilinear) for the feature net"
            )
            x = resize_bilinear(x, self.input_size, antialias=x.shape[-1] > self.input_size)
        return x * 2 - 1

    def forward_features(self, x):
        return self.model.features(x) / self.scale


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in x and y (background = -1 fills the border)."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def evaluate_accuracy(model: DigitsNet, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(output: str | Path, **overrides) -> dict:
    """Train on the digits "train" split, measure on "test", write safetensors + config + model card."""
    from safetensors.torch import save_file

    from ..data import digits_images, digits_labels

    cfg = {**DEFAULT_TRAIN, **overrides}
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    x_tr, y_tr = digits_images(16, 1, "train"), digits_labels("train")
    x_te, y_te = digits_images(16, 1, "test"), digits_labels("test")
    model = DigitsNet(cfg["width"], cfg["feature_dim"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = math.ceil(len(x_tr) / cfg["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg["lr"], epochs=cfg["epochs"], steps_per_epoch=steps_per_epoch
    )
    t0 = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), cfg["batch_size"]):
            idx = perm[i : i + cfg["batch_size"]]
            xb = _random_shift(x_tr[idx], cfg["max_shift"], g)
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            print(
                f"epoch {epoch + 1}/{cfg['epochs']}: loss {loss.item():.4f}, "
                f"test acc {evaluate_accuracy(model, x_te, y_te):.4f}"
            )
    seconds = time.perf_counter() - t0
    model.eval()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    config = {
        "name": EXTRACTOR_NAME,
        "architecture": "DigitsNet",
        "width": cfg["width"],
        "feature_dim": cfg["feature_dim"],
        "input_size": 16,
        "input_channels": 1,
        "input_range": [-1.0, 1.0],
        "features": "penultimate linear layer, before ReLU, divided by feature_scale",
        "train": {k: cfg[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "max_shift", "seed")},
        "data": "sklearn digits via diffprune.data.digits_images(16, 1, split)",
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": f"python -m diffprune.metrics.digits_net --train --output {output}",
    }
    return calibrate(out, config)


def calibrate(folder: str | Path, config: dict | None = None) -> dict:
    """Measure the net in `folder` and (re)write config.json + README.md; the weights are unchanged.

    Records accuracies, `feature_scale` = sqrt(mean |f|^2 / dim) of the raw features on the train
    split (features are divided by it, so the KID kernel x.y/dim + 1 sees O(1) values), and
    reference digits-FID/KID values between the test and train splits (the floor a perfect
    generator would reach at that sample size).
    """
    from safetensors.torch import load_file

    from ..data import digits_images, digits_labels
    from ..fsutil import write_json_atomic
    from .fid import compute_stats, frechet_distance, kernel_inception_distance

    folder = Path(folder)
    config = dict(config if config is not None else json.loads((folder / CONFIG_FILE).read_text()))
    model = DigitsNet(config["width"], config["feature_dim"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    model.eval()
    x_tr, y_tr = digits_images(16, 1, "train"), digits_labels("train")
    x_te, y_te = digits_images(16, 1, "test"), digits_labels("test")
    shifted = _random_shift(x_te, 1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        f_tr, f_te = model.features(x_tr).double(), model.features(x_te).double()
    scale = float(f_tr.pow(2).sum(1).mean().div(f_tr.shape[1]).sqrt())
    a, b = (f_te / scale).numpy(), (f_tr / scale).numpy()
    sa, sb = compute_stats(a, EXTRACTOR_NAME), compute_stats(b, EXTRACTOR_NAME)
    kid = kernel_inception_distance(a, b, seed=0)
    config.update(
        {
            "features": "penultimate linear layer, before ReLU, divided by feature_scale",
            "feature_scale": round(scale, 6),
            "num_train": len(x_tr),
            "num_test": len(x_te),
            "train_accuracy": round(evaluate_accuracy(model, x_tr, y_tr), 4),
            "test_accuracy": round(evaluate_accuracy(model, x_te, y_te), 4),
            "test_accuracy_shifted_1px": round(evaluate_accuracy(model, shifted, y_te), 4),
            "reference_fid_test_vs_train": round(frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma), 4),
            "reference_kid_test_vs_train": {
                "mean": round(kid["mean"], 6),
                "std": round(kid["std"], 6),
                "subset_size": kid["subset_size"],
            },
        }
    )
    write_json_atomic(folder / CONFIG_FILE, config)
    (folder / "README.md").write_text(_model_card(config))
    print(
        f"held-out accuracy {config['test_accuracy']:.4f} ({len(x_te)} test images), trained in "
        f"{config['train_seconds']}s; wrote {folder}"
    )
    return config


def _model_card(c: dict) -> str:
    return f"""# digits-cnn-v1: feature network for digits-FID / digits-KID

A small CNN classifier for the 16x16 grayscale digits used by diffprune's embedded demo DDPM. Its
{c["feature_dim"]}-d penultimate-layer activations (the linear layer before the last ReLU) replace
Inception pool3 features when computing FID (Heusel et al. 2017) and KID (Binkowski et al. 2018)
on digits, because an ImageNet Inception network says little about 16x16 grayscale digits.
Numbers computed with it are labelled `"feature_extractor": "{c["name"]}"` and are comparable only
with other numbers from this network, never with published (Inception) FIDs.

- Architecture: conv({c["width"]})x2 -> maxpool -> conv({2 * c["width"]})x2 -> maxpool -> linear({c["feature_dim"]}) -> ReLU -> dropout 0.3 -> linear(10); BatchNorm after each conv.
- Input: (N, 1, 16, 16) in [-1, 1]. RGB inputs are averaged to grayscale, other sizes are resized to 16x16 (bilinear); the evaluation JSON records such conversions.
- Data: scikit-learn digits via `diffprune.data.digits_images(16, 1, "train")` ({c["num_train"]} images) / labels `digits_labels("train")`; held out: the "test" split ({c["num_test"]} images).
- Training: AdamW lr {c["train"]["lr"]} (one-cycle), weight decay {c["train"]["weight_decay"]}, batch {c["train"]["batch_size"]}, {c["train"]["epochs"]} epochs, random shifts of up to {c["train"]["max_shift"]} px, seed {c["train"]["seed"]}.
- Held-out accuracy: **{c["test_accuracy"] * 100:.2f}%** (test split, {c["num_test"]} images); {c["test_accuracy_shifted_1px"] * 100:.2f}% on test images shifted by up to 1 px; train accuracy {c["train_accuracy"] * 100:.2f}%.
- Feature scale: raw features are divided by {c["feature_scale"]} (the RMS feature value on the train split) so the KID kernel (x.y/d + 1)^3 sees O(1) values.
- Reference values (real test split vs real train split, {c["num_test"]} vs {c["num_train"]} images): digits-FID {c["reference_fid_test_vs_train"]}, digits-KID {c["reference_kid_test_vs_train"]["mean"]} +- {c["reference_kid_test_vs_train"]["std"]}. A generator whose samples match the data cannot do much better at this sample count.
- Training time: {c["train_seconds"]} s on CPU with {c["torch_threads"]} torch threads (torch {c["torch"]}).
- Files: `model.safetensors` (weights), `config.json` (architecture, settings, accuracy).

Reproduce (from the repository root):

    {c["command"]}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffprune.metrics.digits_net", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--train", action="store_true", help="train the net and write it to --output")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="re-measure the net in --output (accuracy, feature scale, reference FID) and "
        "rewrite its config.json and README.md; weights unchanged",
    )
    parser.add_argument(
        "--output",
        default=str(default_weights_dir()),
        help="folder for model.safetensors, config.json, README.md (default: the package asset)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_TRAIN["epochs"],
        help=f"training epochs, >= 1 (default: {DEFAULT_TRAIN['epochs']})",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_TRAIN["seed"], help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.calibrate and not args.train:
        calibrate(args.output)
        return 0
    if not args.train:
        model, config = load_digits_net(args.output)
        print(json.dumps({k: config[k] for k in ("name", "feature_dim", "test_accuracy")}))
        return 0
    if args.epochs < 1:
        parser.error(f"--epochs={args.epochs} must be >= 1")
    train(args.output, epochs=args.epochs, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
