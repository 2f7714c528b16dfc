"""train/: exact resume, pruned round trip, distillation, fresh training, errors, two processes."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch
from conftest import save_tiny_pipeline, tiny_unet
from safetensors.torch import load_file
from test_sampling import launch

import diffprune.train as training
from diffprune import cli, diffusion
from diffprune.errors import DiffpruneError, EnvironmentFailure
from diffprune.io import PrunedUNet2DModel, load_pipeline, to_pruned
from diffprune.train import EMA, StepBatches, checkpoints, distillation, finetune, train, unet_config

FAST = dict(batch_size=2, tensorboard=False, progress=False, log_every=1)


def unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def pipe_dir(tmp_path):
    return save_tiny_pipeline(tmp_path / "pipe")


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, pipe_dir):
    kw = dict(steps=4, checkpoint_every=2, grad_accum=2, ema_warmup="ratio", **FAST)
    full = finetune(pipe_dir, "digits", tmp_path / "full", **kw)
    part = tmp_path / "part"
    finetune(pipe_dir, "digits", part, max_steps_this_run=1, **kw)  # checkpoint at step 1 (stop)
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step_000001"]
    assert not (part / "model_index.json").exists()
    finetune(pipe_dir, "digits", part, resume=True, max_steps_this_run=2, **kw)  # to step 3
    finetune(pipe_dir, "digits", part, resume=True, **kw)  # to the end
    assert_same(unet_weights(full), unet_weights(part))
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert_same(load_file(str(full / "checkpoints/step_000004" / name)),
                    load_file(str(part / "checkpoints/step_000004" / name)))
    # the exported unet is the EMA, not the raw weights; keep-2 pruned the older checkpoints
    ema = load_file(str(full / "checkpoints/step_000004/ema.safetensors"))
    raw = load_file(str(full / "checkpoints/step_000004/model.safetensors"))
    assert_same(unet_weights(full), ema)
    assert not all(torch.equal(ema[k], raw[k]) for k in raw)
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    log = json.loads((part / "train_log.json").read_text())
    assert [r["step"] for r in log["records"]] == [1, 2, 3, 4]
    assert {"loss", "loss_task", "lr", "ema_decay", "steps_per_s", "elapsed_s"} <= set(log["records"][0])
    state = json.loads((full / "checkpoints/step_000004/trainer_state.json").read_text())
    assert state["step"] == 4 and state["config"]["stage"] == "finetune" and state["num_processes"] == 1
    assert json.loads((full / "finetune_config.json").read_text())["grad_accum"] == 2


def test_resume_refuses_another_config_or_model(tmp_path, pipe_dir):
    out = tmp_path / "run"
    finetune(pipe_dir, "digits", out, steps=2, max_steps_this_run=1, **FAST)
    with pytest.raises(DiffpruneError, match=r"lr=0\.0002, this run has lr=0\.001"):
        finetune(pipe_dir, "digits", out, steps=2, lr=1e-3, resume=True, **FAST)
    other = save_tiny_pipeline(tmp_path / "other", tiny_unet(seed=1))
    with pytest.raises(DiffpruneError, match="model="):
        finetune(other, "digits", out, steps=2, resume=True, **FAST)
    save_tiny_pipeline(pipe_dir, tiny_unet(seed=2))  # same path, new weights
    with pytest.raises(DiffpruneError, match="different model"):
        finetune(pipe_dir, "digits", out, steps=2, resume=True, **FAST)
    with pytest.raises(DiffpruneError, match="--resume or --overwrite|--resume to continue"):
        finetune(pipe_dir, "digits", out, steps=2, **FAST)


def _pruned_pipeline(tmp_path, base_dir):
    info = {"format": "diffprune-pruning", "format_version": 1, "base_class": "UNet2DModel",
            "base_model": {"id": str(base_dir), "revision": None}, "method": {}, "kept_timesteps": []}
    student = to_pruned(tiny_unet(seed=3, block_out_channels=(16, 32)), info)  # narrower than the teacher
    return save_tiny_pipeline(tmp_path / "pruned", student)


def test_finetune_pruned_with_distillation_keeps_structure(tmp_path, pipe_dir):
    pruned = _pruned_pipeline(tmp_path, pipe_dir)
    out = finetune(pruned, "digits", tmp_path / "ft", steps=2, distill="both", ema_decay=0.5, **FAST)
    pipe = load_pipeline(out)
    assert isinstance(pipe.unet, PrunedUNet2DModel)
    assert pipe.unet.pruning_info["base_model"]["id"] == str(pipe_dir)
    ckpt = out / "checkpoints/step_000002"
    assert_same({k: v for k, v in pipe.unet.state_dict().items()}, load_file(str(ckpt / "ema.safetensors")))
    adapters = load_file(str(ckpt / "adapters.safetensors"))
    assert adapters and not set(adapters) & set(pipe.unet.state_dict())
    log = json.loads((out / "train_log.json").read_text())["records"][-1]
    assert log["loss_output_kd"] >= 0 and log["loss_feature_kd"] >= 0


def test_feature_adapters_map_widths():
    student, teacher = tiny_unet(block_out_channels=(16, 32)), tiny_unet()
    names = distillation.feature_points(student)
    adapters = distillation.make_adapters(student, teacher, names, "cpu")
    assert names[0] == "down_blocks.0" and "mid_block" in names
    assert adapters["down_blocks_0"].in_channels == 16 and adapters["down_blocks_0"].out_channels == 32
    same = distillation.make_adapters(teacher, teacher, names, "cpu")["mid_block"]
    assert torch.equal(same.weight[:, :, 0, 0], torch.eye(64))


def test_train_fresh_model(tmp_path):
    config = unet_config(sample_size=16, in_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                         attention_levels=(1,), norm_num_groups=8)
    out = train("digits", tmp_path / "fresh", model_config=config, steps=2,
                scheduler=training.scheduler_config(100), **{**FAST, "tensorboard": True})
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    pipe = load_pipeline(out)
    assert pipe.unet.config.block_out_channels == (16, 32) or list(pipe.unet.config.block_out_channels) == [16, 32]
    assert pipe.scheduler.config.num_train_timesteps == 100
    assert json.loads((out / "train_config.json").read_text())["model_config"]["sample_size"] == 16


def test_cli_train_with_architecture_flags(tmp_path, capsys):
    base = ["train", "--data", "digits", "--sample-size", "16", "--in-channels", "1", "--layers-per-block", "1",
            "--norm-num-groups", "8", "--num-train-timesteps", "50", "--steps", "1", "--batch-size", "2",
            "--no-tensorboard", "--no-progress"]
    out = tmp_path / "t"
    assert cli.main([*base, "--block-out-channels", "16,32", "--attention-levels", "", "--output-dir", str(out),
                     "--mixed-precision", "bf16"]) == 0
    assert str(out) in capsys.readouterr().out
    unet = load_pipeline(out).unet
    assert unet.config.down_block_types == ("DownBlock2D", "DownBlock2D") or \
        list(unet.config.down_block_types) == ["DownBlock2D", "DownBlock2D"]
    assert cli.main([*base, "--block-out-channels", "12,32", "--output-dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "12 is not divisible by norm_num_groups=8" in err
    assert not (tmp_path / "bad").exists()


def test_overwrite_keeps_the_old_run_until_the_new_one_completes(tmp_path, pipe_dir):
    out = tmp_path / "run"
    finetune(pipe_dir, "digits", out, steps=1, seed=0, **FAST)
    old = unet_weights(out)
    finetune(pipe_dir, "digits", out, steps=2, seed=1, overwrite=True, max_steps_this_run=1, **FAST)
    assert_same(unet_weights(out), old)  # interrupted --overwrite: the old run is untouched
    staging = tmp_path / ".run.new"
    assert (staging / "checkpoints/step_000001").is_dir()
    finetune(pipe_dir, "digits", out, steps=2, seed=1, resume=True, **FAST)  # continues the staging run
    assert not staging.exists()
    assert json.loads((out / "finetune_config.json").read_text())["seed"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]


def poison_targets_from(monkeypatch, call: int) -> None:
    """Training targets become NaN from the `call`-th noisy_and_target call on (one call per step here)."""
    real = diffusion.noisy_and_target
    calls = {"n": 0}

    def poisoned(scheduler, x0, noise, t):
        calls["n"] += 1
        x_t, target = real(scheduler, x0, noise, t)
        return x_t, target * float("nan") if calls["n"] >= call else target

    monkeypatch.setattr(diffusion, "noisy_and_target", poisoned)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, pipe_dir, monkeypatch):
    poison_targets_from(monkeypatch, 3)
    out = tmp_path / "nan"
    with pytest.raises(DiffpruneError, match=r"loss is nan at step 3.*step_000002"):
        finetune(pipe_dir, "digits", out, steps=4, checkpoint_every=2, **FAST)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]


def test_checkpoint_write_failure_keeps_the_last_good_one(tmp_path, pipe_dir, monkeypatch):
    real = checkpoints.save_file

    def failing(tensors, path, metadata=None):
        if "step_000004" in path:
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", failing)
    out = tmp_path / "disk"
    with pytest.raises(DiffpruneError, match="No space left on device.*step_000002 is kept"):
        finetune(pipe_dir, "digits", out, steps=4, checkpoint_every=2, **FAST)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]
    assert load_file(str(out / "checkpoints/step_000002/model.safetensors"))


def _enforce_write_bits(monkeypatch):
    """Make folder permissions bind root too: creating or renaming an entry in a folder without the
    owner's write bit raises EACCES, the error the kernel gives any other user (root skips the check)."""
    def guarded(real, *paths_of):
        def call(*args, **kwargs):
            for k in paths_of:
                parent = os.path.dirname(os.path.abspath(os.fspath(args[k])))
                if not os.stat(parent).st_mode & stat.S_IWUSR:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(args[k]))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(os, "mkdir", guarded(os.mkdir, 0))
    monkeypatch.setattr(os, "rename", guarded(os.rename, 0, 1))
    monkeypatch.setattr(os, "replace", guarded(os.replace, 0, 1))


