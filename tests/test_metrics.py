"""metrics/: FID, KID, feature extractors, image sets, SSIM, latency. Tiny data, no network."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from diffprune.errors import DiffpruneError
from diffprune.metrics import fid as fidm
from diffprune.metrics import imageset, inception, latency, ssim
from diffprune.metrics.digits_net import DigitsFeatureExtractor, load_digits_net
from diffprune.metrics.features import get_feature_extractor


def _uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 NHWC."""
    return ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def digits_uint8():
    from diffprune.data import digits_images

    return _uint8(digits_images(16, 1, "train")), _uint8(digits_images(16, 1, "test"))


@pytest.fixture(scope="module")
def digits_extractor():
    return DigitsFeatureExtractor()


# --------------------------------------------------------------------------- Frechet / KID


def test_frechet_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 2, size=5), rng.uniform(0.1, 2, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert fidm.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_sqrtm_and_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(200, 8)), rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.5
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    ours = fidm.frechet_distance(mu1, s1, mu2, s2)
    ref = (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    )
    tm = float(
        _compute_fid(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2), torch.from_numpy(s2))
    )
    assert ours == pytest.approx(ref, rel=1e-8)
    assert ours == pytest.approx(tm, rel=1e-6)


def test_frechet_identical_and_singular():
    f = np.random.default_rng(2).normal(size=(12, 30))  # n < dim: singular covariance
    st = fidm.compute_stats(f, "x")
    assert fidm.frechet_distance(st.mu, st.sigma, st.mu, st.sigma) == pytest.approx(0, abs=1e-8)
    with pytest.raises(DiffpruneError, match="same feature extractor"):
        fidm.frechet_distance(st.mu, st.sigma, st.mu[:3], st.sigma[:3, :3])


def test_kid_matches_torchmetrics_and_same_distribution():
    from torchmetrics.image.kid import maximum_mean_discrepancy, poly_kernel

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(60, 16)), rng.normal(size=(60, 16))
    kid = fidm.kernel_inception_distance(a, b, subsets=1, subset_size=60)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    tm = float(maximum_mean_discrepancy(poly_kernel(ta, ta), poly_kernel(ta, tb), poly_kernel(tb, tb)))
    assert kid["mean"] == pytest.approx(tm, rel=1e-8)
    same = fidm.kernel_inception_distance(
        rng.normal(size=(300, 16)), rng.normal(size=(300, 16)), subsets=20, subset_size=100
    )
    shifted = fidm.kernel_inception_distance(
        rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) + 1, subsets=20, subset_size=100
    )
    assert abs(same["mean"]) < 0.05 < shifted["mean"]
    assert same["subset_size"] == 100
    assert fidm.kernel_inception_distance(a, b, subsets=2)["subset_size"] == 60  # capped at n


def test_sample_count_rules():
    with pytest.raises(DiffpruneError, match="at least 10"):
        fidm.check_count(9, 64, "samples x")
    assert (
        fidm.check_count(20, 64, "samples x")
        and "fewer than the feature dimension" in fidm.check_count(20, 64, "s")[0]
    )
    assert fidm.check_count(100, 64, "samples x") == []


def test_stats_roundtrip(tmp_path):
    f = np.random.default_rng(4).normal(size=(20, 4))
    st = fidm.compute_stats(f, "digits-cnn-v1")
    path = fidm.save_stats(tmp_path / "s.npz", st)
    back = fidm.load_stats(path)
    assert back.feature_extractor == "digits-cnn-v1" and back.num_images == 20
    np.testing.assert_array_equal(back.sigma, st.sigma)
    np.testing.assert_allclose(back.features, f, rtol=1e-6)
    np.savez(tmp_path / "pf.npz", mu=st.mu, sigma=st.sigma)  # pytorch-fid's format: mu/sigma only
    assert fidm.load_stats(tmp_path / "pf.npz").feature_extractor == inception.EXTRACTOR_NAME
    with pytest.raises(DiffpruneError, match=r"\.npz"):
        fidm.save_stats(tmp_path / "s.txt", st)


# --------------------------------------------------------------------------- digits feature net


def test_digits_net_asset_and_accuracy():
    from diffprune.data import digits_images, digits_labels

    model, config = load_digits_net()
    assert config["name"] == "digits-cnn-v1" and config["test_accuracy"] >= 0.97
    with torch.no_grad():
        acc = (model(digits_images(16, 1, "test")).argmax(1) == digits_labels("test")).float().mean().item()
    assert acc == pytest.approx(config["test_accuracy"], abs=1e-3)


