"""Hostile inputs, round 3 (issue 27): the newest inputs (prompt embeddings, guidance, pruned configs) and the
environment (full disk, Ctrl-C) end in one line and an exit code, never "internal error" or a traceback, and
leave a complete output, a resumable one, or nothing.

The tests of "never write an image from a non-finite sample" (`test_a_non_finite_sample_*`,
`test_the_first_non_finite_image_*`) need `sample.loop.check_finite_images` (issue 27, item 2).
The property test over every file kind the product reads is tests/test_hostile_properties.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, save_tiny_pipeline, sd_pipeline, tiny_sd_unet, tiny_unet
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from test_safety import leftovers, one_line, tree_hashes

from diffprune.errors import DiffpruneError, os_errno
from diffprune.families import family_for
from diffprune.families.conditioning import context_for, encode_prompts_file
from diffprune.families.prompt_embeds import read_prompt_embeds
from diffprune.io import load_pipeline

PROMPT = "a red cat"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFPRUNE_TEST_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64, "int64": torch.int64,
          "uint8": torch.uint8, "bool": torch.bool, "fp8": torch.float8_e4m3fn}
DISPLAY_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors 0.4+


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """root/full (a tiny SD pipeline), root/bare (without text encoder), root/e.safetensors ("" and PROMPT)."""
    root = tmp_path_factory.mktemp("sd")
    pipe = sd_pipeline()
    pipe.save_pretrained(root / "full", safe_serialization=True)
    pipe.register_modules(text_encoder=None, tokenizer=None)
    pipe.save_pretrained(root / "bare", safe_serialization=True)
    encode_prompts_file(load_pipeline(root / "full"), root / "e.safetensors", [PROMPT])
    images = root / "imgs"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(images / "0.png")
    return root


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    """root/pipe (a tiny 8x8 DDPM pipeline, 10 timesteps) and root/pruned (it, magnitude-pruned by the CLI)."""
    root = tmp_path_factory.mktemp("ddpm")
    unet = tiny_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    save_tiny_pipeline(root / "pipe", unet=unet, num_train_timesteps=10)
    from diffprune.cli import main

    assert main(["prune", "--model", str(root / "pipe"), "--output-dir", str(root / "pruned"), "--method",
                 "magnitude", "--ratio", "0.3", "--batch-size", "2"]) == 0
    return root


def _variant(src: Path, dst: Path, change) -> Path:
    """A copy of the prompt-embeddings file `src` with every tensor passed through `change(name, tensor)`."""
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file({k: change(k, v) for k, v in tensors.items()}, str(dst), metadata=meta)
    return dst


def _sample(model, out, capsys, *extra):
    return run_cli(["sample", "--model", model, "--output-dir", out, "--num-images", "2", "--steps", "2",
                    "--no-progress", "--prompt", PROMPT, *extra], capsys)


def _finetune(model, data, out, capsys, *extra):
    return run_cli(["finetune", "--model", model, "--data", data, "--output-dir", out, "--steps", "1",
                    "--batch-size", "1", "--no-tensorboard", "--no-progress", *extra], capsys)


# --------------------------------------------------------------------------- 1. embeddings in another dtype


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp64"])
def test_float_embeddings_are_cast_to_the_denoiser_said_once(sd, tmp_path, capsys, caplog, name):
    path = _variant(sd / "e.safetensors", tmp_path / f"{name}.safetensors", lambda k, t: t.to(DTYPES[name]))
    code, err = _sample(sd / "bare", tmp_path / "s", capsys, "--prompt-embeds", path)
    assert code == 0, err
    notes = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # stderr, in the CLI
    assert len(notes) == 1 and f"are {str(DTYPES[name])[6:]}; cast to the denoiser's float32" in notes[0], notes
    images = np.load(tmp_path / "s" / "samples.npz")["images"]
    if name == "fp64":  # float32 -> float64 -> float32 is exact: the images of the original file
        assert _sample(sd / "bare", tmp_path / "ref", capsys, "--prompt-embeds", sd / "e.safetensors")[0] == 0
        np.testing.assert_array_equal(images, np.load(tmp_path / "ref" / "samples.npz")["images"])


def test_finetune_casts_half_precision_embeddings(sd, tmp_path, capsys):
    path = _variant(sd / "e.safetensors", tmp_path / "h.safetensors", lambda k, t: t.half())
    code, err = _finetune(sd / "bare", sd / "imgs", tmp_path / "ft", capsys, "--prompt", PROMPT,
                          "--prompt-embeds", path)
    assert code == 0, err
    assert (tmp_path / "ft" / "model_index.json").is_file()


@pytest.mark.parametrize("name", ["int64", "uint8", "bool", "fp8"])
@pytest.mark.parametrize("stage", ["sample", "finetune"])
def test_embeddings_that_are_not_float_are_refused_before_any_output(sd, tmp_path, capsys, name, stage):
    path = _variant(sd / "e.safetensors", tmp_path / f"{name}.safetensors", lambda k, t: t.to(DTYPES[name]))
    out = tmp_path / "out"
    if stage == "sample":
        code, err = _sample(sd / "bare", out, capsys, "--prompt-embeds", path)
    else:
        code, err = _finetune(sd / "bare", sd / "imgs", out, capsys, "--prompt", PROMPT, "--prompt-embeds", path)
    line = one_line(code, err, 2, f"prompt_embeds is {str(DTYPES[name])[6:]}; allowed: float16, bfloat16, float32")
    assert "internal error" not in line and not out.exists() and not leftovers(tmp_path)


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """(bare PixArt pipeline, its transformer, a prompt-embeddings file with an int64 attention mask)."""
    from test_pixart import tiny_pipeline

    root = tmp_path_factory.mktemp("pixart")
    pipe = tiny_pipeline()
    encode_prompts_file(pipe, root / "e.safetensors", [PROMPT])
    pipe.register_modules(text_encoder=None, tokenizer=None)
    return pipe, pipe.transformer, root / "e.safetensors"


def _pixart_cond(pixart, path):
    pipe, model, _ = pixart
    ctx = context_for(pipe, family_for(model), model, read_prompt_embeds(path))
    ctx.prompts = [PROMPT, ""]
    return ctx.cond_for([0, 1], "cpu")


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.float16, torch.float32])
def test_a_pixart_attention_mask_in_any_0_1_dtype_gives_the_same_conditioning(pixart, tmp_path, dtype):
    _, _, original = pixart
    want = _pixart_cond(pixart, original)
    mask = want["encoder_attention_mask"]
    assert mask.dtype == torch.int64 and 0 < int(mask.sum()) < mask.numel()  # padded: the mask matters
    path = _variant(original, tmp_path / "m.safetensors",
                    lambda k, t: t.to(dtype) if k == "prompt_attention_mask" else t)
    got = _pixart_cond(pixart, path)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("value", [2.0, -1.0, float("nan")])
def test_a_mask_holding_other_values_than_0_and_1_is_refused(pixart, tmp_path, value):
    _, _, original = pixart

    def change(name, t):
        if name != "prompt_attention_mask":
            return t
        t = t.float()
        t[0, 0] = value
        return t

    path = _variant(original, tmp_path / "m.safetensors", change)
    with pytest.raises(DiffpruneError, match="prompt_attention_mask holds values other than 0 and 1"):
        read_prompt_embeds(path)


# --------------------------------------------------------------------------- 2. non-finite conditioning / samples


def test_values_that_overflow_the_denoisers_dtype_are_refused(sd, tmp_path):
    """1e5 fits float32 and bfloat16 but is inf in float16: refused for a float16 denoiser, naming both."""
    path = _variant(sd / "e.safetensors", tmp_path / "big.safetensors", lambda k, t: t * 0 + 1e5)
    pipe = load_pipeline(sd / "bare", text_encoders=False)
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_sd_unet().to(dtype)
        ctx = context_for(pipe, family_for(model), model, read_prompt_embeds(path))
        assert ctx.encoder.embeds.tensors["prompt_embeds"].dtype == dtype
    model = tiny_sd_unet().half()
    with pytest.raises(DiffpruneError, match=r"prompt_embeds holds values up to 1e\+05 in magnitude, beyond the "
                                             r"range of the denoiser's float16 \(largest 6.55e\+04\)"):
        context_for(pipe, family_for(model), model, read_prompt_embeds(path))


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_embeddings_are_refused_in_one_line(sd, tmp_path, capsys, value):
    path = _variant(sd / "e.safetensors", tmp_path / "x.safetensors",
                    lambda k, t: torch.where(torch.arange(t.numel()).view(t.shape) == 3, value, t).half())
    code, err = _sample(sd / "bare", tmp_path / "s", capsys, "--prompt-embeds", path)
    one_line(code, err, 2, "prompt_embeds holds non-finite values (1 NaN/inf of 384); allowed: finite values only")
    assert not (tmp_path / "s").exists()


def test_a_non_finite_sample_is_never_written(sd, tmp_path, capsys):
    """Finite embeddings of 1e30 drive the float32 model to NaN: one line naming image 0, no PNG."""
    path = _variant(sd / "e.safetensors", tmp_path / "huge.safetensors", lambda k, t: t * 0 + 1e30)
    out = tmp_path / "s"
    code, err = _sample(sd / "bare", out, capsys, "--prompt-embeds", path)
    one_line(code, err, 2, "image 0 (000000.png) is not finite after sampling")
    assert not list(out.glob("*.png")) and not (out / "samples.npz").exists() and not leftovers(tmp_path)


def test_the_first_non_finite_image_is_named_and_earlier_batches_are_kept(ddpm, tmp_path, capsys, monkeypatch):
    from diffprune.sample import loop

    real, calls = loop.denoise, []

    def denoise(*args, **kwargs):
        x = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second batch: images 2 and 3
            x[1, 0, 0, 0] = float("nan")
        return x

    monkeypatch.setattr(loop, "denoise", denoise)
    out = tmp_path / "s"
    code, err = run_cli(["sample", "--model", ddpm / "pipe", "--output-dir", out, "--num-images", "6",
                         "--batch-size", "2", "--steps", "1", "--no-progress"], capsys)
    one_line(code, err, 2, "image 3 (000003.png) is not finite after sampling (NaN/inf in the model output); "
                           "nothing was written for it")
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]  # resumable
    with pytest.raises(DiffpruneError, match=r"image 3 \(000003.png\)"):
        calls.clear()
        loop.sample(load_pipeline(ddpm / "pipe").unet, load_pipeline(ddpm / "pipe").scheduler, 4, batch_size=2,
                    steps=1, progress=False)


# --------------------------------------------------------------------------- 3 and 7. a full disk


@pytest.mark.parametrize("message", [DISPLAY_ENOSPC, 'IoError(Os { code: 28, kind: StorageFull, message: "No space'
                                                     ' left on device" })'], ids=["display", "debug"])
def test_safetensors_io_errors_carry_their_errno(message):
    assert os_errno(SafetensorError(message)) == errno.ENOSPC
    assert os_errno(SafetensorError("Error while deserializing header: HeaderTooLarge")) is None


def test_full_disk_while_pruning_with_the_real_safetensors_message(ddpm, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def serialize_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError(DISPLAY_ENOSPC)

    monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)
    out = tmp_path / "pruned"
    before = tree_hashes(ddpm / "pipe")
    code, err = run_cli(["prune", "--model", ddpm / "pipe", "--output-dir", out, "--method", "magnitude",
                         "--ratio", "0.3", "--batch-size", "2"], capsys)
    one_line(code, err, 1, f"no space left on device while writing {out}")
    assert not out.exists() and not leftovers(tmp_path) and tree_hashes(ddpm / "pipe") == before


def _full_disk_after(monkeypatch, calls_ok: int):
    """checkpoints.save_file writes `calls_ok` files, then fails as safetensors does on a full disk."""
    from diffprune.train import checkpoints

    real, count = checkpoints.save_file, []

    def save_file_(tensors, filename, metadata=None):
        count.append(1)
        if len(count) > calls_ok:
            Path(filename).write_bytes(b"\0" * 10)
            raise SafetensorError(DISPLAY_ENOSPC)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", save_file_)


@pytest.mark.parametrize("premade", [False, True], ids=["new-folder", "empty-folder"])
def test_full_disk_at_the_first_checkpoint_exits_1_and_leaves_nothing(ddpm, tmp_path, monkeypatch, capsys, premade):
    out = tmp_path / "ft"
    if premade:
        out.mkdir()
    _full_disk_after(monkeypatch, 0)
    code, err = _finetune(ddpm / "pipe", "digits", out, capsys, "--steps", "2", "--checkpoint-every", "1",
                          "--batch-size", "2")
    one_line(code, err, 1, "(No space left on device); no earlier checkpoint exists")
    assert (list(out.iterdir()) == [] if premade else not out.exists()) and not leftovers(tmp_path)
    monkeypatch.undo()
    code, err = _finetune(ddpm / "pipe", "digits", out, capsys, "--steps", "2", "--batch-size", "2")
    assert code == 0, err  # nothing in the way of a plain rerun


def test_full_disk_at_a_later_checkpoint_leaves_a_resumable_run(ddpm, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ft"
    _full_disk_after(monkeypatch, 3)  # step 1's model, ema and optimizer files, then the disk is full
    args = ("--steps", "3", "--checkpoint-every", "1", "--batch-size", "2")
    code, err = _finetune(ddpm / "pipe", "digits", out, capsys, *args)
    one_line(code, err, 1, "the last good checkpoint")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000001"] and not leftovers(tmp_path)
    monkeypatch.undo()
    code, err = _finetune(ddpm / "pipe", "digits", out, capsys, *args, "--resume")
    assert code == 0, err
    assert (out / "model_index.json").is_file()


# --------------------------------------------------------------------------- 4. Ctrl-C at any moment


def _sample_interrupted(argv: list[str], model: Path, out: Path, ready, delay: float) -> str:
    """Start `diffprune sample` (`argv`: how to run diffprune), wait until `ready(stderr_file)` holds and `delay`
    seconds have passed since the start, send SIGINT; its stderr without the -X importtime lines, once it exited 130."""
    err_file, start = out.with_name(f"{out.name}-stderr.txt"), time.monotonic()
    with open(err_file, "w") as err, _default_sigint():
        proc = subprocess.Popen([*argv, "sample", "--model", str(model), "--output-dir", str(out), "--num-images",
                                 "2000", "--steps", "10", "--batch-size", "4", "--no-progress"],
                                env={**ENV, "PYTHONPROFILEIMPORTTIME": "1"}, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while not ready(err_file) and proc.poll() is None and time.monotonic() - start < 120:
                time.sleep(0.002)
            time.sleep(max(0.0, start + delay - time.monotonic()))
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            proc.kill()  # nothing once it has exited
            proc.wait()
    text = "".join(ln for ln in err_file.read_text().splitlines(True) if not ln.startswith("import time:"))
    assert proc.returncode == 130, (argv, delay, proc.returncode, text[-3000:])
    return text


@contextlib.contextmanager
def _default_sigint():
    """Children started inside get Ctrl-C's default disposition, as from a terminal: a pytest-xdist worker
    (`make test`) ignores SIGINT, and an ignored SIGINT is inherited and rightly left ignored by diffprune
    (as under `nohup` or `cmd &`), so the command would run to its end."""
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _cli_loaded(err_file: Path) -> bool:
    """diffprune.cli is imported, so its Ctrl-C handler is set (before: Python's start, site, the diffprune
    package, about 25 ms, where a Ctrl-C can still end in a traceback)."""
    return any(ln.rsplit("|", 1)[-1].strip() == "diffprune.cli" for ln in err_file.read_text().splitlines())


def test_ctrl_c_at_any_moment_of_sample_is_one_line_and_exit_130(ddpm, tmp_path):
    """From the moment diffprune.cli is loaded (`python -m`, console script) through the imports of torch and
    diffusers (timed from the start, never before that moment) to the sampling loop (its first PNG written)."""
    python_m, script = [sys.executable, "-m", "diffprune.cli"], Path(sys.executable).with_name("diffprune")
    mid = tmp_path / "s-mid"
    moments = [(python_m, _cli_loaded, delay) for delay in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.6, 1.5)]
    moments += [([str(script)], _cli_loaded, 0.0)] if script.is_file() else []
    moments += [(python_m, lambda _: any(mid.glob("*.png")), 0.0)]
    for i, (argv, ready, delay) in enumerate(moments):
        out = mid if i == len(moments) - 1 else tmp_path / f"s{i}"
        err = _sample_interrupted(argv, ddpm / "pipe", out, ready, delay)
        assert err.strip().splitlines() == ["diffprune sample: interrupted"], (argv, delay, err)
        assert not leftovers(tmp_path), (argv, delay)


def test_an_interrupt_that_ended_a_string_exec_still_exits_130(tmp_path):
    """CPython remembers a KeyboardInterrupt that ended a string exec() (as dataclasses and other libraries
    run while torch imports) and a `python -m` run then died by SIGINT (-2) after printing its line."""
    (tmp_path / "interrupted_run.py").write_text(
        "import sys\nfrom diffprune import cli\nfrom diffprune.cli import report\n"
        "def run(args):\n    exec('raise KeyboardInterrupt')\n"
        "report.run = run\nsys.exit(cli.main(['report', '--prune', 'x', '--output-dir', 'y']))\n")
    proc = subprocess.run([sys.executable, "-m", "interrupted_run"], cwd=tmp_path, capture_output=True, text=True,
                          env={**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]])}, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "diffprune report: interrupted", proc


# --------------------------------------------------------------------------- 5. guidance that diverges


def test_guidance_scale_is_bounded(sd, tmp_path, capsys):
    from diffprune.cli.common import guidance_scale_float
    from diffprune.families.guidance import MAX_GUIDANCE_SCALE, check_guidance

    code, err = _sample(sd / "bare", tmp_path / "s", capsys, "--prompt-embeds", sd / "e.safetensors",
                        "--guidance-scale", "1e30")
    line = one_line(code, err, 2, "is out of range; allowed: [0")  # check_guidance, or the CLI type of cli/sample.py
    assert "guidance" in line and "1e30" in line.replace("1e+30", "1e30") and "100" in line, line
    assert not (tmp_path / "s").exists()
    check_guidance(MAX_GUIDANCE_SCALE, 0.0)
    with pytest.raises(DiffpruneError, match=r"guidance_scale=100.5 is out of range; allowed: \[0, 100\]"):
        check_guidance(100.5, 0.0)
    assert guidance_scale_float.high == MAX_GUIDANCE_SCALE and guidance_scale_float("100") == 100.0


# --------------------------------------------------------------------------- 6. memory of pruned folders


@pytest.mark.parametrize("widths", [[8, 65536], [100000, 200000]])
def test_an_absurd_base_config_in_a_pruned_folder_meets_the_memory_guard(ddpm, tmp_path, capsys, monkeypatch,
                                                                         widths):
    folder = tmp_path / "model"
    shutil.copytree(ddpm / "pruned", folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": widths}))
    monkeypatch.setenv("DIFFPRUNE_MAX_MODEL_BYTES", str(2**30))
    code, err = run_cli(["sample", "--model", folder, "--output-dir", tmp_path / "s", "--num-images", "1",
                         "--steps", "1", "--no-progress"], capsys)
    line = one_line(code, err, 2, "unet/config.json: loading")
    assert "GiB" in line and "DIFFPRUNE_MAX_MODEL_BYTES=1073741824" in line and "allocate" not in line, line
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- 8. small ones


def test_markdown_report_shows_markup_from_inputs_and_title_as_text(ddpm, tmp_path, capsys):
    folder = tmp_path / "pruned"
    shutil.copytree(ddpm / "pruned", folder)
    report = json.loads((folder / "prune_report.json").read_text())
    report["config"].update(method="<img src=x onerror=alert(1)>", model="[x](javascript:alert(2))")
    (folder / "prune_report.json").write_text(json.dumps(report))
    out = tmp_path / "rep"
    code, err = run_cli(["report", "--prune", folder, "--output-dir", out, "--title", "<script>alert(3)</script>"],
                        capsys)
    assert code == 0, err
    md = (out / "report.md").read_text()
    for raw in ("<script", "<img", "](javascript"):
        assert raw not in md, raw
    assert "# &lt;script&gt;alert(3)&lt;/script&gt;" in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert "<script" not in (out / "report.html").read_text()


def test_prune_residual_on_a_unet_is_refused(ddpm, tmp_path, capsys):
    out = tmp_path / "p"
    code, err = run_cli(["prune", "--model", ddpm / "pipe", "--output-dir", out, "--method", "magnitude",
                         "--ratio", "0.3", "--prune-residual"], capsys)
    one_line(code, err, 2, "prune_residual=True applies to DiT")
    assert not out.exists() and not leftovers(tmp_path)


def test_a_component_with_only_pickled_weights_is_one_line(sd, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(sd / "full", folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    code, err = _sample(folder, tmp_path / "s", capsys)
    line = one_line(code, err, 2, "unet: holds only pickled weights (diffusion_pytorch_model.bin); allowed: "
                                  "*.safetensors")
    assert err.strip() == line and not (tmp_path / "s").exists()  # no diffusers "error ... fetch" line before it


def test_class_folders_named_with_unicode_digits_are_not_labels(tmp_path):
    """'²'.isdigit() is True but int('²') fails: such folders are not class labels (were an internal error)."""
    from diffprune.families.dit import labels_for_dataset

    paths = [tmp_path / "²" / "a.png", tmp_path / "3" / "b.png"]
    dataset = type("D", (), {"paths": paths, "__len__": lambda self: 2})()
    labels = labels_for_dataset(dataset, str(tmp_path), None, 10, seed=0)
    assert len(labels) == 2 and all(0 <= v < 10 for v in labels)
    paths[0] = tmp_path / "٣" / "a.png"  # an Arabic-Indic 3: a decimal digit int() reads
    assert labels_for_dataset(dataset, str(tmp_path), None, 10, seed=0) == [3, 3]
