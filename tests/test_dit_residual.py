"""DiT residual (hidden) width pruning (`--prune-residual`, issue 16 part 1).

What is exact, stated precisely: pruning removes a set R of residual channels from every tensor
indexed by them (patch embedding outputs, the sin-cos position buffer, q/k/v inputs, attention and
MLP outputs, adaLN-Zero chunks, proj_out_1's chunks, proj_out_2's inputs). Take the unpruned model,
zero those channels in every such tensor (and every other channel the run removed: head dims, MLP
and conditioning widths), and let its affine-free LayerNorms take mean and variance over the kept
channels only: it computes what the pruned model computes (<= 1e-5). With LayerNorms over all
channels the zeroed model is NOT equivalent (a zero still counts in the mean and variance); the test
shows that difference too, so the masked statistics are what makes the equivalence, not a loose
tolerance.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import full_size_models, run_cli
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import diffprune  # noqa: F401 - registers the pruned classes for plain diffusers loading
from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.families.dit import DiTFamily
from diffprune.io import load_pipeline, load_unet, to_pruned
from diffprune.io.structure import record_structure, validate_structure
from diffprune.prune.complexity import count_macs_params
from diffprune.prune.importance import ImportanceResult
from diffprune.prune.pruning import prune_model_at_ratio

INFO = {"format": "diffprune-pruning", "format_version": 1, "base_model": {"id": "test", "revision": None},
        "method": {"name": "magnitude"}, "kept_timesteps": [], "base_class": "DiTTransformer2DModel"}
MAGNITUDE = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)


def tiny_dit(seed=4):
    """1000 classes: DiTPipeline's guidance hard-codes 1000 as the null class."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    with torch.no_grad():  # diffusers zero-initialises adaLN-Zero: give every tensor a say in the output
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    return model


def _inputs(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    return x, torch.tensor([1, 7, 15][:n]), torch.tensor([0, 3, 1000][:n])  # 1000 = the null class


def _run(model, x, t, labels):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=labels).sample


class _Recording(DiTFamily):
    """The DiT family, also noting every (module, direction, removed indices) torch-pruning removes."""

    def __init__(self):
        self.removed: list[tuple[str, str, list[int]]] = []

    def before_group_prune(self, model, group):
        names = {m: n for n, m in model.named_modules()}
        for dep, idxs in group:
            name = names.get(dep.target.module)
            if name is not None:
                side = "out" if dep.handler.__name__ == "prune_out_channels" else "in"
                self.removed.append((name, side, sorted(int(getattr(i, "idx", i)) for i in idxs)))
        super().before_group_prune(model, group)


class KeptChannelLayerNorm(nn.Module):
    """LayerNorm (no affine) whose statistics cover the kept channels only; removed channels give 0."""

    def __init__(self, norm: nn.LayerNorm, removed: list[int]):
        super().__init__()
        width = norm.normalized_shape[-1]
        self.keep = torch.tensor([i for i in range(width) if i not in set(removed)])
        self.eps = norm.eps

    def forward(self, x):
        out = torch.zeros_like(x)
        out[..., self.keep] = F.layer_norm(x[..., self.keep], (len(self.keep),), eps=self.eps)
        return out