def test_digits_fid_orders_perturbations(digits_uint8, digits_extractor):
    train, test = digits_uint8
    ref = fidm.compute_stats(digits_extractor(train), digits_extractor.name)
    feats = digits_extractor(test)
    assert feats.shape == (len(test), 64) and feats.dtype == np.float64

    def fid_of(images):
        s = fidm.compute_stats(digits_extractor(images), digits_extractor.name)
        return fidm.frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)

    rng = np.random.default_rng(0)
    noisy = np.clip(test.astype(int) + rng.integers(-8, 9, test.shape), 0, 255).astype(np.uint8)
    shifted = np.roll(test, 4, axis=2)
    s_test = fidm.compute_stats(feats, "x")
    assert fidm.frechet_distance(s_test.mu, s_test.sigma, s_test.mu, s_test.sigma) < 1e-6
    assert fid_of(test) < fid_of(noisy) * 1.5
    assert fid_of(noisy) < fid_of(shifted)


def test_digits_extractor_converts_rgb_and_size(digits_uint8):
    ex = DigitsFeatureExtractor()
    rgb32 = np.repeat(np.repeat(np.repeat(digits_uint8[1][:4], 2, 1), 2, 2), 3, 3)
    assert ex(rgb32).shape == (4, 64)
    assert any("grayscale" in c for c in ex.conversions) and any("resized" in c for c in ex.conversions)
    # float NCHW in [-1, 1] gives the same features as uint8 NHWC
    x = torch.from_numpy(digits_uint8[1][:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_allclose(ex(x), ex(digits_uint8[1][:4]), atol=1e-5)


# --------------------------------------------------------------------------- Inception (no network)


def _fake_inception_weights(path, safetensors=False):
    torch.manual_seed(0)
    state = {}
    for k, v in inception.FIDInceptionV3().state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        state[k] = torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.05
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048), torch.zeros(1008)
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def test_inception_loads_state_dict_and_extracts(tmp_path, monkeypatch):
    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    state = _fake_inception_weights(pth)
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256", inception.file_sha256(pth))  # stands in for the real file
    ex = get_feature_extractor("inception", inception_weights=str(pth))
    assert ex.name == "inception-v3-pytorch-fid" and ex.dim == 2048
    torch.testing.assert_close(
        ex.model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"]
    )
    gray = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    f = ex(gray)
    assert f.shape == (2, 2048) and np.isfinite(f).all() and f.dtype == np.float64
    assert any("grayscale images converted to RGB" in c for c in ex.conversions)
    st = tmp_path / "w.safetensors"
    _fake_inception_weights(st, safetensors=True)
    ex2 = inception.InceptionFeatureExtractor(st)
    np.testing.assert_allclose(ex2(gray), f, rtol=1e-4, atol=1e-5)


def test_inception_refuses_wrong_weights(tmp_path, monkeypatch):
    """Past the digest check (patched to each file's own), wrong tensors and junk are still refused."""
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256", inception.file_sha256(bad))
    with pytest.raises(DiffpruneError, match="not the pytorch-fid Inception weights"):
        inception.InceptionFeatureExtractor(bad)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256", inception.file_sha256(tmp_path / "junk.pth"))
    with pytest.raises(DiffpruneError, match="not a readable Inception state_dict"):
        inception.InceptionFeatureExtractor(tmp_path / "junk.pth")


def _no_unpickling(monkeypatch) -> list:
    """Make torch.load record its calls and fail: the caller asserts the list stays empty (a broad
    `except Exception` around torch.load must not hide the call)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load was called on a file that should have been refused")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


def test_inception_pth_with_another_digest_is_refused_unread(tmp_path, monkeypatch, capsys):
    """Issue 23: a valid small state-dict pickle whose SHA-256 is not pytorch-fid's is refused in one line
    (file, expected and actual digest prefixes) and never unpickled, by the API and by the CLI."""
    import hashlib

    from diffprune.cli import main

    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, pth)
    actual = hashlib.sha256(pth.read_bytes()).hexdigest()
    assert actual[:8] != "6726825d"
    unpickled = _no_unpickling(monkeypatch)
    with pytest.raises(DiffpruneError) as err:
        inception.load_inception_state(pth)
    assert unpickled == []
    msg = str(err.value)
    assert "\n" not in msg and str(pth) in msg and actual[:16] in msg and "6726825d0af5f729" in msg
    assert inception.FID_WEIGHTS_SHA256 == "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
    assert "refusing to unpickle" in msg
    samples = tmp_path / "s"
    samples.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8) + i).save(samples / f"{i:06d}.png")
    code = main(["evaluate", "--samples", str(samples), "--reference", str(samples), "--feature-net", "inception",
                 "--inception-weights", str(pth), "--output", str(tmp_path / "e.json")])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text.count("\n") == 1 and "refusing to unpickle" in err_text
    assert not (tmp_path / "e.json").exists() and unpickled == []


def test_inception_pth_needs_torch_2_6(tmp_path, monkeypatch):
    """torch < 2.6 (CVE-2025-32434): a .pth is refused before it is hashed or unpickled, even pytorch-fid's
    own; a .safetensors conversion is still loaded (no pickle, no digest)."""
    pth = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, pth)
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256", inception.file_sha256(pth))
    assert inception._torch_version("2.5.1+cu121") == (2, 5) and inception._torch_version("2.13.0+cpu") == (2, 13)
    assert inception._torch_version("2.6.0a0+git1234") == (2, 6)
    monkeypatch.setattr(inception, "_torch_version", lambda text=None: (2, 5))
    monkeypatch.setattr(inception, "file_sha256", lambda path: pytest.fail("hashed before the torch check"))
    unpickled = _no_unpickling(monkeypatch)
    with pytest.raises(DiffpruneError, match=r"needs torch >= 2\.6 .*CVE-2025-32434.*\.safetensors"):
        inception.load_inception_state(pth)
    assert unpickled == []
    st = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(st))
    assert torch.equal(inception.load_inception_state(st)["x"], torch.ones(2))


def test_inception_missing_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIFFPRUNE_OFFLINE", "1")
    with pytest.raises(DiffpruneError, match="downloads are off.*pytorch-fid/releases"):
        inception.resolve_inception_weights()
    monkeypatch.delenv("DIFFPRUNE_OFFLINE")

    def no_network(*args, **kwargs):
        assert kwargs.get("timeout"), "download must use a timeout"
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(inception.urllib.request, "urlopen", no_network)
    with pytest.raises(DiffpruneError, match="download failed.*curl -L -o"):
        inception.resolve_inception_weights()
    with pytest.raises(DiffpruneError, match="does not exist"):
        inception.resolve_inception_weights(tmp_path / "nope.pth")



def test_inception_download_is_checked_then_renamed_into_the_cache(tmp_path, monkeypatch):
    """The download streams into a temp sibling; a wrong SHA-256 leaves nothing, a right one the file."""
    import hashlib
    import io

    payload = b"fake weights " * 1000
    monkeypatch.setenv("DIFFPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFPRUNE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(inception.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    with pytest.raises(DiffpruneError, match="SHA-256 .* expected 6726825d0af5f729"):
        inception.resolve_inception_weights()
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file, no temp file
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256", hashlib.sha256(payload).hexdigest())
    path = inception.resolve_inception_weights()
    assert path.read_bytes() == payload and [p.name for p in path.parent.iterdir()] == [path.name]

# --------------------------------------------------------------------------- image sets, SSIM


def _write_pngs(folder, images, indices):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in zip(indices, images, strict=True):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(folder / f"{i:06d}.png")
    return folder


def test_imageset_pairs_by_index_not_order(tmp_path, digits_uint8):
    imgs = digits_uint8[1][:12]
    teacher = imageset.load_image_set(_write_pngs(tmp_path / "t", imgs, range(12)))
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "t" / "grid.png")  # ignored
    teacher = imageset.load_image_set(tmp_path / "t")
    order = np.random.default_rng(0).permutation(12)
    np.savez(tmp_path / "s.npz", images=imgs[order], indices=order)  # shuffled file order
    student = imageset.load_image_set(tmp_path / "s.npz")
    assert teacher.keys == student.keys == list(range(12))
    res = ssim.consistency(teacher, student)
    assert res["ssim"]["mean"] == pytest.approx(1.0) and res["mse"]["mean"] == 0
    assert res["psnr_db"]["mean"] == ssim.PSNR_CAP_DB and len(res["ssim"]["per_image"]) == 12


def test_ssim_drops_with_noise_and_refuses_unpaired(tmp_path, digits_uint8):
    imgs = digits_uint8[1][:10]
    noisy = np.clip(imgs.astype(int) + np.random.default_rng(0).integers(-40, 41, imgs.shape), 0, 255).astype(
        np.uint8
    )
    v = ssim.ssim_per_image(imgs, noisy)
    assert v.shape == (10,) and (v < 0.99).all() and (v > 0).all()
    a = imageset.ImageSet(imgs, list(range(10)), "A")
    b = imageset.ImageSet(imgs[:8], list(range(2, 10)), "B")
    with pytest.raises(DiffpruneError, match=r"only in the first: \[0, 1\]"):
        ssim.consistency(a, b)
    c = imageset.ImageSet(np.repeat(imgs, 3, axis=3), list(range(10)), "C")
    with pytest.raises(DiffpruneError, match="channel counts differ"):
        ssim.consistency(a, c)
    tiny = imageset.ImageSet(imgs[:, :8, :8], list(range(10)), "T")
    with pytest.raises(DiffpruneError, match="needs at least 11x11"):
        ssim.consistency(tiny, tiny)


def test_imageset_errors(tmp_path, digits_uint8):
    folder = _write_pngs(tmp_path / "mixed", digits_uint8[1][:3], range(3))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "000003.png")
    with pytest.raises(
        DiffpruneError, match=r"different sizes: 16x16 \(3 files.*32x32 \(1 files, e.g. 000003.png"
    ):
        imageset.load_image_set(folder)
    with pytest.raises(DiffpruneError, match="does not exist"):
        imageset.load_image_set(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffpruneError, match="no images"):
        imageset.load_image_set(tmp_path / "empty")
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4, 1), np.float32))
    with pytest.raises(DiffpruneError, match="dtype float32; expected uint8"):
        imageset.load_image_set(tmp_path / "f.npz")
    rgb = _write_pngs(tmp_path / "mix", digits_uint8[1][:2], range(2))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(rgb / "000002.png")
    s = imageset.load_image_set(rgb)
    assert s.channels == 3 and "grayscale files converted to RGB" in s.notes[0]


# --------------------------------------------------------------------------- SSIM convention


def _gauss_taps(size=11, sigma=1.5):
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _ssim_numpy(a, b):
    """Wang et al. 2004 eq. 13 from scratch (numpy): [0, 1] images, C = (K L)^2 with L = 1, local
    moments from an 11-tap sigma-1.5 Gaussian over 'valid' windows only, per-image mean over pixels
    and channels. a, b: uint8 (N, H, W, C)."""
    g = _gauss_taps()
    win = np.lib.stride_tricks.sliding_window_view

    def blur(v):  # (N, H, W, C): valid windows along H, then along W
        v = win(v, 11, axis=1) @ g
        return win(v, 11, axis=2) @ g

    # [0, 1] images as to_tensor gives them (float32 u8 / 255); the statistics in float64
    x, y = (v.astype(np.float32) / np.float32(255) for v in (a, b))
    x, y = x.astype(np.float64), y.astype(np.float64)
    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.reshape(len(s), -1).mean(1)


def _ssim_pairs(n, size, channels, seed=0):
    """Random pairs, and smooth structured images with a noisy copy."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size, channels)
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 6, (n, 1, 1, channels))
    smooth = 127 + 100 * np.sin(9 * xx[None, ..., None] + phase) * np.cos(5 * yy[None, ..., None])
    smooth = smooth.round().astype(np.uint8)
    noisy = np.clip(smooth.astype(int) + rng.integers(-40, 41, shape), 0, 255).astype(np.uint8)
    return {
        "random": (rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8)),
        "structured+noise": (smooth, noisy),
    }


