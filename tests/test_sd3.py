"""Stable Diffusion 3 (`SD3Transformer2DModel`, StableDiffusion3Pipeline) as a family (issue 16 part 2), on a
tiny pipeline built here: two byte-level CLIP encoders with projections, a 1-layer T5, a tiny KL autoencoder
with a shift factor, FlowMatchEulerDiscreteScheduler with shift 3.

Joint-attention heads / head dims (image and context projections together), MLP widths of ff and
ff_context, the timestep / pooled-text MLP widths and the temb width prune; the pruned model equals the
unpruned one with the removed channels zeroed. Flow matching: the forward process, the target and the
model timestep equal train_dreambooth_sd3.py's formulas, the Diff-Pruning sweep runs over the
scheduler's shifted training sigmas from the least noisy up, and the sampler equals the pipeline's
`__call__` (with CFG). Every CLI stage runs; plain diffusers generates from the pruned folder.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import (
    byte_tokenizer,
    captioned_pipeline_dir,
    check_pruned_reload,
    full_size_models,
    guided_latents,
    run_cli,
    tiny_clip,
    tiny_kl,
    tiny_t5,
    unwrapped_warnings,
    zeroed_channels,
)
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

import diffprune  # noqa: F401 - registers the pruned classes for plain diffusers loading
from diffprune import diffusion
from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.families.sd3 import SD3Family, SD3PromptEncoder
from diffprune.io import load_pipeline, to_pruned
from diffprune.io.structure import validate_structure
from diffprune.prune.config import PruneConfig
from diffprune.prune.importance import ImportanceResult, estimate, estimate_fast
from diffprune.prune.pruning import prune_model, prune_model_at_ratio
from diffprune.sample.loop import image_generators, load_samples

INFO = {"format": "diffprune-pruning", "format_version": 1, "base_model": {"id": "test", "revision": None},
        "method": {"name": "magnitude"}, "kept_timesteps": [], "base_class": "SD3Transformer2DModel"}
MAGNITUDE = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
TRAIN_STEPS = 40  # the tiny scheduler's num_train_timesteps (SD3: 1000)
TOL = 1e-4


def tiny_sd3(sd35=False, seed=0):
    """SD3-medium's layout in miniature; `sd35`: SD3.5's rms qk-norm and a dual-attention first block."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=6,
                                 num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=24,
                                 pooled_projection_dim=32, out_channels=4, pos_embed_max_size=8,
                                 qk_norm="rms_norm" if sd35 else None,
                                 dual_attention_layers=(0,) if sd35 else ()).eval()


def tiny_pipeline(t5=True, transformer=None) -> StableDiffusion3Pipeline:
    vae = tiny_kl(scaling_factor=1.5, shift_factor=0.1)  # SD3's autoencoder has a shift factor
    return StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else tiny_sd3(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_STEPS, shift=3.0), vae=vae,
        text_encoder=tiny_clip(True, seed=5), tokenizer=byte_tokenizer(), text_encoder_2=tiny_clip(True, seed=6),
        tokenizer_2=byte_tokenizer(), text_encoder_3=tiny_t5() if t5 else None,
        tokenizer_3=byte_tokenizer() if t5 else None)


def _cond(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([130.0, 870.0][:n]),
            {"encoder_hidden_states": torch.randn(n, 9, 32, generator=g), "pooled_projections": torch.randn(n, 32,
                                                                                                             generator=g)})


def _predict(model, seed=0):
    x, t, cond = _cond(seed=seed)
    with torch.no_grad():
        return SD3Family().predict(model, x, t, cond)


# --------------------------------------------------------------------------- structure

QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
# root suffix -> (layers whose output rows go, layers whose input columns go), both relative to the root's prefix
ZERO = {"attn.to_out.0": (tuple(f"attn.{n}" for n in QKV), ("attn.to_out.0", "attn.to_add_out")),
        "attn.to_add_out": (tuple(f"attn.{n}" for n in QKV), ("attn.to_out.0", "attn.to_add_out")),
        "attn2.to_out.0": (("attn2.to_q", "attn2.to_k", "attn2.to_v"), ("attn2.to_out.0",)),
        "net.0.proj": (("net.0.proj",), ("net.2",)),
        "timestep_embedder.linear_2": (("timestep_embedder.linear_2", "text_embedder.linear_2"), ()),
        "linear_1": (("linear_1",), ("linear_2",))}  # the last block has no to_add_out: skipped


