"""Never lose a user's data, and fail in one line (issue 13).

- An output that is, contains or lies inside an input, the current or home directory, or a
  filesystem root is refused before any work, whatever the flags (symlinks resolved).
- --overwrite replaces only a folder the same stage wrote (its marker file); a symlinked output is
  refused; `evaluate --output` never replaces an input or a file it did not write.
- Deeply nested JSON, a full disk, SIGTERM and internal errors end in one line and an exit code
  (2 input, 1 environment/bug, 143 SIGTERM), never a traceback, and leave no temp or lock file.

Every case hashes the input trees before and after: they must be byte-identical.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, save_tiny_pipeline, tiny_unet

from diffprune import cli
from diffprune.errors import DiffpruneError
from diffprune.fsutil import lock_path, read_json

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFPRUNE_TEST_THREADS": "1", "TQDM_DISABLE": "1",
       "PYTHONPATH": str(Path(__file__).parent)}
LEFTOVER_MARKS = (".tmp-", ".old-", ".lock", ".sampling", ".new")
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser can recurse


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny 8x8 pipeline with 10 timesteps: cheap to prune, train and sample."""
    unet = tiny_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipe", unet=unet, num_train_timesteps=10)


@pytest.fixture
def project(tmp_path, pipe, monkeypatch):
    """tmp/project holding teacher/ (a pipeline) and thesis.txt; the cwd is tmp/elsewhere, HOME tmp/home."""
    root = tmp_path / "project"
    shutil.copytree(pipe, root / "teacher")
    (root / "thesis.txt").write_text("four years of work\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me\n")
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return root


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under `roots`: equal before and after."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_symlink():
                out[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[str(path)] = "dir"
    return out


def leftovers(*roots: Path) -> list[str]:
    return [str(p) for root in roots for p in Path(root).rglob(".*") if any(m in p.name for m in LEFTOVER_MARKS)]


def one_line(code, err, expected_code, match=None) -> str:
    """The single error line; fails on a traceback, a second error line or another exit code."""
    lines = [ln.split("\r")[-1] for ln in err.strip().splitlines() if ln.strip()]
    assert code == expected_code, (code, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert lines and sum("error:" in ln for ln in lines) == 1 and "error:" in lines[-1], err[-3000:]
    if match is not None:
        assert match in lines[-1], lines[-1]
    return lines[-1]


# --------------------------------------------------------------------------- where outputs may go

STAGES = {
    "sample": lambda m, o: ["sample", "--model", m, "--output-dir", o, "--num-images", 1, "--steps", 1,
                            "--no-progress"],
    "prune": lambda m, o: ["prune", "--model", m, "--output-dir", o, "--method", "magnitude", "--ratio", 0.3,
                           "--batch-size", 2],
    "finetune": lambda m, o: ["finetune", "--model", m, "--data", "digits", "--output-dir", o, "--steps", 1,
                              "--batch-size", 2, "--no-tensorboard", "--no-progress"],
    "report": lambda m, o: ["report", "--prune", m, "--output-dir", o],
}
# A tiny `train` run, so that a refusal that stopped working costs seconds, not a CIFAR-10 training.
TRAIN_FAST = ["--sample-size", 8, "--in-channels", 1, "--block-out-channels", "8,16", "--norm-num-groups", 4,
              "--attention-levels", "", "--steps", 1, "--batch-size", 2, "--no-tensorboard", "--no-progress"]
DEMO_FAST = ["--finetune-steps", 1, "--num-images", 10, "--sample-steps", 1]
INPUT_OPTION = {"sample": "--model", "prune": "--model", "finetune": "--model", "report": "--prune"}


def _location(name: str, project: Path) -> tuple[str, str]:
    """(output path, expected text in the error line) for each forbidden place."""
    teacher = project / "teacher"
    if name == "cwd":
        os.chdir(project)
        return ".", "is the current directory"
    if name == "model":
        return str(teacher), "is the {opt} input"
    if name == "model/unet":
        return str(teacher / "unet"), "lies inside the {opt} input"
    if name == "parent of model":
        return str(project), "contains the {opt} input"
    if name == "parent of cwd":
        os.chdir(teacher / "unet")
        return str(teacher.parent.parent), "contains the current directory"
    if name == "home":
        return os.environ["HOME"], "is the home directory"
    if name == "root":
        return "/", "is a filesystem root"
    raise AssertionError(name)


LOCATIONS = ["cwd", "model", "model/unet", "parent of model", "parent of cwd", "home", "root"]


# "/" only without --overwrite: the refusal takes no flags (the plain case proves it comes first), and a
# regression with --overwrite would write staging folders into / where tests run as root.
PLACES = [pytest.param(where, flags, id=f"{where}-{'overwrite' if flags else 'plain'}")
          for where in LOCATIONS for flags in (["--overwrite"], []) if not (where == "root" and flags)]


@pytest.mark.parametrize("where, flags", PLACES)
@pytest.mark.parametrize("stage", list(STAGES))
def test_output_over_an_input_or_a_guarded_folder_is_refused(stage, where, flags, project, capsys):
    home = Path(os.environ["HOME"])
    before = tree_hashes(project.parent)
    output, match = _location(where, project)
    argv = STAGES[stage](project / "teacher", output) + flags
    code, err = run_cli(argv, capsys)
    one_line(code, err, 2, match.format(opt=INPUT_OPTION[stage]))
    assert tree_hashes(project.parent) == before
    assert (project / "thesis.txt").read_text() == "four years of work\n" and (home / "notes.txt").is_file()
    assert not leftovers(project.parent) and not Path("/..lock").exists()


@pytest.mark.parametrize("argv_of, match", [
    (lambda p: ["sample", "--model", p / "teacher", "--output-dir", ".", "--resume", "--num-images", 1], "current"),
    (lambda p: ["train", "--data", "digits", "--output-dir", ".", "--overwrite", *TRAIN_FAST],
     "is the current directory"),
    (lambda p: ["train", "--data", p, "--output-dir", p / "imgs_out", "--overwrite", *TRAIN_FAST],
     "lies inside the --data input"),
    (lambda p: ["train", "--model-config", p / "teacher/unet/config.json", "--data", "digits",
                "--output-dir", p / "teacher/unet", "--overwrite", *TRAIN_FAST], "contains the --model-config input"),
    (lambda p: ["finetune", "--model", p / "teacher", "--data", "digits", "--output-dir", p / "elsewhere",
                "--teacher", p, "--distill", "output", "--overwrite"], "lies inside the --teacher input"),
    (lambda p: ["finetune", "--model", p / "teacher", "--data", p, "--output-dir", p / "x",
                "--overwrite", "--resume"], "lies inside the --data input"),
    (lambda p: ["demo", "--teacher", p / "teacher", "--output-dir", p, "--overwrite", *DEMO_FAST],
     "contains the --teacher input"),
    (lambda p: ["demo", "--output-dir", ".", "--overwrite", *DEMO_FAST], "is the current directory"),
    (lambda p: ["report", "--student-samples", p, "--output-dir", p / "r", "--overwrite"],
     "lies inside the --student-samples input"),
])
def test_other_stages_and_inputs_are_guarded_too(argv_of, match, project, capsys):
    argv = argv_of(project)
    if "." in argv:
        os.chdir(project)
    before = tree_hashes(project.parent)
    code, err = run_cli(argv, capsys)
    one_line(code, err, 2, match)
    assert tree_hashes(project.parent) == before and not leftovers(project.parent)


def test_distillation_guards_the_base_model_the_pruned_folder_records(project, capsys):
    """finetune --distill without --teacher reads the recorded base model: it is an input too."""
    pruned = project.parent / "pruned"
    code, _ = run_cli(["prune", "--model", project / "teacher", "--data", "digits", "--method", "magnitude",
                       "--ratio", 0.3, "--batch-size", 2, "--output-dir", pruned], capsys)
    assert code == 0
    before = tree_hashes(project)
    code, err = run_cli(["finetune", "--model", pruned, "--data", "digits", "--distill", "output",
                         "--output-dir", project / "teacher" / "ft", "--steps", 1, "--batch-size", 2], capsys)
    one_line(code, err, 2, "recorded base model")
    assert tree_hashes(project) == before and not leftovers(project)


def test_a_symlink_to_an_input_is_resolved(project, capsys):
    (project.parent / "alias").symlink_to(project / "teacher")
    before = tree_hashes(project.parent)
    # the output names the input through a link in its path: still the input
    code, err = run_cli(STAGES["sample"](project / "teacher", project.parent / "alias" / "unet") + ["--overwrite"],
                        capsys)
    one_line(code, err, 2, "lies inside the --model input")
    assert tree_hashes(project.parent) == before


# --------------------------------------------------------------------------- --overwrite only replaces our own


@pytest.mark.parametrize("stage, marker", [("sample", "sample_config.json"), ("prune", "prune_config.json"),
                                           ("finetune", "finetune_config.json"), ("report", "report_data.json")])
def test_overwrite_refuses_a_folder_the_stage_did_not_write(stage, marker, project, capsys):
    victim = project.parent / "victim"
    victim.mkdir()
    (victim / "data.csv").write_text("a,b\n1,2\n")
    other = project.parent / "other_stage"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"\0" * 64)
    wrong = "demo_config.json" if stage != "demo" else "sample_config.json"
    (other / wrong).write_text(json.dumps({"stage": wrong.split("_")[0]}))
    liar = project.parent / "liar"
    liar.mkdir()
    (liar / marker).write_text(json.dumps({"stage": "prune" if stage != "prune" else "sample"}))
    deep = project.parent / "deep"
    deep.mkdir()
    (deep / marker).write_text(DEEP)
    before = tree_hashes(project.parent)
    for folder, match in ((victim, f"was not written by `diffprune {stage}` (no {marker}); refusing to replace it"),
                          (other, f"(no {marker})"), (liar, "has stage="), (deep, "nested too deeply")):
        code, err = run_cli(STAGES[stage](project / "teacher", folder) + ["--overwrite"], capsys)
        one_line(code, err, 2, match)
    assert tree_hashes(project.parent) == before and not leftovers(project.parent)


def test_an_empty_folder_is_used_and_our_own_folder_is_replaced(project, capsys):
    out = project.parent / "samples"
    out.mkdir()
    argv = STAGES["sample"](project / "teacher", out)
    assert run_cli(argv, capsys)[0] == 0  # an existing empty folder is fine
    assert read_json(out / "sample_config.json", "x")["stage"] == "sample"
    assert run_cli(argv + ["--overwrite", "--seed", "3"], capsys)[0] == 0  # written by `sample`: replaced
    assert read_json(out / "sample_config.json", "x")["seed"] == 3 and not leftovers(project.parent)


@pytest.mark.parametrize("target", ["empty folder", "sample folder", "dangling"])
def test_a_symlinked_output_dir_is_refused_and_leaves_no_stray_links(target, project, capsys):
    real = project.parent / "real"
    if target == "empty folder":
        real.mkdir()
    elif target == "sample folder":
        assert run_cli(STAGES["sample"](project / "teacher", real), capsys)[0] == 0
    link = project.parent / "link"
    link.symlink_to(real)
    before = tree_hashes(project.parent)
    for stage in ("sample", "prune", "report"):
        code, err = run_cli(STAGES[stage](project / "teacher", link) + ["--overwrite"], capsys)
        one_line(code, err, 2, "is a symbolic link")
    assert tree_hashes(project.parent) == before and not leftovers(project.parent)


# --------------------------------------------------------------------------- evaluate --output


def _cost_eval(model, output, *extra):
    return ["evaluate", "--model", model, "--latency-repeats", 1, "--latency-warmup", 0, "--output", output, *extra]


def test_evaluate_never_writes_over_an_input(project, capsys):
    teacher = project / "teacher"
    samples = project.parent / "s"
    assert run_cli(STAGES["sample"](teacher, samples) + ["--num-images", 2], capsys)[0] == 0
    (project / "ref.npz").write_bytes(b"PK not really")
    (project.parent / "a_folder").mkdir()
    before = tree_hashes(project.parent)
    cases = [
        (_cost_eval(teacher, teacher / "unet" / "config.json"), "lies inside the --model input"),
        (_cost_eval(teacher, teacher / "unet" / "config.json", "--overwrite"), "lies inside the --model input"),
        (_cost_eval(teacher, teacher / "model_index.json", "--overwrite"), "lies inside the --model input"),
        (["evaluate", "--samples", samples, "--output", samples / "000000.png", "--overwrite"],
         "lies inside the --samples input"),
        (["evaluate", "--samples", samples, "--reference", project / "ref.npz", "--output", project / "ref.npz",
          "--overwrite"], "is the --reference input"),
        (["evaluate", "--samples", samples, "--reference", project / "ref.npz", "--save-stats",
          project / "ref.npz", "--overwrite"], "--save-stats"),
        (_cost_eval(teacher, project / "thesis.txt"), "already exists; pass --overwrite"),
        (_cost_eval(teacher, project / "thesis.txt", "--overwrite"), "is not a diffprune evaluation JSON"),
        (_cost_eval(teacher, project.parent / "a_folder"), "is a folder"),
    ]
    for argv, match in cases:
        code, err = run_cli(argv, capsys)
        one_line(code, err, 2, match)
    assert tree_hashes(project.parent) == before and not leftovers(project.parent)


def test_the_evaluate_api_never_writes_over_an_input_either(project):
    """Scripts calling `diffprune.evaluate` get the same guard as the CLI, even with overwrite=True."""
    from diffprune.errors import DiffpruneError
    from diffprune.evaluate.stage import EvaluateConfig, evaluate

    teacher = project / "teacher"
    before = tree_hashes(project)
    for output in (teacher / "unet" / "config.json", project / "thesis.txt"):
        with pytest.raises(DiffpruneError, match="lies inside the --model input|not a diffprune evaluation JSON"):
            evaluate(EvaluateConfig(model=str(teacher), latency_repeats=1, latency_warmup=0, output=str(output)),
                     overwrite=True)
    assert tree_hashes(project) == before and not leftovers(project)


def test_evaluate_replaces_its_own_json_only_with_overwrite(project, capsys):
    out = project.parent / "eval.json"
    argv = _cost_eval(project / "teacher", out)
    assert run_cli(argv, capsys)[0] == 0
    first = out.read_bytes()
    one_line(*run_cli(argv, capsys), 2, "already exists; pass --overwrite")
    assert out.read_bytes() == first
    assert run_cli(argv + ["--overwrite"], capsys)[0] == 0
    assert read_json(out, "x")["format"] == "diffprune-evaluation" and not leftovers(project.parent)


# --------------------------------------------------------------------------- hostile JSON


def test_read_json_turns_every_bad_file_into_one_line(tmp_path):
    cases = {"deep.json": (DEEP, "nested too deeply"), "list.json": ("[1]", "holds a JSON array, expected an object"),
             "broken.json": ("{x", "not valid JSON"), "latin1.json": (b"\xff\xfe{", "not UTF-8")}
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(DiffpruneError, match=match) as info:
            read_json(path, "thing")
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DiffpruneError, match="does not exist"):
        read_json(tmp_path / "missing.json", "thing")
    with pytest.raises(DiffpruneError, match="not readable"):
        read_json(tmp_path, "thing")



