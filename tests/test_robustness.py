"""Reliability and security: every CLI option refuses bad values with one line; damaged or hostile
checkpoints and sample folders fail clearly and never unpickle; interrupted runs (kill -9) leave
either nothing or a resumable state; two runs never share an output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, save_tiny_pipeline, tiny_unet
from PIL import Image
from safetensors.torch import load_file

from diffprune import cli
from diffprune.errors import DiffpruneError
from diffprune.fsutil import atomic_dir, lock_path, output_lock
from diffprune.train import finetune
from diffprune.train.checkpoints import STATE_FILE, checkpoint_dirs, read_checkpoint

FAST = dict(batch_size=2, tensorboard=False, progress=False, log_every=1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFPRUNE_TEST_THREADS": "1", "TQDM_DISABLE": "1",
       "PYTHONPATH": str(Path(__file__).parent)}


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    """A tiny 8x8 pipeline with 10 timesteps: cheap to prune, train and sample."""
    unet = tiny_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipe", unet=unet, num_train_timesteps=10)


def _assert_one_line_error(code, err, where, match=None):
    lines = [ln.split("\r")[-1] for ln in err.strip().splitlines()]
    assert code == 2, (where, code, err[-2000:])
    assert "Traceback" not in err, (where, err[-2000:])
    assert lines and "error:" in lines[-1] and sum("error:" in ln for ln in lines) == 1, (where, err[-2000:])
    if match is not None:
        assert match in lines[-1], (where, lines[-1])
    return lines[-1]


# --------------------------------------------------------------------------- CLI: generated bad values


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return cli.build_parser()._subparsers._group_actions[0].choices


def _bad_numbers(parse) -> list[str]:
    """Values outside what `cli.common.number_type` allows."""
    bad = ["abc", "", "nan", "inf", "-inf", "1e30" if parse.kind is int or parse.high is not None else "-1e30"]
    if parse.kind is int:
        bad += ["1.5", "99999999999999999999"]
    if parse.low is not None:
        bad.append(str(parse.low) if parse.low_open else str(parse.low - (1 if parse.kind is int else 0.5)))
        bad.append("-1")
    if parse.high is not None:
        bad.append(str(parse.high) if parse.high_open else str(parse.high + (1 if parse.kind is int else 0.5)))
    return list(dict.fromkeys(bad))


def _generated_cases():
    cases = []
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0 or action.dest == "help":
                continue
            flag = action.option_strings[0]
            if hasattr(action.type, "kind"):
                cases += [(name, flag, v) for v in _bad_numbers(action.type)]
            elif action.choices is not None:
                cases.append((name, flag, "not-a-choice"))
            elif action.type is not None:  # e.g. train's comma-separated lists
                cases += [(name, flag, v) for v in ("a,b", "-3", "99999999999999999999")]
    return cases


def _required(name, sub, pipe_dir, tmp_path) -> list[str]:
    values = {"model": pipe_dir, "data": "digits", "output_dir": tmp_path / "out", "output": tmp_path / "out"}
    args = []
    for action in sub._actions:
        if action.required and action.option_strings:
            args += [action.option_strings[0], str(values[action.dest])]
    return args


def test_every_numeric_and_choice_option_refuses_bad_values_in_one_line(pipe_dir, tmp_path, capsys):
    subs = _subparsers()
    assert set(subs) == set(cli.COMMANDS)
    cases = _generated_cases()
    assert len(cases) > 150  # every subcommand contributes
    for name, flag, value in cases:
        argv = [name, *_required(name, subs[name], pipe_dir, tmp_path), f"{flag}={value}"]
        code, err = run_cli(argv, capsys)
        line = _assert_one_line_error(code, err, (name, flag, value))
        assert flag in line or value in line, (name, flag, value, line)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_help_documents_every_default_and_range(name, capsys):
    sub = _subparsers()[name]
    text = " ".join(sub.format_help().split())
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help and action.option_strings[0] in text, (name, action.dest)
        if action.nargs != 0 and not action.required:
            assert "default" in sub._get_formatter()._expand_help(action) or "default" in action.help, \
                (name, action.dest)
        if hasattr(action.type, "kind"):  # a number: the help names the range it allows
            assert any(w in action.help for w in (">=", "in [", "in (", "integer", "number")), (name, action.dest)
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0 and "Traceback" not in capsys.readouterr().err


def _path_cases(pipe_dir, tmp_path):
    """(argv, expected text in the error line): missing inputs, files where folders belong and back."""
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder\n")
    folder = tmp_path / "a_folder"
    folder.mkdir(exist_ok=True)
    missing = tmp_path / "missing" / "x"
    out = tmp_path / "out"
    P = str(pipe_dir)
    return [
        (["prune", "--model", missing, "--output-dir", out], "does not exist"),
        (["prune", "--model", a_file, "--output-dir", out], "is a file"),
        (["prune", "--model", folder, "--output-dir", out], "neither"),
        (["prune", "--model", P, "--output-dir", a_file], "is a file"),
        (["prune", "--model", P, "--output-dir", a_file / "sub"], "a_file"),
        (["prune", "--model", P, "--data", missing, "--output-dir", out], "does not exist"),
        (["prune", "--model", P, "--data", a_file, "--output-dir", out], "a_file"),
        (["prune", "--model", P, "--device", "nope", "--output-dir", out], "--device"),
        (["finetune", "--model", missing, "--data", "digits", "--output-dir", out], "does not exist"),
        (["finetune", "--model", P, "--data", missing, "--output-dir", out], "does not exist"),
        (["finetune", "--model", P, "--data", "digits", "--output-dir", a_file], "is a file"),
        (["finetune", "--model", P, "--data", "digits", "--output-dir", out, "--distill", "output",
          "--teacher", missing], "does not exist"),
        (["finetune", "--model", P, "--data", "digits", "--output-dir", out, "--resume", "--steps", "1",
          "--batch-size", "1", "--no-tensorboard", "--no-progress", "--device", "cuda:7"], "--device"),
        (["train", "--data", "digits", "--output-dir", out, "--model-config", missing], "does not exist"),
        (["train", "--data", "digits", "--output-dir", out, "--model-config", folder], "not readable"),
        (["train", "--data", "digits", "--output-dir", out, "--model-config", a_file], "not readable"),
        (["train", "--data", "digits", "--output-dir", a_file], "is a file"),
        (["train", "--data", "digits", "--output-dir", out, "--block-out-channels", "8,16",
          "--norm-num-groups", "4", "--attention-head-dim", "32"], "attention_head_dim"),
        (["sample", "--model", missing, "--output-dir", out], "does not exist"),
        (["sample", "--model", a_file, "--output-dir", out], "is a file"),
        (["sample", "--model", P, "--output-dir", a_file, "--num-images", "1", "--steps", "1"], "is a file"),
        (["sample", "--model", P, "--output-dir", out, "--steps", "11"], "steps"),
        (["evaluate", "--samples", missing, "--reference", "digits"], "missing"),
        (["evaluate", "--samples", a_file, "--reference", "digits"], "a_file"),
        (["evaluate", "--reference", missing, "--samples", folder], ""),
        (["evaluate", "--model", missing], "does not exist"),
        (["evaluate", "--model", P, "--teacher-model", a_file], "is a file"),
        (["evaluate", "--samples", folder, "--teacher-samples", missing], ""),
        (["evaluate"], ""),
        (["report", "--output-dir", out], "nothing to report"),
        (["report", "--prune", missing, "--output-dir", out], "missing"),
        (["report", "--evaluation", a_file, "--output-dir", out], "a_file"),
        (["report", "--evaluation", folder, "--output-dir", out], "a_folder"),
        (["report", "--prune", P, "--output-dir", a_file], "a_file"),
        (["demo", "--teacher", missing, "--output-dir", out], "missing"),
        (["demo", "--output-dir", a_file], "is a file"),
    ]


def test_bad_paths_are_one_line_errors(pipe_dir, tmp_path, capsys):
    for argv, match in _path_cases(pipe_dir, tmp_path):
        code, err = run_cli(argv, capsys)
        _assert_one_line_error(code, err, argv, match or None)
        assert not (tmp_path / "out").exists(), argv
        assert not list(tmp_path.glob(".*lock")), argv


# --------------------------------------------------------------------------- damaged / hostile checkpoints


@pytest.fixture(scope="module")
def run_dir(pipe_dir, tmp_path_factory):
    """A finetune run stopped after 2 steps (checkpoints at 1 and 2), resumable."""
    out = tmp_path_factory.mktemp("run") / "ft"
    finetune(pipe_dir, "digits", out, steps=3, checkpoint_every=1, keep_checkpoints=2, max_steps_this_run=2, **FAST)
    return out


def _copy_run(run_dir, tmp_path):
    import shutil

    dst = tmp_path / "ft"
    shutil.copytree(run_dir, dst)
    return dst


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _damage(kind, ckpt: Path, marker: Path):
    state = json.loads((ckpt / STATE_FILE).read_text())
    if kind == "truncated model":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
        return "model.safetensors"
    if kind == "empty ema":
        (ckpt / "ema.safetensors").write_bytes(b"")
        return "ema.safetensors"
    if kind == "pickle as optimizer.safetensors":
        (ckpt / "optimizer.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
        return "optimizer.safetensors"
    if kind == "state version 99":
        state["version"] = 99
    elif kind == "state without step":
        state.pop("step")
    elif kind == "state without config":
        state.pop("config")
    elif kind == "state step is a string":
        state["step"] = "2; rm -rf /"
    elif kind == "state is a list":
        state = [state]
    elif kind == "state history garbage":
        state["history"] = [1, 2]
    elif kind == "state not json":
        (ckpt / STATE_FILE).write_bytes(b"\x80\x04not json")
        return STATE_FILE
    elif kind == "optimizer.json garbage":
        (ckpt / "optimizer.json").write_text('{"param_groups": 5}')
        return "optimizer.json"
    elif kind == "optimizer.json missing":
        (ckpt / "optimizer.json").unlink()
        return "optimizer.json"
    else:
        raise AssertionError(kind)
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    return STATE_FILE


DAMAGE = ["truncated model", "empty ema", "pickle as optimizer.safetensors", "state version 99",
          "state without step", "state without config", "state step is a string", "state is a list",
          "state history garbage", "state not json", "optimizer.json garbage", "optimizer.json missing"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_checkpoint_fails_with_one_line_naming_the_file(kind, run_dir, tmp_path):
    out = _copy_run(run_dir, tmp_path)
    ckpt = checkpoint_dirs(out)[-1]
    marker = tmp_path / "pickle-ran"
    name = _damage(kind, ckpt, marker)
    with pytest.raises(DiffpruneError) as err:
        read_checkpoint(ckpt)
    msg = str(err.value)
    assert "\n" not in msg and (str(ckpt / name) in msg or (name in msg and str(ckpt) in msg)), msg
    assert not marker.exists()


def test_planted_pickles_in_a_checkpoint_never_run_and_resume_still_works(run_dir, tmp_path, pipe_dir):
    out = _copy_run(run_dir, tmp_path)
    ckpt = checkpoint_dirs(out)[-1]
    marker = tmp_path / "pickle-ran"
    for name in ("pytorch_model.bin", "optimizer.pt", "scheduler.bin", "random_states_0.pkl", "model.safetensors.bin"):
        (ckpt / name).write_bytes(pickle.dumps(_Payload(marker)))
    finetune(pipe_dir, "digits", out, steps=3, checkpoint_every=1, keep_checkpoints=2, resume=True, **FAST)
    assert not marker.exists() and (out / "model_index.json").is_file()


def test_resume_through_the_cli_names_the_damaged_file(run_dir, tmp_path, pipe_dir, capsys):
    out = _copy_run(run_dir, tmp_path)
    ckpt = checkpoint_dirs(out)[-1]
    _damage("truncated model", ckpt, tmp_path / "m")
    argv = ["finetune", "--model", pipe_dir, "--data", "digits", "--output-dir", out, "--steps", "3",
            "--batch-size", "2", "--checkpoint-every", "1", "--log-every", "1", "--resume", "--no-tensorboard",
            "--no-progress"]
    code, err = run_cli(argv, capsys)
    line = _assert_one_line_error(code, err, "resume", "model.safetensors")
    assert "delete this checkpoint" in line


# --------------------------------------------------------------------------- damaged sample folders


@pytest.fixture(scope="module")
def sample_dir(pipe_dir, tmp_path_factory):
    from diffprune.sample.loop import sample_to_folder

    out = tmp_path_factory.mktemp("samples") / "s"
    sample_to_folder(pipe_dir, out, 3, batch_size=3, steps=2, progress=False)
    return out


@pytest.mark.parametrize("damage, match", [
    ("truncated", "not a readable PNG"),
    ("text", "not a readable PNG"),
    ("wrong size", "is 4x4 pixels, expected 8x8"),
    ("wrong channels", "has 3 channels, expected 1"),
    ("16-bit", "8-bit"),
])
def test_resume_refuses_damaged_pngs_naming_the_file(sample_dir, tmp_path, pipe_dir, capsys, damage, match):
    import shutil

    out = tmp_path / "s"
    shutil.copytree(sample_dir, out)
    bad = out / "000001.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:20])
    elif damage == "text":
        bad.write_text("hello")
    elif damage == "wrong size":
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(bad)
    elif damage == "wrong channels":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad)
    else:
        Image.fromarray(np.zeros((8, 8), np.uint16)).save(bad)
    (out / "000002.png").unlink()
    code, err = run_cli(["sample", "--model", pipe_dir, "--output-dir", out, "--num-images", 3, "--batch-size", 3,
                       "--steps", 2, "--resume", "--no-progress"], capsys)
    line = _assert_one_line_error(code, err, damage, match)
    assert "000001.png" in line
    assert not (out / "000002.png").exists()  # refused before generating anything


# --------------------------------------------------------------------------- the output lock


def test_lock_refuses_a_second_holder_and_is_reentrant(tmp_path):
    out = tmp_path / "o"
    with output_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
        with output_lock(out):  # same process: re-entrant (a stage locks early and again while writing)
            pass
        assert f"is in use by another diffprune process (pid {os.getpid()})" in _lock_in_child(out)
        with atomic_dir(out) as tmp:  # atomic_dir takes the same lock: fine from the holder
            (tmp / "x").write_text("1")
    assert (out / "x").is_file() and not lock_path(out).exists()


def _lock_in_child(path) -> str:
    """What another process gets when it tries to lock `path` (forked: no second interpreter start)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_try_lock, args=(str(path), queue))
    child.start()
    child.join(30)
    return queue.get(timeout=5)