@pytest.mark.parametrize("sd35,prune_heads", [(False, False), (False, True), (True, True)],
                         ids=["sd3-head-dims", "sd3-whole-heads", "sd35-qk-norm-dual-whole-heads"])
def test_pruned_sd3_equals_the_zeroed_model(sd35, prune_heads):
    model = tiny_sd3(sd35)
    fam = family_for(model)
    assert isinstance(fam, SD3Family)
    removed = []
    pruned = prune_model_at_ratio(model, fam, MAGNITUDE, 0.5, prune_heads=prune_heads,
                              on_group=lambda root, idxs, _: removed.append((root, idxs)))
    validate_structure(pruned)
    for blk in pruned.transformer_blocks:
        attn = blk.attn
        assert attn.to_q.out_features == attn.add_q_proj.out_features == 12 and attn.to_q.in_features == 24
        assert attn.heads == (2 if prune_heads else 4)
        assert blk.ff.net[2].in_features == 48
        if sd35:
            assert attn.norm_q.weight.shape == (6,) and attn.norm_added_k.weight.shape == (6,)
    emb = pruned.time_text_embed
    assert emb.timestep_embedder.linear_1.out_features == 12 and emb.text_embedder.linear_1.out_features == 12
    assert emb.timestep_embedder.linear_2.out_features == 12 and pruned.norm_out.linear.in_features == 12
    assert pruned.pos_embed.proj.out_channels == 24 and pruned.context_embedder.out_features == 24
    assert pruned.transformer_blocks[0].ff_context.net[2].in_features == 48
    roots = {r.rpartition("transformer_blocks.")[2] for r, _ in removed}
    assert len(removed) == 3 + 2 + 2 + 1 + (1 if sd35 else 0), roots  # temb + 2 MLPs, 2 blocks, ff_context (+attn2)
    expected = _predict(zeroed_channels(model, removed, ZERO))
    assert (_predict(pruned) - expected).abs().max() <= 1e-5
    assert (_predict(pruned) - _predict(model)).abs().max() > 1e-3  # the removed channels did matter


def test_qk_norm_weights_are_unwrapped_parameters_of_the_head_dim():
    model = tiny_sd3(sd35=True)
    given = SD3Family().unwrapped_parameters(model)
    assert len(given) == 2 * 4 + 2 and {(tuple(p.shape), d) for p, d in given} == {((6,), 0)}
    assert unwrapped_warnings(model, SD3Family()) == [] and SD3Family().unwrapped_parameters(tiny_sd3()) == []


def test_qk_norm_head_dims_and_residual_pruning_are_refused_with_one_line():
    with pytest.raises(DiffpruneError, match="normalises q/k"):
        prune_model_at_ratio(tiny_sd3(sd35=True), SD3Family(), MAGNITUDE, 0.5)
    with pytest.raises(DiffpruneError, match="--prune-residual is not supported for SD3"):
        SD3Family().configured(prune_residual=True)


# --------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("t5", [True, False], ids=["with-t5", "without-t5"])
def test_prompts_are_encoded_as_the_pipeline_does(t5):
    pipe = tiny_pipeline(t5)
    encoder = SD3PromptEncoder(pipe, pipe.transformer)
    prompts = ["A Cat on a mat", "two dogs", "A Cat on a mat"]
    cond = encoder.cond(prompts, "cpu")
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=True,
                                                         device="cpu")
    assert embeds.shape == (3, 12 + 256, 32) and pooled.shape == (3, 32)
    uncond = encoder.uncond(3, None, "cpu")  # encoded alone: batch-size rounding only (matmul blocking)
    for ours, theirs in ((cond["encoder_hidden_states"], embeds), (cond["pooled_projections"], pooled),
                         (uncond["encoder_hidden_states"], neg), (uncond["pooled_projections"], neg_pooled)):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
    assert bool(embeds[:, 12:].abs().sum() == 0) is (not t5)  # the pipeline's zero T5 tokens