@pytest.mark.parametrize("n, size, channels", [(8, 16, 1), (6, 32, 3), (2, 256, 3), (4, 11, 1)])
def test_ssim_matches_pytorch_msssim_and_formula(n, size, channels):
    """Our SSIM is the paper script's convention (pytorch_msssim, data_range 1, per image), whatever
    torchmetrics is installed: within 1e-5 of pytorch_msssim and 1e-10 of the numpy formula."""
    from pytorch_msssim import ssim as msssim

    for name, (a, b) in _ssim_pairs(n, size, channels).items():
        ours = ssim.ssim_per_image(a, b)
        assert ours.shape == (n,) and ours.dtype == np.float64
        np.testing.assert_allclose(ours, _ssim_numpy(a, b), rtol=0, atol=1e-10, err_msg=name)
        x, y = (torch.from_numpy(v).permute(0, 3, 1, 2).double() / 255 for v in (a, b))
        ref = msssim(x, y, data_range=1, size_average=False).numpy()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5, err_msg=name)
    a, b = _ssim_pairs(n, size, channels)["structured+noise"]
    assert ssim.ssim_per_image(a, a) == pytest.approx(np.ones(n))  # identical pairs: exactly the maximum


def test_ssim_convention_is_recorded():
    a, b = _ssim_pairs(10, 16, 1)["structured+noise"]
    res = ssim.consistency(
        imageset.ImageSet(a, list(range(10)), "A"), imageset.ImageSet(b, list(range(10)), "B")
    )
    conv = res["ssim_convention"]
    assert conv["kernel_size"] == 11 and conv["sigma"] == 1.5 and (conv["k1"], conv["k2"]) == (0.01, 0.03)
    assert conv["data_range"] == 1.0 and "valid" in conv["filter"] and "pytorch_msssim" in conv["reference"]
    np.testing.assert_allclose(res["ssim"]["per_image"], _ssim_numpy(a, b), atol=1e-10)