def test_read_only_checkpoint_folder(tmp_path, pipe_dir, monkeypatch):
    out = tmp_path / "ro"
    finetune(pipe_dir, "digits", out, steps=2, max_steps_this_run=1, **FAST)
    kept = load_file(str(out / "checkpoints/step_000001/model.safetensors"))
    _enforce_write_bits(monkeypatch)  # as root (this container), the chmod below binds only through this
    (out / "checkpoints").chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(EnvironmentFailure, match="could not write checkpoint .*step_000002 at step 2 "
                           r"\(Permission denied\); the last good checkpoint .*step_000001 is kept") as err:
            finetune(pipe_dir, "digits", out, steps=2, resume=True, **FAST)
        assert "\n" not in str(err.value)
    finally:
        (out / "checkpoints").chmod(stat.S_IRWXU)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000001"]
    assert_same(load_file(str(out / "checkpoints/step_000001/model.safetensors")), kept)


@pytest.mark.parametrize("args,needle", [
    (["--steps", "0"], "--steps: '0' is out of range; allowed: [1, inf]"),
    (["--lr", "0"], "--lr/--learning_rate: '0' is out of range; allowed: (0.0, 1.0]"),
    (["--lr", "1.5"], "'1.5' is out of range"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--dropout", "1"], "--dropout: '1' is out of range; allowed: [0.0, 1.0)"),
    (["--data", "/nonexistent/images"], "data folder '/nonexistent/images' does not exist"),
    (["--mixed-precision", "fp16"], "mixed_precision='fp16' needs a GPU"),
])
def test_cli_bad_input_is_one_line(tmp_path, pipe_dir, capsys, args, needle):
    argv = ["finetune", "--model", str(pipe_dir), "--data", "digits", "--output-dir", str(tmp_path / "o"),
            "--steps", "1", "--batch-size", "2", "--no-tensorboard", "--no-progress", *args]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: diffusers' loading bar
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.parametrize("name", ["train", "finetune", "sample"])
def test_help_states_every_default(name):
    sub = cli.build_parser()._subparsers._group_actions[0].choices[name]
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        if action.option_strings and action.nargs != 0 and not action.required:
            assert "default" in action.help, action.dest
    assert "--output_dir" in sub.format_help()


def test_step_batches_depend_only_on_step_and_rank():
    a = StepBatches(10, 3, seed=0, rank=1, world=2, start=0)
    b = StepBatches(10, 3, seed=0, rank=1, world=2, start=4)
    first = [next(it) for it in [iter(a)] for _ in range(6)]
    assert next(iter(b)) == first[4]
    ranks = [next(iter(StepBatches(10, 5, 0, r, 2, 0))) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))  # one epoch split without overlap


