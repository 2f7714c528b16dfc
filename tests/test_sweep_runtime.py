"""How the calibration sweep runs (sweep_runtime.py, issue 24): micro-batches, gradient checkpointing,
bf16 autocast and several processes change memory and speed, never the importance or the pruned model
(beyond float rounding; bf16 is measured, not bounded)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, save_tiny_pipeline, sd_pipeline, tiny_unet
from diffusers import DDPMScheduler, DiTTransformer2DModel
from safetensors.torch import load_file
from test_sampling import launch

from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.prune.config import PruneConfig
from diffprune.prune.importance import estimate, estimate_fast
from diffprune.prune.sweep_runtime import SweepRuntime

T = 30
THR = 0.96  # x0-prediction: L_t falls slowly, so this threshold cuts mid-range (as in test_importance.py)


def _unet_case():
    model = tiny_unet().requires_grad_(True)
    images = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return model, DDPMScheduler(num_train_timesteps=T, prediction_type="sample"), images, None


def _sd_case():
    model = sd_pipeline().unet.requires_grad_(True)
    images = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(5, 12, 16, generator=torch.Generator().manual_seed(2))  # one prompt per image
    return model, DDPMScheduler(num_train_timesteps=T, prediction_type="sample"), images, {
        "encoder_hidden_states": text}


def _dit_case():
    torch.manual_seed(4)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                  norm_num_groups=8).eval().requires_grad_(True)
    images = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, DDPMScheduler(num_train_timesteps=T, prediction_type="sample"), images, {
        "class_labels": torch.tensor([0, 3, 5, 7, 9])}


CASES = {"unet2d": _unet_case, "sd": _sd_case, "dit": _dit_case}


def _max_rel(a: dict, b: dict) -> float:
    """The largest |a - b| over all gradients, relative to the largest |a|."""
    assert a.keys() == b.keys()
    scale = max(float(v.abs().max()) for v in a.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


@pytest.mark.parametrize("case", sorted(CASES))
def test_micro_batches_give_the_one_batch_sweep(case):
    model, sched, images, cond = CASES[case]()
    family = family_for(model)
    whole = estimate(model, family, sched, images, "diff-pruning", THR, seed=3, progress=False, cond=cond)
    assert (whole.cut is not None or case != "unet2d") and whole.runtime["micro_batch_size"] is None
    for m in (1, 2):
        part = estimate(model, family, sched, images, "diff-pruning", THR, seed=3, progress=False, cond=cond,
                        runtime=SweepRuntime(micro_batch_size=m))
        assert part.cut == whole.cut and part.kept_timesteps == whole.kept_timesteps
        assert [t for t, _ in part.losses] == [t for t, _ in whole.losses]
        for (_, a), (_, b) in zip(part.losses, whole.losses, strict=True):
            assert a == pytest.approx(b, rel=1e-5)
        assert _max_rel(part.grads, whole.grads) < 1e-5
        assert part.runtime["micro_batch_size"] == m and part.sample_gradient_evals == whole.sample_gradient_evals
    assert all(p.grad is None for p in model.parameters())


def test_fast_estimator_micro_batches_give_the_same_passes():
    model, sched, images, cond = _sd_case()
    family = family_for(model)
    kw = dict(seed=2, grid_stride=5, cut_batch=3, pairs_per_pass=5, passes=3, progress=False, cond=cond)
    whole = estimate_fast(model, family, sched, images, 0.5, **kw)
    part = estimate_fast(model, family, sched, images, 0.5, runtime=SweepRuntime(micro_batch_size=2), **kw)
    assert part.cut == whole.cut and [t for t, _ in part.losses] == [t for t, _ in whole.losses]
    assert [v for _, v in part.losses] == pytest.approx([v for _, v in whole.losses], rel=1e-5)
    assert _max_rel(part.grads, whole.grads) < 1e-5


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_gradient_checkpointing_recomputes_during_the_sweep_only():
    model, sched, images, cond = _unet_case()
    family = family_for(model)
    resnet_calls = _count_calls(model.down_blocks[0].resnets[0])
    plain = estimate(model, family, sched, images, "taylor", progress=False)
    plain_calls = len(resnet_calls)
    resnet_calls.clear()
    ckpt = estimate(model, family, sched, images, "taylor", progress=False,
                    runtime=SweepRuntime(gradient_checkpointing=True))
    assert plain_calls == T and len(resnet_calls) == 2 * T  # each forward recomputed once in backward
    assert not model.is_gradient_checkpointing  # off again: the tracer must see every op
    assert _max_rel(ckpt.grads, plain.grads) < 1e-6 and ckpt.runtime["gradient_checkpointing"] is True
    model.enable_gradient_checkpointing()  # a model that had it on keeps it
    estimate(model, family, sched, images, "taylor", progress=False, runtime=SweepRuntime(gradient_checkpointing=True))
    assert model.is_gradient_checkpointing


def test_gradient_checkpointing_refused_for_a_model_without_it():
    with pytest.raises(DiffpruneError, match=r"Linear does not support gradient checkpointing; allowed: leave it off"):
        with SweepRuntime(gradient_checkpointing=True).applied(torch.nn.Linear(2, 2)):
            pass


def test_bf16_autocast_sweep_is_close_but_not_identical():
    model, sched, images, cond = _unet_case()
    family = family_for(model)
    fp32 = estimate(model, family, sched, images, "diff-pruning", THR, progress=False)
    bf16 = estimate(model, family, sched, images, "diff-pruning", THR, progress=False,
                    runtime=SweepRuntime(precision="bf16"))
    assert bf16.runtime["precision"] == "bf16" and all(g.dtype == torch.float32 for g in bf16.grads.values())
    assert abs(bf16.cut - fp32.cut) <= 2
    a = torch.cat([fp32.grads[k].flatten() for k in fp32.grads])
    b = torch.cat([bf16.grads[k].flatten() for k in fp32.grads])
    assert not torch.equal(a, b)  # autocast really ran in bf16
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99


def test_runtime_and_config_refuse_bad_values():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DiffpruneError, match="micro_batch_size"):
            SweepRuntime(micro_batch_size=bad)
    with pytest.raises(DiffpruneError, match=r"precision='fp16' is not one of \('fp32', 'bf16'\)"):
        SweepRuntime(precision="fp16")
    with pytest.raises(DiffpruneError, match="sweep_precision"):
        PruneConfig(model="m", ratio=0.3, sweep_precision="fp16")
    with pytest.raises(DiffpruneError, match="micro_batch_size=0"):
        PruneConfig(model="m", ratio=0.3, micro_batch_size=0)
    v2 = {"stage": "prune", "version": 2, "model": "m", "ratio": 0.3, "estimator": "exact"}
    old = PruneConfig.from_dict(v2)  # how a version-2 run swept: whole batch, no checkpointing, fp32
    assert (old.micro_batch_size, old.gradient_checkpointing, old.sweep_precision) == (None, False, "fp32")
    assert PruneConfig.from_dict(old.to_dict()) == old and old.to_dict()["version"] == 4


def test_cli_refuses_a_bad_micro_batch_size_in_one_line(tmp_path, capsys):
    code, err = run_cli(["prune", "--model", tmp_path, "--micro-batch-size", "0", "--output-dir", tmp_path / "o"],
                        capsys)
    assert code == 2 and "--micro-batch-size" in err and "0" in err


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sweep") / "pipe", num_train_timesteps=T)


def _weights(folder) -> dict:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _same_model(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)  # same widths
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5


PRUNE = ["--data", "digits", "--batch-size", "6", "--ratio", "0.4", "--threshold", "0.5", "--seed", "1"]


def test_cli_micro_batches_and_checkpointing_prune_the_same_model(pipe_dir, tmp_path, capsys):
    args = ["prune", "--model", pipe_dir, *PRUNE, "--estimator", "exact"]
    assert run_cli([*args, "--output-dir", tmp_path / "one"], capsys)[0] == 0
    assert run_cli([*args, "--micro-batch-size", "4", "--gradient-checkpointing", "--output-dir",
                    tmp_path / "micro"], capsys)[0] == 0
    _same_model(tmp_path / "one", tmp_path / "micro")
    report = json.loads((tmp_path / "micro" / "prune_report.json").read_text())
    assert report["importance"]["runtime"] == {"micro_batch_size": 4, "gradient_checkpointing": True,
                                               "precision": "fp32", "num_processes": 1}
    config = json.loads((tmp_path / "micro" / "prune_config.json").read_text())
    assert config["micro_batch_size"] == 4 and config["gradient_checkpointing"] is True


@pytest.mark.parametrize("estimator", ["exact", "fast"])
def test_two_processes_prune_the_one_process_model(pipe_dir, tmp_path, capsys, estimator):
    """`accelerate launch` with 2 CPU processes (gloo): micro-batches dealt to both, losses and gradients
    all-reduced, the main process writes: the same folder as one process."""
    args = ["prune", "--model", str(pipe_dir), *PRUNE, "--estimator", estimator, "--micro-batch-size", "2"]
    proc = launch([*args, "--output-dir", str(tmp_path / "two")], 2, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote pruned pipeline") == 1  # the main process alone writes and reports
    assert run_cli([*args, "--output-dir", tmp_path / "one"], capsys)[0] == 0
    _same_model(tmp_path / "one", tmp_path / "two")
    two = json.loads((tmp_path / "two" / "prune_report.json").read_text())["importance"]
    one = json.loads((tmp_path / "one" / "prune_report.json").read_text())["importance"]
    assert two["runtime"]["num_processes"] == 2 and one["runtime"]["num_processes"] == 1
    assert two["cut_timestep"] == one["cut_timestep"] and two["kept_timesteps"] == one["kept_timesteps"]
    assert [v for _, v in two["losses"]] == pytest.approx([v for _, v in one["losses"]], rel=1e-5)


def test_pruning_reads_the_gradient_sums_without_changing_them():
    """prune_model_at_ratio hands the sums to torch-pruning uncopied (memory at full size): they must come back
    bit-identical, so one sweep serves several prunes."""
    from diffprune.prune.pruning import prune_model_at_ratio

    model, sched, images, _ = _unet_case()
    family = family_for(model)
    imp = estimate(model, family, sched, images, "diff-pruning", THR, progress=False)
    before = {k: v.clone() for k, v in imp.grads.items()}
    first = prune_model_at_ratio(model, family, imp, 0.4)
    assert all(torch.equal(imp.grads[k], before[k]) for k in before)
    second = prune_model_at_ratio(model, family, imp, 0.4)
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