# --------------------------------------------------------------------------- pytorch-fid's input batch


def _to_tensor_batch(files, mode):
    """pytorch-fid's batch: PIL convert(mode), torchvision `to_tensor` per image (HWC -> CHW
    `.contiguous()`, float32, `.div(255)`), then default_collate's torch.stack."""
    out = []
    for f in files:
        with Image.open(f) as im:
            a = np.array(im.convert(mode))
        t = torch.from_numpy(a).view(a.shape[0], a.shape[1], -1)
        out.append(t.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255))
    return torch.stack(out)


def test_inception_features_of_pngs_equal_pytorch_fid_path(tmp_path):
    """PNGs through our image set + extractor give bit-identical features to pytorch-fid's path
    (ImagePathDataset: convert('RGB') + to_tensor, stacked), for RGB and grayscale files."""
    weights = tmp_path / "w.safetensors"
    _fake_inception_weights(weights, safetensors=True)
    ex = inception.InceptionFeatureExtractor(weights)
    rng = np.random.default_rng(0)
    for name, shape in (("rgb", (3, 32, 32, 3)), ("gray", (3, 16, 16, 1))):
        folder = _write_pngs(tmp_path / name, rng.integers(0, 256, shape, dtype=np.uint8), range(3))
        ours = torch.from_numpy(ex(imageset.load_image_set(folder).images))
        with torch.no_grad():
            ref = ex.model(_to_tensor_batch(sorted(folder.glob("*.png")), "RGB")).double()
        assert torch.equal(ours, ref), name