# --------------------------------------------------------------------------- flow matching


def _reference_example(scheduler, x0, noise, indices_from_noisiest):
    """train_dreambooth_sd3.py: timesteps = scheduler.timesteps[indices], sigmas looked up by timestep,
    noisy = (1 - sigma) x0 + sigma noise, target = noise - x0 (precondition_outputs off)."""
    ref = copy.deepcopy(scheduler)
    timesteps = ref.timesteps[indices_from_noisiest]
    sigmas = ref.sigmas[[int((ref.timesteps == t).nonzero()) for t in timesteps]].reshape(-1, 1, 1, 1)
    return (1.0 - sigmas) * x0 + sigmas * noise, noise - x0, timesteps


def test_flow_forward_process_target_and_timestep_match_the_reference():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(7)  # a pipeline ran: the live sigmas differ, the training schedule must not
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])  # sweep order: 0 = least noisy
    x_t, target = diffusion.noisy_and_target(scheduler, x0, noise, t)
    ref_x, ref_target, ref_t = _reference_example(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                                                  x0, noise, 999 - t)
    assert torch.equal(x_t, ref_x) and torch.equal(target, ref_target)
    assert torch.equal(diffusion.model_timesteps(scheduler, t), ref_t)
    assert diffusion.sigma_at(scheduler, 0) == pytest.approx(3 * 0.001 / (1 + 2 * 0.001))  # shifted, not t / T
    assert diffusion.num_train_timesteps(scheduler) == 1000


