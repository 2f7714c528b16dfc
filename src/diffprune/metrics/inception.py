"""The FID InceptionV3 of pytorch-fid, in pure torch (no torchvision), for FID as published.

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017) is defined on the 2048-d pool3 features of the TensorFlow Inception
graph `inception-2015-12-05`. pytorch-fid (M. Seitzer) ported those weights to
`pt_inception-2015-12-05-6726825d.pth` and patched torchvision's Inception blocks to match TF:
FIDInceptionA/C/E_1 average-pool without counting padding, FIDInceptionE_2 max-pools. PAPER.md
uses exactly these features. This module rebuilds that network (same module names, so the
pytorch-fid state_dict loads unchanged) and its preprocessing: bilinear resize to 299x299
(align_corners=False, no antialias) of images in [0, 1], then scaling to [-1, 1].

Weights come from `--inception-weights PATH`, else the cache (`$DIFFPRUNE_CACHE` or
`~/.cache/diffprune`), else a download from the pytorch-fid release when online (with a timeout).
The `.pth` file is a pickle, so before it is unpickled (`torch.load(..., weights_only=True)`, never
the full unpickler) two checks hold, wherever the file came from: its SHA-256 equals that of
pytorch-fid's release asset (`FID_WEIGHTS_SHA256`; the `6726825d` in the file name is its prefix,
torch.hub's `check_hash` convention), and torch is >= 2.6 (torch < 2.6 has CVE-2025-32434: its
weights-only loader can be made to run code). A safetensors conversion (`.safetensors`, no pickle)
skips both and is accepted as it is; its tensors are still checked by name and shape.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffpruneError
from ..fsutil import atomic_write
from .extractor_base import FeatureExtractor
from .fid import PYTORCH_FID_EXTRACTOR

logger = logging.getLogger(__name__)

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
# SHA-256 of the release asset above (95,628,359 bytes). Not printed by pytorch-fid itself (it loads the
# URL without check_hash); this digest is the one public projects pin for that URL (e.g. genforce's
# metrics/inception.py `_MODEL_URL_SHA256["tf_inception_v3"]`), and it starts with the file name's 6726825d.
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
MIN_TORCH_FOR_PICKLE = (2, 6)  # torch < 2.6: CVE-2025-32434, torch.load(weights_only=True) can run code
DOWNLOAD_TIMEOUT_S = 20.0
EXTRACTOR_NAME = PYTORCH_FID_EXTRACTOR  # "inception-v3-pytorch-fid"


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm(eps=1e-3) + ReLU, as in torchvision's Inception3."""

    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # TF's average pool ignores padded zeros
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """E_1 (`max_pool=False`: average pool without padding) and E_2 (`max_pool=True`) of pytorch-fid."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 up to pool3; input (N, 3, H, W) in [0, 1], output (N, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def cache_dir() -> Path:
    """`$DIFFPRUNE_CACHE`, else `~/.cache/diffprune`."""
    return Path(os.environ.get("DIFFPRUNE_CACHE") or Path.home() / ".cache" / "diffprune")


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes")
        for v in ("DIFFPRUNE_OFFLINE", "HF_HUB_OFFLINE")
    )


def _how_to_get(target: Path) -> str:
    return (
        f"download {FID_WEIGHTS_URL} (about 92 MB), e.g. `curl -L -o {target} {FID_WEIGHTS_URL}`, "
        "then pass --inception-weights PATH or leave it in that cache path; or use --feature-net digits "
        "for digits data"
    )


def resolve_inception_weights(
    path: str | Path | None = None, allow_download: bool = True, timeout_s: float = DOWNLOAD_TIMEOUT_S
) -> Path:
    """The weights file: `path` if given, else the cache, else downloaded into the cache (when online).

    Never hangs: the download uses a socket timeout, and `DIFFPRUNE_OFFLINE=1` / `HF_HUB_OFFLINE=1`
    or `allow_download=False` skip it. Missing weights raise a DiffpruneError saying how to get them.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DiffpruneError(f"--inception-weights {str(p)!r} does not exist; {_how_to_get(p)}")
        return p
    cache = cache_dir()
    for name in (FID_WEIGHTS_NAME, Path(FID_WEIGHTS_NAME).with_suffix(".safetensors").name):
        if (cache / name).is_file():
            return cache / name
    target = cache / FID_WEIGHTS_NAME
    if not allow_download or _offline():
        raise DiffpruneError(
            f"Inception weights not found in {cache} and downloads are off; {_how_to_get(target)}"
        )
    logger.warning("downloading the pytorch-fid Inception weights to %s", target)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: _download(tmp, target, timeout_s))
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DiffpruneError(
            f"Inception weights not in {cache} and the download failed "
            f"({type(err).__name__}: {err}); {_how_to_get(target)}"
        ) from None
    return target