def test_digits_features_of_pngs_equal_to_tensor_path(tmp_path, digits_extractor):
    """The digits net gets the same batch (values and row-major layout) as to_tensor + stack would give."""
    ex = digits_extractor
    rng = np.random.default_rng(1)
    for name, shape, mode in (
        ("gray16", (20, 16, 16, 1), "L"),
        ("gray32", (20, 32, 32, 1), "L"),
        ("rgb16", (20, 16, 16, 3), "RGB"),
    ):
        folder = _write_pngs(tmp_path / name, rng.integers(0, 256, shape, dtype=np.uint8), range(20))
        ours = torch.from_numpy(ex(imageset.load_image_set(folder).images))
        with torch.no_grad():
            ref = ex.forward_features(
                ex.prepare(_to_tensor_batch(sorted(folder.glob("*.png")), mode))
            ).double()
        assert torch.equal(ours, ref), name


# --------------------------------------------------------------------------- latency


def test_forward_latency_interleaves_and_reports():
    calls = []

    class Tagged(torch.nn.Module):
        def __init__(self, tag, width):
            super().__init__()
            self.tag, self.lin = tag, torch.nn.Linear(width, width)

        def forward(self, x):
            calls.append(self.tag)
            return x

    res = latency.forward_latency(
        {"teacher": Tagged("A", 8), "student": Tagged("B", 8)}, {"x": torch.zeros(2, 8)}, repeats=4, warmup=1
    )
    assert calls == list("AB" + "AB" + "BA" + "AB" + "BA")
    assert res["batch_size"] == 2 and res["settings"]["torch_threads"] == torch.get_num_threads()
    for name in ("teacher", "student"):
        r = res[name]
        assert r["repeats"] == 4 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    thr = latency.sampling_throughput({"t": lambda: 3, "s": lambda: 3}, repeats=2, warmup=0)
    assert thr["t"]["images"] == 3 and thr["s"]["images_per_s"] > 0
    assert latency.ratio(2.0, 1.0) == 2.0 and latency.ratio(1.0, 0) is None
    with pytest.raises(DiffpruneError, match="repeats=0"):
        latency.forward_latency({}, {}, repeats=0)