@torch.no_grad()
def zeroed_reference(model, removed, masked_norms=True):
    """`model` with every removed channel zeroed in the tensors that hold it (see module docstring)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name, side, idxs in removed:
        m, idx = modules[name], torch.tensor(idxs, dtype=torch.long)
        if isinstance(m, nn.LayerNorm):
            assert m.weight is None  # DiT's norms are affine-free; nothing to zero, only statistics
            if masked_norms:
                parent, _, leaf = name.rpartition(".")
                setattr(ref.get_submodule(parent) if parent else ref, leaf, KeptChannelLayerNorm(m, idxs))
        elif isinstance(m, nn.Embedding):
            assert side == "out"
            m.weight[:, idx] = 0
        elif isinstance(m, nn.Linear | nn.Conv2d):
            if side == "out":
                m.weight[idx] = 0
                if m.bias is not None:
                    m.bias[idx] = 0
            else:
                m.weight[:, idx] = 0
        else:
            raise AssertionError(f"unexpected pruned module {name}: {type(m).__name__}")
        if name == "pos_embed.proj" and side == "out":
            ref.pos_embed.pos_embed[..., idx] = 0
    return ref


# --------------------------------------------------------------------------- structure and exactness


def test_configured_returns_a_residual_pruning_copy_and_leaves_the_default_alone():
    fam = family_for(tiny_dit())
    assert fam.residual_prunable is False and fam.configured(False) is fam
    on = fam.configured(prune_residual=True)
    assert on.residual_prunable is True and fam.residual_prunable is False and type(on) is type(fam)


@pytest.mark.parametrize("prune_heads", [False, True], ids=["head-dims", "whole-heads"])
def test_pruned_residual_equals_the_zeroed_model_with_kept_channel_norms(prune_heads):
    model = tiny_dit()
    fam = _Recording()
    pruned = prune_model_at_ratio(model, fam, MAGNITUDE, 0.5, prune_heads=prune_heads, prune_residual=True)
    validate_structure(pruned)
    residual = next(idxs for name, side, idxs in fam.removed if name == "pos_embed.proj" and side == "out")
    assert len(residual) == 16 and pruned.pos_embed.proj.out_channels == 16
    # every residual-coupled tensor lost the same channels
    coupled = {(n, s): i for n, s, i in fam.removed}
    for b in range(2):
        blk = f"transformer_blocks.{b}"
        for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.net.0.proj"):
            assert coupled[(f"{blk}.{name}", "in")] == residual
        for name in ("attn1.to_out.0", "ff.net.2", "norm1.norm", "norm3"):
            assert coupled[(f"{blk}.{name}", "out")] == residual
        assert coupled[(f"{blk}.norm1.linear", "out")] == [i + 32 * c for c in range(6) for i in residual]
    assert coupled[("proj_out_1", "out")] == residual + [i + 32 for i in residual]
    assert coupled[("proj_out_2", "in")] == residual and coupled[("norm_out", "out")] == residual
    kept = [i for i in range(32) if i not in residual]
    assert torch.equal(pruned.pos_embed.pos_embed, model.pos_embed.pos_embed[..., kept])

    x, t, labels = _inputs(model)
    out = _run(pruned, x, t, labels)
    exact = _run(zeroed_reference(model, fam.removed), x, t, labels)
    assert (out - exact).abs().max() <= 1e-5
    naive = _run(zeroed_reference(model, fam.removed, masked_norms=False), x, t, labels)
    assert (out - naive).abs().max() > 1e-2  # full-width LayerNorm statistics are not equivalent
    assert (out - _run(model, x, t, labels)).abs().max() > 1e-2  # and pruning did change the model


def test_default_keeps_the_residual_width_and_the_folder_format():
    model = tiny_dit()
    pruned = to_pruned(prune_model_at_ratio(model, family_for(model), MAGNITUDE, 0.5), INFO)
    assert pruned.pos_embed.proj.out_channels == 32 and "pos_embed.pos_embed" not in pruned.state_dict()


def _residual_pruned_pipeline():
    model = tiny_dit()
    pruned = to_pruned(prune_model_at_ratio(model, family_for(model), MAGNITUDE, 0.5, prune_residual=True), INFO)
    scheduler = DDIMScheduler(num_train_timesteps=20, clip_sample=False, steps_offset=1)
    torch.manual_seed(2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=8, sample_size=16, latent_channels=4).eval()
    return model, pruned, DiTPipeline(transformer=pruned, vae=vae, scheduler=scheduler)


def test_reload_is_bit_exact_and_keeps_the_sliced_position_buffer(tmp_path):
    model, pruned, pipe = _residual_pruned_pipeline()
    assert pruned.pos_embed.proj.out_channels == 16 and "pos_embed.pos_embed" in pruned.state_dict()
    pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    x, t, labels = _inputs(model)
    expected = _run(pruned, x, t, labels)
    for again in (load_pipeline(tmp_path / "p"), DiffusionPipeline.from_pretrained(tmp_path / "p"),
                  DiTPipeline.from_pretrained(tmp_path / "p")):
        other = again.transformer
        assert type(other).__name__ == "PrunedDiTTransformer2DModel"
        mine, theirs = pruned.state_dict(), other.state_dict()
        assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert record_structure(other) == record_structure(pruned)
        assert torch.equal(_run(other, x, t, labels), expected)
    # What diffusers would build for the pruned width is another function: the buffer must come from the file.
    fresh = get_2d_sincos_pos_embed(16, 4, base_size=4, output_type="pt").float()
    assert not torch.allclose(fresh, pruned.pos_embed.pos_embed[0])


@pytest.mark.parametrize("width", [17, 64], ids=["disagrees-with-proj", "wider-than-base"])
def test_a_bad_position_buffer_in_the_file_fails_with_one_line(width, tmp_path):
    _, _, pipe = _residual_pruned_pipeline()
    pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    path = tmp_path / "p" / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["pos_embed.pos_embed"] = torch.zeros(1, 16, width)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(DiffpruneError, match=r"buffer 'pos_embed.pos_embed' has shape \(1, 16, " + str(width)):
        load_pipeline(tmp_path / "p")


# --------------------------------------------------------------------------- CLI and plain diffusers


@pytest.fixture(scope="module")
def dit_pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    _, _, pipe = _residual_pruned_pipeline()
    pipe.register_modules(transformer=tiny_dit())  # the unpruned tiny DiT in a plain diffusers folder
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    images = root / "imgs"
    rng = np.random.default_rng(0)
    for i in range(4):
        (images / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / str(i % 2) / f"{i}.png")
    return root


@pytest.mark.parametrize("size", [["--ratio", "0.5"], ["--target-macs", "0.15"]], ids=["ratio", "target-macs"])
def test_cli_prunes_the_residual_and_plain_diffusers_generates(size, dit_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, err = run_cli(["prune", "--model", dit_pipeline_dir / "pipe", "--data", dit_pipeline_dir / "imgs",
                         "--method", "diff-pruning", *size, "--batch-size", "4", "--prune-residual",
                         "--output-dir", out], capsys)
    assert code == 0, err
    report = json.loads((out / "prune_report.json").read_text())
    width = report["widths"]["after"]["pos_embed.proj"]
    assert report["widths"]["before"]["pos_embed.proj"] == 32
    if size[0] == "--ratio":
        assert width == 16
    else:  # with the residual kept this DiT bottoms out at ~22% of its MACs (ratio 0.8)
        assert abs(report["macs"]["fraction"] - 0.15) <= 0.02 and width < 32
    info = json.loads((out / "transformer" / "pruning.json").read_text())
    assert info["method"]["residual_pruned"] is True
    pipe = DiTPipeline.from_pretrained(out)  # plain diffusers (diffprune imported: its classes resolve)
    assert pipe.transformer.pos_embed.pos_embed.shape == (1, 16, width)
    images = pipe(class_labels=[1, 3], num_inference_steps=3, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    again = DiTPipeline.from_pretrained(out)(class_labels=[1, 3], num_inference_steps=3, guidance_scale=2.0,
                                            generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.array_equal(images, again)


# --------------------------------------------------------------------------- full size (slow)




@pytest.mark.slow
def test_full_size_dit_xl2_with_the_residual_width(tmp_path):
    """DiT-XL/2 (random weights; sizes do not depend on them): today's row and residual-inclusive rows."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**full_size_models().DIT_XL2).eval()
    fam = family_for(model)
    example = fam.example_inputs(model)
    macs0, params0 = count_macs_params(model, example)
    rows = [f"unpruned: params {params0 / 1e6:.1f}M, MACs {macs0 / 1e9:.2f}G, hidden 1152"]
    assert (params0, macs0) == (749826464, 114456637472)  # exact: README (benchmarks/results/full_size.json)
    exact = {(0.5, False): (365781920, 57234457760), (0.5, True): (197744864, 28624250912),
             (0.3, True): (375201422, 55909506560)}  # (params, MACs) after
    results = {}
    for ratio, residual in ((0.5, False), (0.5, True), (0.3, True)):
        pruned = prune_model_at_ratio(model, fam, MAGNITUDE, ratio, prune_residual=residual)
        macs, params = count_macs_params(pruned, example)
        width = pruned.pos_embed.proj.out_channels
        results[(ratio, residual)] = (macs / macs0, params / params0, width)
        assert (params, macs) == exact[(ratio, residual)]
        rows.append(f"ratio {ratio} {'residual too' if residual else 'residual kept'}: params {params / 1e6:.1f}M "
                    f"({params / params0:.3f}), MACs {macs / 1e9:.2f}G ({macs / macs0:.3f}), hidden {width}")
        if (ratio, residual) == (0.3, True):
            with torch.no_grad():
                y = fam.predict(pruned, example["hidden_states"], example["timestep"], fam.example_cond(pruned))
            assert torch.isfinite(y).all()
            to_pruned(pruned, INFO).save_pretrained(tmp_path / "transformer")
            loaded = load_unet(tmp_path / "transformer")
            assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(),
                                                         loaded.state_dict().values(), strict=True))
        del pruned
    print("\nDiT-XL/2 (256x256, 32x32 latents)\n" + "\n".join(rows))
    assert [results[k][2] for k in results] == [1152, int(1152 * 0.5), int(1152 * 0.7)]
    assert results[(0.5, True)][0] < results[(0.3, True)][0] < results[(0.5, False)][0]