def _try_lock(path, queue):
    try:
        with output_lock(path):
            queue.put("locked")
    except DiffpruneError as err:
        queue.put(str(err))


def _spawn(argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "diffprune.cli", *map(str, argv)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(pred, proc, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def _kill9(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()


# --------------------------------------------------------------------------- kill -9


def test_kill_during_prune_leaves_no_output_and_the_next_run_cleans_up(pipe_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    # killed once it holds the output lock (taken before any work); the kill lands before or inside atomic_dir
    proc = _spawn(["prune", "--model", pipe_dir, "--output-dir", out, "--method", "magnitude", "--ratio", "0.3",
                   "--batch-size", "2"])
    _wait_for(lambda: lock_path(out).exists(), proc)
    _kill9(proc)
    assert not out.exists()
    # what a kill inside atomic_dir leaves: a half-written staging sibling and a stale lock file
    stale = tmp_path / f".pruned.tmp-{proc.pid}"
    stale.mkdir(exist_ok=True)
    (stale / "half.safetensors").write_bytes(b"\0" * 10)
    lock_path(out).write_text(f"{proc.pid}\n")
    code, err = run_cli(["prune", "--model", pipe_dir, "--output-dir", out, "--method", "magnitude",
                       "--ratio", "0.3", "--batch-size", "2"], capsys)
    assert code == 0, err
    assert (out / "unet" / "pruning.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_kill_during_finetune_resumes_from_the_last_complete_checkpoint(pipe_dir, tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune", "--model", pipe_dir, "--data", "digits", "--output-dir", out, "--steps", 400,
            "--batch-size", 2, "--checkpoint-every", 1, "--keep-checkpoints", 2, "--log-every", 1,
            "--no-tensorboard", "--no-progress"]
    proc = _spawn(argv)
    _wait_for(lambda: len(checkpoint_dirs(out)) >= 2, proc, timeout=60)
    _kill9(proc)
    assert not (out / "model_index.json").exists()  # the pipeline only appears at the end
    good = checkpoint_dirs(out)
    assert good
    for ckpt in good:  # every finished checkpoint is complete and readable
        state, tensors, _ = read_checkpoint(ckpt)
        assert state["step"] == int(ckpt.name[5:])
    last = int(good[-1].name[5:])
    before = load_file(str(good[-1] / "model.safetensors"))
    finetune(pipe_dir, "digits", out, steps=last + 1, checkpoint_every=1, keep_checkpoints=2, resume=True, **FAST)
    assert (out / "model_index.json").is_file()
    after = checkpoint_dirs(out)
    assert int(after[-1].name[5:]) == last + 1
    assert not list((out / "checkpoints").glob(".*")) and not list(out.glob(".pipeline*"))
    assert any(not torch.equal(before[k], v) for k, v in load_file(str(after[-1] / "model.safetensors")).items())


def test_busy_then_killed_sample_refuses_a_second_run_and_resumes_only_missing_images(pipe_dir, tmp_path, capsys):
    out = tmp_path / "s"
    proc = _spawn(["sample", "--model", pipe_dir, "--output-dir", out, "--num-images", 400, "--batch-size", 1,
                   "--steps", 10, "--no-progress"])
    try:
        _wait_for(lambda: len(list(out.glob("0*.png"))) >= 3, proc)
        # while it runs, a second run on the same folder refuses, whatever the stage
        for argv in (["sample", "--model", pipe_dir, "--output-dir", out, "--num-images", 4, "--steps", 10, "--resume"],
                     ["prune", "--model", pipe_dir, "--output-dir", out, "--overwrite"],
                     ["finetune", "--model", pipe_dir, "--data", "digits", "--output-dir", out, "--overwrite"]):
            code, err = run_cli(argv, capsys)
            _assert_one_line_error(code, err, argv, f"is in use by another diffprune process (pid {proc.pid})")
    finally:
        _kill9(proc)
    done = sorted(out.glob("0*.png"))
    assert not (out / "samples.npz").exists()
    (out / f".000399.png.tmp-{proc.pid}").write_bytes(b"half")  # as if killed mid-write
    n = len(done) + 2
    stamps = {p.name: p.stat().st_mtime_ns for p in done}
    code, err = run_cli(["sample", "--model", pipe_dir, "--output-dir", out, "--num-images", n, "--batch-size", 1,
                       "--steps", 10, "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in done} == stamps  # kept, not rewritten
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(n)]
    assert not list(out.glob(".*")) and not lock_path(out).exists()
    from diffprune.sample.loop import sample_to_folder

    fresh = sample_to_folder(pipe_dir, tmp_path / "fresh", n, batch_size=n, steps=10, progress=False)
    a, b = np.load(out / "samples.npz")["images"], np.load(fresh / "samples.npz")["images"]
    assert np.array_equal(a, b)  # the resumed set equals an uninterrupted one