def test_ema_warmups():
    model = torch.nn.Linear(2, 2)
    assert EMA(model, 0.9999, "none").decay_at(0) == 0.9999
    assert EMA(model, 0.9999, "ratio").decay_at(0) == pytest.approx(0.1)
    assert EMA(model, 0.9999, "power").decay_at(0) == 0.0
    assert EMA(model, 0.5, "ratio").decay_at(10 ** 6) == 0.5


def test_ema_update_matches_the_formula_and_copies_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, 0.9, "none")
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 5
    ema.update(model, 0)
    for k, v in model.state_dict().items():
        want = v.clone() if not v.is_floating_point() else before[k] + 0.1 * (v.float() - before[k])
        torch.testing.assert_close(ema.shadow[k], want, rtol=0, atol=1e-7)
    assert int(ema.shadow["1.num_batches_tracked"]) == 5


def test_optimizer_is_fused_adam_on_cpu():
    opt = training.make_optimizer(torch.nn.Linear(2, 2), 1e-3)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["fused"] is True


def test_nan_in_a_logged_window_names_its_own_step(tmp_path, pipe_dir, monkeypatch):
    """Losses are checked at log/checkpoint steps only; the message still names the first bad step."""
    poison_targets_from(monkeypatch, 2)
    kw = {**FAST, "log_every": 4}
    with pytest.raises(DiffpruneError, match=r"loss is nan at step 2; .*no checkpoint"):
        finetune(pipe_dir, "digits", tmp_path / "nan", steps=8, checkpoint_every=4, **kw)
    assert not (tmp_path / "nan" / "checkpoints").exists() or not any((tmp_path / "nan" / "checkpoints").iterdir())


def test_two_processes_train_in_sync(tmp_path, pipe_dir):
    out = tmp_path / "ddp"
    proc = launch(["finetune", "--model", str(pipe_dir), "--data", "digits", "--output-dir", str(out),
                   "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1", "--no-tensorboard",
                   "--no-progress", "--distill", "features", "--teacher", str(pipe_dir)], 2, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoints/step_000002/trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert isinstance(load_pipeline(out).unet, torch.nn.Module)
