"""Image files in: header-only size checks, a pixel limit, reduced decoding, and every pixel mode's range.

Covers `diffprune.data` (training/calibration images in [-1, 1]) and `diffprune.metrics.imageset`
(uint8 images for metrics), which share `data.read_image`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from diffprune import data
from diffprune.cli import main
from diffprune.errors import DiffpruneError
from diffprune.metrics.imageset import load_image_set

HUGE = (13000, 13000)  # 169 Mpx: over MAX_IMAGE_PIXELS, under Pillow's error limit (it only warns)
BOMB = (13400, 13400)  # 179.6 Mpx: over Pillow's DecompressionBombError limit (2 * 89478485)


def _digests(folder) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _small_pngs(folder, n=3, size=(24, 20)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="module")
def big_files(tmp_path_factory):
    """Constant grayscale PNGs: compress to ~0.2 MB although they decode to 169 and 180 MB."""
    root = tmp_path_factory.mktemp("big")
    files = {}
    for name, size in (("huge", HUGE), ("bomb", BOMB)):
        files[name] = root / f"{name}.png"
        Image.new("L", size, 120).save(files[name])
    assert Image.MAX_IMAGE_PIXELS < HUGE[0] * HUGE[1] < 2 * Image.MAX_IMAGE_PIXELS < BOMB[0] * BOMB[1]
    return files


def _one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.startswith("diffprune evaluate: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


# --------------------------------------------------------------------------- size from the header


def test_folder_check_reads_headers_not_pixels(tmp_path, big_files, monkeypatch):
    folder = _small_pngs(tmp_path / "imgs")
    (folder / "huge.png").write_bytes(big_files["huge"].read_bytes())
    crc = bytearray((folder / "000000.png").read_bytes())
    crc[200] ^= 0xFF  # inside IDAT: only a CRC check (verify) or a decode can notice
    (folder / "bad_crc.png").write_bytes(bytes(crc))
    (folder / "cut.png").write_bytes((folder / "000001.png").read_bytes()[:-100])
    before = _digests(folder)
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: loads.append(im.size) or original(im))
    ds = data.ImageFolderDataset(folder, 16, 3)
    assert loads == []  # no pixel of any PNG was decoded to check the folder
    assert ds.skipped == 3 and [p.name for p in ds.paths] == ["000000.png", "000001.png", "000002.png"]
    reasons = "\n".join(ds.skip_reasons)
    assert "huge.png: 13000x13000 image has 169000000 pixels, over the limit of 67108864" in reasons
    assert "bad_crc.png: damaged image" in reasons and "cut.png: damaged image" in reasons
    assert ds[0].shape == (3, 16, 16) and set(loads) == {(20, 24)}  # now the one image asked for
    assert _digests(folder) == before


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_loading_a_folder_with_huge_images_stays_small(tmp_path, big_files):
    folder = _small_pngs(tmp_path / "imgs")
    for name in ("huge", "bomb"):
        (folder / f"{name}.png").write_bytes(big_files[name].read_bytes())
    Image.new("RGB", (8000, 8000), (10, 200, 30)).save(folder / "near_limit.png")  # 64 Mpx: read, reduced
    before = _digests(folder)
    child = (
        "import json, resource, sys\n"
        "from diffprune.data import ImageFolderDataset, first_batch\n"
        "ds = ImageFolderDataset(sys.argv[1], 32, 3)\n"
        "batch = first_batch(ds, 8, 0)\n"
        "print(json.dumps({'n': len(ds), 'skipped': ds.skipped, 'reasons': ds.skip_reasons,\n"
        "    'shape': list(batch.shape), 'max': float(batch.abs().max()),\n"
        "    'peak_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", child, str(folder)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "DecompressionBombWarning" not in run.stderr
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["n"] == 4 and res["skipped"] == 2 and res["shape"] == [4, 3, 32, 32] and res["max"] <= 1
    assert any("huge.png: 13000x13000" in r for r in res["reasons"])
    assert any("bomb.png" in r and "decompression-bomb" in r for r in res["reasons"])
    assert res["peak_kib"] * 1024 < 1.5e9, f"peak RSS {res['peak_kib'] / 2**20:.2f} GiB"
    assert _digests(folder) == before


@pytest.mark.parametrize("flag, name, needle", [
    ("--reference", "bomb", "over Pillow's decompression-bomb limit"),
    ("--reference", "huge", "13000x13000 image has 169000000 pixels, over the limit of 67108864"),
    ("--samples", "huge", "13000x13000 image has 169000000 pixels, over the limit of 67108864"),
])
def test_evaluate_refuses_oversized_images_in_one_line(tmp_path, big_files, capsys, flag, name, needle):
    samples = _small_pngs(tmp_path / "samples", n=12, size=(16, 16))
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "000000.png").write_bytes(big_files[name].read_bytes())
    before = _digests(tmp_path)
    args = {"--samples": str(samples), "--reference": str(ref)}
    if flag == "--samples":
        args = {"--samples": str(ref), "--reference": "digits"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["evaluate", *[x for kv in args.items() for x in kv], "--output", str(tmp_path / "o.json")])
    _one_line_error(code, capsys.readouterr().err, needle, str(ref / "000000.png"))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert _digests(tmp_path) == before and not (tmp_path / "o.json").exists()


# --------------------------------------------------------------------------- reduced decoding


def _full_decode_and_resize(path, size, channels):
    """The reference: full-size decode, `_fit`'s center crop and antialiased bilinear resize, in [-1, 1]."""
    with Image.open(path) as im:
        x = torch.from_numpy(np.asarray(im.convert("L" if channels == 1 else "RGB"), np.float32) / 127.5 - 1)
    x = (x[..., None] if x.ndim == 2 else x).permute(2, 0, 1)
    _, h, w = x.shape
    side = min(h, w)
    x = x[:, (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    if side != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=side > size, align_corners=False)[0]
    return x.clamp(-1, 1)


def test_large_images_decode_reduced_with_the_same_result(tmp_path):
    h, w = 2100, 1700
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    smooth = np.stack([128 + 100 * np.sin(xx / 97 + c) * np.cos(yy / 131 - c) for c in range(3)], -1)
    texture = np.random.default_rng(0).normal(0, 20, (h, w, 3))
    pixels = np.clip(smooth + texture, 0, 255).astype(np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "a.png")
    Image.fromarray(pixels).save(folder / "b.jpg", quality=95)
    Image.fromarray(pixels[:120, :100]).save(folder / "c.png")  # < 4x the target: the usual path
    before = _digests(folder)
    for size, channels in ((32, 3), (64, 1)):
        ds = data.ImageFolderDataset(folder, size, channels, cache_bytes=0)
        for i, path in enumerate(ds.paths):
            got, want = ds[i], _full_decode_and_resize(path, size, channels)
            if path.name == "c.png":
                assert torch.equal(got, want), "images under 4x the target must resize exactly as before"
                continue
            reduced = data.read_image(path, channels, size)[0]
            assert max(reduced.shape[:2]) <= 8 * size, (path.name, reduced.shape)  # decoded reduced
            diff = (got - want).abs()
            assert float(diff.max()) < 0.02 and float(diff.mean()) < 0.005, (path.name, size, diff.max(), diff.mean())
    assert _digests(folder) == before


# --------------------------------------------------------------------------- pixel modes


def _mode_cases(folder):
    """(file, expected model-range image in [0, 1] or None if refused, expected uint8 set image, needle)."""
    grid = np.arange(16 * 16).reshape(16, 16)
    cases = []

    def add(name, image, unit, uint8, needle=None, **save):
        path = folder / name / "000000.png"
        path.parent.mkdir()
        image.save(path, **save)
        cases.append((path, unit, uint8, needle))

    sixteen = np.array([0, 25828, 25829, 32768, 65535, 257])[grid % 6]
    rounded = np.array([0, 100, 101, 128, 255, 1])[grid % 6]  # round(v / 257), written out by hand
    add("i16", Image.fromarray(sixteen.astype(np.uint16)), sixteen / 65535, rounded)
    add("i16b", Image.fromarray(sixteen.astype(">u2")), sixteen / 65535, rounded, format="TIFF")
    add("i32", Image.fromarray(sixteen.astype(np.int32)), sixteen / 65535, rounded, format="TIFF")
    add("i32_wide", Image.fromarray((sixteen * 2).astype(np.int32)), None, None, "span 0..131070", format="TIFF")
    add("float", Image.fromarray(grid.astype(np.float32) / 255), None, None, "pixel mode 'F'", format="TIFF")
    add("lab", Image.new("LAB", (16, 16)), None, None, "pixel mode 'LAB'", format="TIFF")
    gray = (grid % 256).astype(np.uint8)
    add("l", Image.fromarray(gray), gray / 255, gray)
    add("la", Image.merge("LA", [Image.fromarray(gray), Image.fromarray(255 - gray)]), gray / 255, gray)
    rgb = np.stack([gray, 255 - gray, np.roll(gray, 3)], -1)
    add("rgba", Image.fromarray(np.dstack([rgb, gray])), rgb / 255, rgb)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    p = Image.frombytes("P", (16, 16), (grid % 4).astype(np.uint8).tobytes())
    p.putpalette(palette.ravel().tolist())
    add("p_alpha", p, palette[grid % 4] / 255, palette[grid % 4], transparency=bytes([255, 128, 0, 255]))
    add("p_index", p, palette[grid % 4] / 255, palette[grid % 4], transparency=2)
    cmyk = Image.new("CMYK", (16, 16), (0, 100, 0, 60))
    cmyk_rgb = np.broadcast_to((255 - np.array([0, 100, 0])) * (255 - 60) / 255, (16, 16, 3))  # no ICC profile
    add("cmyk", cmyk, cmyk_rgb / 255, np.rint(cmyk_rgb), format="JPEG", quality=100)
    return cases


def _hw_or_hwc(image: np.ndarray) -> np.ndarray:
    return image[..., 0] if image.shape[-1] == 1 else image


def test_every_pixel_mode_maps_to_its_range_or_is_refused(tmp_path):
    failures = []
    for path, unit, uint8, needle in _mode_cases(tmp_path):
        before = _digests(path.parent)
        channels = 1 if unit is not None and unit.ndim == 2 else 3
        tol = 2 / 255 if "cmyk" in str(path) else 1e-6  # JPEG: lossy even at quality 100
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. Pillow's palette-transparency warning
            try:
                ds = data.ImageFolderDataset(path.parent, 16, channels)
                x = _hw_or_hwc(ds[0].permute(1, 2, 0).double().numpy())
                ok = unit is not None and np.allclose(x, unit * 2 - 1, atol=tol, rtol=0)
                want = None if unit is None else unit.reshape(-1)[:4]
                why = "" if ok else f"data: got {x.reshape(-1)[:4]}, want {want}"
            except DiffpruneError as err:
                ok, why = unit is None and needle in str(err) and "\n" not in str(err), f"data: {err}"
            if ok:
                try:
                    got = _hw_or_hwc(load_image_set(path.parent).images[0])
                    ok = uint8 is not None and np.abs(got.astype(int) - uint8).max() <= (2 if tol > 1e-6 else 0)
                    want = None if uint8 is None else uint8.reshape(-1)[:4]
                    why = "" if ok else f"set: got {got.reshape(-1)[:4]}, want {want}"
                except DiffpruneError as err:
                    ok = uint8 is None and needle in str(err) and str(path) in str(err) and "\n" not in str(err)
                    why = f"set: {err}"
        if not ok:
            failures.append(f"{path.parent.name}: {why}")
        assert _digests(path.parent) == before
    assert not failures, "\n".join(failures)


def test_sixteen_bit_files_read_like_their_eight_bit_originals(tmp_path):
    """v * 257 in 16 bits is v in 8 bits: both readers must return the same images from either."""
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (12, 16, 16), dtype=np.uint8)
    for name, arrays in (("eight", eight), ("sixteen", eight.astype(np.uint16) * 257)):
        (tmp_path / name).mkdir()
        for i, a in enumerate(arrays):
            Image.fromarray(a).save(tmp_path / name / f"{i:06d}.png")
    a, b = load_image_set(tmp_path / "eight"), load_image_set(tmp_path / "sixteen")
    assert np.array_equal(a.images, b.images)
    x8 = data.ImageFolderDataset(tmp_path / "eight", 16, 1)[3]
    x16 = data.ImageFolderDataset(tmp_path / "sixteen", 16, 1)[3]
    assert torch.allclose(x8, x16, atol=1e-6) and float(x16.max()) < 1  # was: every pixel white