def _sweep_reference(model, scheduler, images, cond, seed=0):
    """L_t of the paper's sweep written out for flow matching: sigma_t the shifted training sigmas, ascending."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    ref = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    losses = []
    for sigma in ref.sigmas.flip(0):
        with torch.no_grad():
            out = SD3Family().predict(model, (1 - sigma) * images + sigma * noise,
                                      torch.full((images.shape[0],), float(sigma * TRAIN_STEPS)), cond)
        losses.append(float(torch.nn.functional.mse_loss(out, noise - images)))
    return losses, ref.sigmas.flip(0)


def test_the_diff_pruning_sweep_runs_over_the_flow_sigmas_least_noisy_first():
    pipe = tiny_pipeline()
    model, scheduler = pipe.transformer, pipe.scheduler
    x, _, cond = _cond(n=2, seed=3)
    expected, sigmas = _sweep_reference(model, scheduler, x, cond)
    full = estimate(model, SD3Family(), scheduler, x, "diff-pruning", 0.0, progress=False, cond=cond)
    assert [t for t, _ in full.losses] == list(range(TRAIN_STEPS))
    assert np.allclose([v for _, v in full.losses], expected, rtol=1e-5, atol=1e-6)
    ddpm_like = [t / TRAIN_STEPS for t in range(TRAIN_STEPS)]  # what a DDPM-indexed sweep would use as sigma
    assert not np.allclose(sigmas.numpy(), ddpm_like, atol=1e-2)
    # the threshold rule over that order: the first index whose loss falls below thr * running max
    thr = 0.999
    cut = next(i for i in range(1, TRAIN_STEPS) if expected[i] < thr * max(expected[: i + 1]))
    result = estimate(model, SD3Family(), scheduler, x, "diff-pruning", thr, progress=False, cond=cond)
    assert result.cut == cut and result.kept_timesteps == list(range(cut + 1))
    summary = result.summary()
    assert summary["timestep_kind"] == "flow-sigma-index" and summary["cut_sigma"] == pytest.approx(float(sigmas[cut]))
    fast = estimate_fast(model, SD3Family(), scheduler, x, thr, grid_stride=1, cut_batch=2, pairs_per_pass=4,
                         passes=1, progress=False, cond=cond)
    assert fast.cut == cut and fast.summary()["cut_sigma"] == summary["cut_sigma"]


@pytest.mark.parametrize("scale,negative", [(1.0, None), (4.5, None), (3.0, "blurry")])
def test_sampler_equals_the_pipeline(scale, negative):
    pipe = tiny_pipeline()
    noise, x, _ = guided_latents(pipe, pipe.transformer, [0, 1], 4, prompt="a red cat", guidance_scale=scale,
                                 negative_prompt=negative)
    with torch.no_grad():
        ref = pipe(prompt=["a red cat"] * 2, negative_prompt=None if negative is None else [negative] * 2,
                   latents=noise.clone(), num_inference_steps=4, guidance_scale=scale, output_type="latent").images
    assert (x - ref).abs().max() <= TOL
    if scale > 1:
        _, plain, _ = guided_latents(pipe, pipe.transformer, [0, 1], 4, prompt="a red cat")
        assert (plain - ref).abs().max() > 100 * TOL


def test_a_folder_saved_without_t5_loads_and_samples_as_the_pipeline(tmp_path):
    """text_encoder_3 = None (the 4.7B T5 left out): diffusers saves it as null but then requires it by name."""
    tiny_pipeline(t5=False).save_pretrained(tmp_path / "p", safe_serialization=True)
    pipe = load_pipeline(tmp_path / "p")
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    noise, x, _ = guided_latents(pipe, pipe.transformer, [0], 3, prompt="a cat", guidance_scale=3.0)
    with torch.no_grad():
        ref = pipe("a cat", latents=noise.clone(), num_inference_steps=3, guidance_scale=3.0,
                   output_type="latent").images
    assert (x - ref).abs().max() <= TOL


# --------------------------------------------------------------------------- save / load


def _generate(pipe, latents=None):
    return pipe(["a cat", "a dog"], num_inference_steps=3, height=16, width=16, guidance_scale=3.0,
                output_type="np", latents=latents, generator=torch.Generator().manual_seed(0)).images


def test_reload_is_bit_exact_and_plain_diffusers_generates(tmp_path):
    pipe = tiny_pipeline()
    pruned = to_pruned(prune_model_at_ratio(pipe.transformer, SD3Family(), MAGNITUDE, 0.5), INFO)
    check_pruned_reload(tmp_path / "p", pipe, pruned, StableDiffusion3Pipeline, _predict, _generate)


# --------------------------------------------------------------------------- every CLI stage


@pytest.fixture(scope="module")
def sd3_dirs(tmp_path_factory):
    return captioned_pipeline_dir(tmp_path_factory.mktemp("sd3"), tiny_pipeline())


def test_cli_prune_finetune_sample_evaluate_report(sd3_dirs, tmp_path, capsys, monkeypatch):
    base, data = sd3_dirs / "pipe", sd3_dirs / "imgs"
    code, err = run_cli(["prune", "--model", base, "--data", data, "--method", "diff-pruning", "--estimator",
                         "exact", "--threshold", "0.999", "--ratio", "0.5", "--batch-size", "4", "--output-dir",
                         tmp_path / "pruned"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert report["family"] == "sd3" and report["macs"]["fraction"] < 0.9
    imp = report["importance"]
    cut = imp["cut_timestep"]  # a random tiny model's flow loss may rise with sigma all the way: no cut
    assert imp["timestep_kind"] == "flow-sigma-index" and (imp["cut_sigma"] is None) == (cut is None)
    assert imp["kept_timesteps"] == [[0, TRAIN_STEPS if cut is None else cut + 1]]
    seen = []  # the timesteps fine-tuning calls the student and the teacher with
    original = SD3Family.predict
    monkeypatch.setattr(SD3Family, "predict",
                        lambda self, m, x, t, c=None: seen.append(t) or original(self, m, x, t, c))
    code, err = run_cli(["finetune", "--model", tmp_path / "pruned", "--data", data, "--output-dir",
                         tmp_path / "tuned", "--steps", "2", "--batch-size", "2", "--distill", "output", "--teacher",
                         base, "--cond-drop-prob", "0.5", "--ema-decay", "0", "--no-progress", "--no-tensorboard"],
                        capsys)
    assert code == 0, err
    monkeypatch.setattr(SD3Family, "predict", original)
    flow_t = set(diffusion.flow_schedule(load_pipeline(base).scheduler)[1].tolist())
    assert len(seen) >= 4 and all(set(t.tolist()) <= flow_t for t in seen)  # sigma * N, not integer t
    assert any(float(v) != int(v) for t in seen for v in t)
    args = ["sample", "--num-images", "2", "--batch-size", "2", "--steps", "3", "--prompt", "a red cat",
            "--guidance-scale", "4", "--negative-prompt", "blurry", "--no-progress"]
    for name in ("pruned", "tuned"):
        code, err = run_cli([*args, "--model", tmp_path / name, "--output-dir", tmp_path / f"s_{name}"], capsys)
        assert code == 0, err
        images, _ = load_samples(tmp_path / f"s_{name}")
        pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / name)
        assert type(pipe.transformer).__name__ == "PrunedSD3Transformer2DModel"
        noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in image_generators(0, [0, 1])])
        with torch.no_grad():
            ref = pipe(prompt=["a red cat"] * 2, negative_prompt=["blurry"] * 2, latents=noise, num_inference_steps=3,
                       guidance_scale=4.0, output_type="np").images
        assert np.abs(images.astype(float) - np.round(ref * 255)).max() <= 1
    code, err = run_cli(["sample", *args[1:], "--model", base, "--output-dir", tmp_path / "bad", "--eta", "0.5"],
                        capsys)
    assert code == 2 and "eta=0.5 has no meaning for FlowMatchEulerDiscreteScheduler" in err
    code, err = run_cli(["evaluate", "--samples", tmp_path / "s_tuned", "--teacher-samples", tmp_path / "s_pruned",
                         "--model", tmp_path / "tuned", "--teacher-model", base, "--latency-repeats", "1",
                         "--latency-warmup", "0", "--throughput-images", "1", "--throughput-steps", "2",
                         "--throughput-repeats", "1", "--output", tmp_path / "eval.json"],
                        capsys)
    assert code == 0, err
    cost = json.loads((tmp_path / "eval.json").read_text())["cost"]
    assert cost["student"]["macs"] < 0.9 * cost["teacher"]["macs"]
    # throughput is labelled with the sampler that ran (it said "DDIM 2 steps" before)
    assert cost["throughput"]["settings"]["scheduler"] == "FlowMatchEulerDiscreteScheduler (the folder's own), 2 steps"
    code, err = run_cli(["report", "--prune", tmp_path / "pruned", "--finetune", tmp_path / "tuned", "--evaluation",
                         tmp_path / "eval.json", "--teacher-samples", tmp_path / "s_pruned", "--student-samples",
                         tmp_path / "s_tuned", "--output-dir", tmp_path / "report"], capsys)
    assert code == 0, err
    assert any((tmp_path / "report").glob("*.html"))


def test_cli_prunes_sd35_whole_heads_to_a_mac_target(sd3_dirs, tmp_path, capsys):
    """SD3.5 (qk-norm, dual attention): whole heads reach a MAC target; head dims are refused with one line."""
    tiny_pipeline(transformer=tiny_sd3(sd35=True)).save_pretrained(tmp_path / "p", safe_serialization=True)
    args = ["prune", "--model", tmp_path / "p", "--data", sd3_dirs / "imgs", "--method", "diff-pruning", "--estimator",
            "fast", "--target-macs", "0.6", "--batch-size", "4"]
    code, err = run_cli([*args, "--prune-heads", "--output-dir", tmp_path / "o"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "prune_report.json").read_text())
    assert abs(report["macs"]["fraction"] - 0.6) <= 0.02
    attn = load_pipeline(tmp_path / "o").transformer.transformer_blocks[0].attn
    assert attn.heads < 4 and attn.to_q.out_features == 6 * attn.heads
    code, err = run_cli([*args, "--output-dir", tmp_path / "dims"], capsys)
    assert code == 2 and "prune whole heads instead" in err.strip().splitlines()[-1]  # (above it: load bars)


def test_sd35_whole_heads_under_the_paper_ratio_rule():
    """The paper's ratio rule reads the groups with the family's ignored layers, which for SD3.5 include its
    qk-norm weights (parameters, not modules): that was an internal error (a tensor compared with `in`)."""
    model = tiny_sd3(sd35=True)
    config = PruneConfig(model="m", target_params=0.8, ratio_rule="paper", prune_heads=True)
    outcome = prune_model(model, family_for(model), config, MAGNITUDE, progress=False)
    assert outcome.params[1] / outcome.params[0] == pytest.approx(0.8, abs=0.03)
    validate_structure(outcome.model)


# --------------------------------------------------------------------------- full size (slow)




SD3_MEDIUM = full_size_models().SD3_MEDIUM  # stabilityai/stable-diffusion-3-medium-diffusers (structure)


def _meta_cost(model, family):
    """(MACs, params) at 128x128 latents and 77 + 256 text tokens, on a meta-device copy: shapes only."""
    from diffprune.prune.complexity import count_macs_params

    meta = copy.deepcopy(model).to("meta") if not next(model.parameters()).is_meta else model
    meta.register_to_config(sample_size=128)
    return count_macs_params(meta, family.example_inputs(meta, device="meta"))


@pytest.mark.slow
def test_full_size_sd3_medium_structure_numbers():
    """Random-weight SD3-medium transformer (2.03B params) pruned at two ratios in bf16 on CPU, under 24 GB:
    traced at 16x16 latents (the structure does not depend on the resolution), MACs counted at 128x128
    latents (1024 px) with the pipeline's 333 text tokens on meta-device copies. Prints params / MACs
    before and after, peak resident memory and wall time."""
    import resource
    import time

    start = time.perf_counter()
    with torch.device("meta"):
        meta = SD3Transformer2DModel(**SD3_MEDIUM)
    family = family_for(meta)
    macs0, params0 = _meta_cost(meta, family)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = SD3Transformer2DModel(**{**SD3_MEDIUM, "sample_size": 16}).eval()
    finally:
        torch.set_default_dtype(default)
    print(f"\nSD3-medium transformer: params {params0 / 1e9:.3f}B, MACs {macs0 / 1e12:.3f}T (128x128 latents, "
          f"333 text tokens, batch 1); built in {time.perf_counter() - start:.0f} s")
    rows = []
    for ratio in (0.3, 0.5):
        t0 = time.perf_counter()
        pruned = prune_model_at_ratio(model, family, MAGNITUDE, ratio)
        with torch.no_grad():
            cond = {k: v.to(torch.bfloat16) for k, v in family.example_cond(pruned).items()}
            y = family.predict(pruned, torch.randn(1, 16, 16, 16, dtype=torch.bfloat16), torch.tensor([500.0]), cond)
        assert y.shape == (1, 16, 16, 16) and torch.isfinite(y).all()
        seconds = time.perf_counter() - t0
        macs, params = _meta_cost(pruned, family)
        attn = pruned.transformer_blocks[0].attn
        del pruned
        rows.append((ratio, params, macs))
        print(f"ratio {ratio}: params {params / 1e9:.3f}B ({params / params0:.3f}), MACs {macs / 1e12:.3f}T "
              f"({macs / macs0:.3f}); heads {attn.heads} x {attn.to_q.out_features // attn.heads}; "
              f"prune + one forward {seconds:.0f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"peak resident memory {peak:.1f} GiB; total {time.perf_counter() - start:.0f} s")
    # exact, as README "Full-size structure checks" quotes them (benchmarks/results/full_size.json, sd3-0.3 / -0.5)
    assert (params0, macs0) == (2028328000, 3006257012800) and peak < 24
    assert [(r[1], r[2]) for r in rows] == [(1415120850, 2092560913362), (1016521792, 1504747106368)]