def _download(tmp: Path, target: Path, timeout_s: float) -> None:
    """Stream the pytorch-fid weights into `tmp`, refusing a file whose SHA-256 does not match."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=timeout_s) as resp, open(tmp, "wb") as fh:
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            fh.write(chunk)
    if digest.hexdigest() != FID_WEIGHTS_SHA256:
        raise DiffpruneError(
            f"downloaded Inception weights have SHA-256 {digest.hexdigest()[:16]}..., "
            f"expected {FID_WEIGHTS_SHA256[:16]}... (pytorch-fid's file); {_how_to_get(target)}"
        )


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _torch_version(text: str | None = None) -> tuple[int, int]:
    """(major, minor) of `text` (default: the running torch), e.g. "2.5.1+cu121" -> (2, 5)."""
    parts = str(text if text is not None else torch.__version__).split("+")[0].split(".")
    nums = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts[:2]]
    return (nums + [0, 0])[0], (nums + [0, 0])[1]


def check_pickle_allowed(path: Path) -> None:
    """Before a `.pth` is unpickled: torch >= 2.6 and the SHA-256 of pytorch-fid's file, else one-line refusal."""
    if _torch_version() < MIN_TORCH_FOR_PICKLE:
        need = ".".join(map(str, MIN_TORCH_FOR_PICKLE))
        raise DiffpruneError(
            f"{path}: unpickling a .pth needs torch >= {need} (torch {torch.__version__} has CVE-2025-32434, "
            f"torch.load(weights_only=True) can run code); upgrade torch, or pass a .safetensors conversion made "
            f"on torch >= {need}: safetensors.torch.save_file(torch.load(pth, weights_only=True), 'w.safetensors')"
        )
    try:
        actual = file_sha256(path)
    except OSError as err:
        raise DiffpruneError(f"{path}: cannot read the Inception weights ({err.strerror or err})") from None
    if actual != FID_WEIGHTS_SHA256:
        raise DiffpruneError(
            f"{path}: SHA-256 {actual[:16]}... is not that of pytorch-fid's {FID_WEIGHTS_NAME} "
            f"({FID_WEIGHTS_SHA256[:16]}...); refusing to unpickle it. Use that file ({FID_WEIGHTS_URL}) "
            "or a .safetensors conversion"
        )


def load_inception_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from `.safetensors`, or from pytorch-fid's `.pth` (checked first, then weights-only)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        check_pickle_allowed(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt files raise many types
        raise DiffpruneError(
            f"{path}: not a readable Inception state_dict ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); {_how_to_get(path)}"
        ) from None
    if not isinstance(state, dict):
        raise DiffpruneError(f"{path}: holds a {type(state).__name__}, expected a state_dict of tensors")
    return state


def build_fid_inception(weights: str | Path) -> FIDInceptionV3:
    """FIDInceptionV3 with the state_dict at `weights`; refuses missing or mis-shaped tensors."""
    model = FIDInceptionV3()
    state = load_inception_state(weights)
    own = model.state_dict()
    needed = [k for k in own if not k.endswith("num_batches_tracked")]
    missing = [k for k in needed if k not in state]
    if missing:
        raise DiffpruneError(
            f"{weights}: not the pytorch-fid Inception weights; {len(missing)} tensors "
            f"missing, e.g. {missing[:3]}"
        )
    bad = [k for k in needed if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise DiffpruneError(
            f"{weights}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}"
        )
    model.load_state_dict({k: state[k] for k in needed}, strict=False)
    return model.eval().requires_grad_(False)


class InceptionFeatureExtractor(FeatureExtractor):
    """pool3 features (2048-d) of pytorch-fid's InceptionV3; grayscale inputs are repeated to RGB."""

    name = EXTRACTOR_NAME
    dim = 2048
    input_size = 299
    input_channels = 3

    def __init__(
        self,
        weights: str | Path | None = None,
        device="cpu",
        batch_size: int = 50,
        allow_download: bool = True,
    ):
        super().__init__(device, batch_size)
        self.weights_path = resolve_inception_weights(weights, allow_download)
        self.model = build_fid_inception(self.weights_path).to(self.device)

    def forward_features(self, x):
        return self.model(x)  # resizes to 299x299 and scales [0, 1] -> [-1, 1] itself, as pytorch-fid


__all__ = [
    "EXTRACTOR_NAME",
    "FID_WEIGHTS_SHA256",
    "FID_WEIGHTS_URL",
    "FIDInceptionV3",
    "InceptionFeatureExtractor",
    "build_fid_inception",
    "cache_dir",
    "check_pickle_allowed",
    "file_sha256",
    "load_inception_state",
    "resolve_inception_weights",
]