def test_atomic_write_is_all_or_nothing(tmp_path, monkeypatch):
    """bytes, text and a writer callback land complete (fsynced before the rename); a failure keeps the
    old file and leaves no temp file; a full disk is one EnvironmentFailure line naming the target."""
    from diffprune import fsutil
    from diffprune.errors import EnvironmentFailure

    target = tmp_path / "out.bin"
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(fsutil.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    assert fsutil.atomic_write(target, b"\x00\x01") == target and target.read_bytes() == b"\x00\x01"
    assert events == ["fsync", "replace"]
    fsutil.atomic_write(target, "caf\u00e9\n")
    assert target.read_bytes() == "caf\u00e9\n".encode()
    fsutil.atomic_write(target, lambda tmp: tmp.write_bytes(b"from a callback"))
    assert target.read_bytes() == b"from a callback"

    def half_then(exc):
        def write(tmp):
            tmp.write_bytes(b"half")
            raise exc
        return write

    with pytest.raises(EnvironmentFailure, match=f"no space left on device while writing {target}$"):
        fsutil.atomic_write(target, half_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(KeyError):
        fsutil.atomic_write(target, half_then(KeyError("a bug")))
    assert target.read_bytes() == b"from a callback" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    fsutil.write_json_atomic(tmp_path / "d.json", {"a": [1, 2]})
    assert read_json(tmp_path / "d.json", "x") == {"a": [1, 2]} and not leftovers(tmp_path)

def test_deeply_nested_json_inputs_fail_in_one_line(project, capsys):
    teacher = project / "teacher"
    samples = project.parent / "s"
    assert run_cli(STAGES["sample"](teacher, samples), capsys)[0] == 0
    nested = project.parent / "nested"
    shutil.copytree(teacher, nested)
    (nested / "model_index.json").write_text(DEEP)
    (samples / "sample_config.json").write_text(DEEP)
    (project / "eval.json").write_text(DEEP)
    (project / "unet_config.json").write_text(DEEP)
    run = project.parent / "ft"
    state = run / "checkpoints" / "step_000001"
    state.mkdir(parents=True)
    (state / "trainer_state.json").write_text(DEEP)
    before = tree_hashes(project.parent)
    cases = [
        (STAGES["sample"](nested, project.parent / "o1"), "model_index.json"),
        (STAGES["sample"](teacher, samples) + ["--resume"], "sample_config.json"),
        (["report", "--evaluation", project / "eval.json", "--output-dir", project.parent / "o2"], "eval.json"),
        (["train", "--model-config", project / "unet_config.json", "--data", "digits", "--output-dir",
          project.parent / "o3"], "unet_config.json"),
        (STAGES["finetune"](teacher, run) + ["--resume", "--steps", 2], "trainer_state.json"),
    ]
    for argv, name in cases:
        code, err = run_cli(argv, capsys)
        line = one_line(code, err, 2, name)
        assert "nested too deeply" in line or "recursion" in line, line
    assert tree_hashes(project.parent) == before and not leftovers(project.parent)


def test_deeply_nested_captions_line_is_one_error(tmp_path):
    from diffprune.families.unet2d_condition import read_captions

    path = tmp_path / "captions.jsonl"
    path.write_text('{"file_name": "a.png", "text": "x"}\n' + DEEP + "\n")
    with pytest.raises(DiffpruneError, match=r"captions.jsonl:2"):
        read_captions(path)


# --------------------------------------------------------------------------- a full disk


def _no_space(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_no_space(real):
    """A write function that leaves half a file, as a full disk does, then raises ENOSPC."""
    def write(self, data, *args, **kwargs):
        real(self, data[: len(data) // 2], *args, **kwargs)
        _no_space()
    return write


def test_full_disk_while_pruning_is_one_line_and_leaves_nothing(project, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def serialize_file(tensors, filename, metadata=None):  # what safetensors' Rust writer reports
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)
    out = project.parent / "pruned"
    before = tree_hashes(project)
    code, err = run_cli(STAGES["prune"](project / "teacher", out), capsys)
    one_line(code, err, 1, f"no space left on device while writing {out}")
    assert not out.exists() and not leftovers(project.parent) and tree_hashes(project) == before


def test_full_disk_while_sampling_keeps_the_old_folder_and_no_temp_files(project, monkeypatch, capsys):
    from PIL import Image

    out = project.parent / "s"
    assert run_cli(STAGES["sample"](project / "teacher", out), capsys)[0] == 0
    before = tree_hashes(project.parent)
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[:10])
        _no_space()

    monkeypatch.setattr(Image.Image, "save", save)
    for flags in (["--overwrite", "--seed", 1], []):
        target = out if flags else project.parent / "fresh"
        code, err = run_cli(STAGES["sample"](project / "teacher", target) + flags, capsys)
        one_line(code, err, 1, f"no space left on device while writing {target}")
    assert tree_hashes(out) == {k: v for k, v in before.items() if k.startswith(str(out) + os.sep)}
    assert tree_hashes(project) == {k: v for k, v in before.items() if k.startswith(str(project) + os.sep)}
    assert not leftovers(project.parent)


def test_full_disk_while_evaluating_or_reporting_leaves_no_temp_file(project, monkeypatch, capsys):
    samples = project.parent / "s"
    assert run_cli(STAGES["sample"](project / "teacher", samples) + ["--num-images", 2], capsys)[0] == 0
    before = tree_hashes(project.parent)
    monkeypatch.setattr(Path, "write_text", _half_then_no_space(Path.write_text))
    out = project.parent / "eval.json"
    code, err = run_cli(_cost_eval(project / "teacher", out), capsys)
    one_line(code, err, 1, f"no space left on device while writing {out}")
    rep = project.parent / "rep"
    code, err = run_cli(["report", "--teacher-samples", samples, "--student-samples", samples, "--output-dir", rep],
                        capsys)
    one_line(code, err, 1, f"no space left on device while writing {rep}")
    assert not out.exists() and not rep.exists()
    assert tree_hashes(project.parent) == before and not leftovers(project.parent)


def test_full_disk_while_finetuning_exits_1_in_one_line(project, monkeypatch, capsys):
    from diffprune.train import checkpoints

    monkeypatch.setattr(checkpoints, "save_file", _no_space)
    out = project.parent / "ft"
    code, err = run_cli(STAGES["finetune"](project / "teacher", out) + ["--checkpoint-every", 1], capsys)
    one_line(code, err, 1, "No space left on device")
    assert not leftovers(project.parent)


def test_a_forbidden_output_folder_exits_1_in_one_line(project, monkeypatch, capsys):
    real_open = os.open

    def open_(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    code, err = run_cli(STAGES["prune"](project / "teacher", project.parent / "p"), capsys)
    one_line(code, err, 1, "Permission denied")
    assert not (project.parent / "p").exists()


# --------------------------------------------------------------------------- the error boundary


@pytest.mark.parametrize("exc, code, match", [
    (TypeError("boom"), 1, "internal error TypeError: boom (a bug in diffprune; rerun with DIFFPRUNE_DEBUG=1"),
    (RecursionError("maximum recursion depth exceeded"), 2, "nested too deeply"),
    (MemoryError(), 1, "out of memory"),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "no space left on device while writing OUT"),
    (OSError(errno.EROFS, "Read-only file system"), 1, "read-only file system while writing OUT"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/x.png"), 1, "permission denied: /data/x.png"),
    (DiffpruneError("bad value\nsecond line"), 2, "bad value"),
])
def test_the_boundary_turns_every_failure_into_one_line(exc, code, match, monkeypatch, capsys):
    from diffprune.cli import sample

    def run(args):
        raise exc

    monkeypatch.setattr(sample, "run", run)
    got, err = run_cli(["sample", "--model", "m", "--output-dir", "OUT"], capsys)
    one_line(got, err, code, match)


def test_debug_shows_the_traceback_of_a_bug_and_sigterm_handler_is_restored(monkeypatch, capsys):
    from diffprune.cli import sample

    def run(args):
        raise TypeError("boom")

    monkeypatch.setattr(sample, "run", run)
    handler = signal.getsignal(signal.SIGTERM)
    run_cli(["sample", "--model", "m", "--output-dir", "o"], capsys)
    assert signal.getsignal(signal.SIGTERM) is handler
    monkeypatch.setenv("DIFFPRUNE_DEBUG", "1")
    with pytest.raises(TypeError, match="boom"):
        cli.main(["sample", "--model", "m", "--output-dir", "o"])


@pytest.fixture(scope="module")
def slow_pipe(tmp_path_factory):
    """1000 timesteps: Diff-Pruning's sweep takes seconds, so a signal lands mid-run."""
    unet = tiny_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    return save_tiny_pipeline(tmp_path_factory.mktemp("slow") / "pipe", unet=unet)


def test_sigterm_during_prune_cleans_up_like_ctrl_c(slow_pipe, tmp_path):
    out = tmp_path / "pruned"
    before = tree_hashes(slow_pipe)
    proc = subprocess.Popen([sys.executable, "-m", "diffprune.cli", "prune", "--model", str(slow_pipe),
                             "--output-dir", str(out), "--threshold", "0", "--batch-size", "4"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while not lock_path(out).exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < end, "no lock within 60 s"
            time.sleep(0.02)
        time.sleep(1.0)  # inside the run (loading or the timestep sweep)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].split("\r")[-1] == "diffprune prune: terminated (SIGTERM)"
    assert not out.exists() and not lock_path(out).exists() and not leftovers(tmp_path)
    assert tree_hashes(slow_pipe) == before
