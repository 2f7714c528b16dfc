"""Post-training throughput on CPU: steps/s of the real loop, teacher-size vs pruned, and where the time goes.

Runs `diffprune.train.run_training` (the loop `diffprune finetune` uses) on a teacher-size UNet and
its pruned copy (ratio 0.3, paper rule, ~56% MACs), saved as pipeline folders in a temp dir, with
timing hooks wrapped around the loop's pieces (no change to train/; on CPU every op is
synchronous, so wall time per piece is exact):
  data (next batch from the DataLoader), noise (timesteps, noise, x_t), forward (+ loss),
  loss check (the deferred finite check + all-reduce at log/checkpoint steps), backward, clip,
  optimizer, zero_grad, EMA, other (the rest of a step), outside step (logging, progress bar;
  checkpoints listed apart).
The pruned model also runs with the loop as it was before the overhead fixes ("pre-fix": default
Adam, per-tensor EMA lerp, a host sync of the losses every step, PNGs decoded every step), side by
side in the same process, and micro-benchmarks time each piece alone (EMA per-tensor vs foreach,
Adam default/foreach/fused, data from PNGs vs memory). The PNG folder holds `skip` batches, so the
counted steps are in the steady state of a long run (every image seen before). `--profile` adds a
torch.profiler table (top ops by self CPU time) for a few student steps.

    python benchmarks/finetune_throughput.py [--arch small|cifar10] [--steps N] [--batch-size B]
        [--threads N] [--data png|digits] [--profile] [--quick]
    python benchmarks/finetune_throughput.py --smoke --out DIR   # the code path in seconds (tiny arch, 3 steps)

Prints tables and writes benchmarks/results/finetune_throughput.json (--quick: ..._quick.json; --out: into that
folder).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_args import add_smoke_options, results_dir  # noqa: E402
from latency import cpu_model  # noqa: E402

import diffprune.train as training  # noqa: E402
from diffprune.families import family_for  # noqa: E402
from diffprune.io import library_versions, save_pipeline, to_pruned  # noqa: E402
from diffprune.prune.importance import ImportanceResult  # noqa: E402
from diffprune.prune.pruning import PruneConfig, prune_model  # noqa: E402
from diffprune.train import loop as train_loop  # noqa: E402
from diffprune.train import setup as train_setup  # noqa: E402

ARCHS = {  # UNet2DModel kwargs via training.unet_config
    "small": dict(sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=1, attention_levels=(1,),
                  norm_num_groups=8),
    "cifar10": dict(),  # the DDPM CIFAR-10 architecture (35.7M params)
    "tiny": dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,),
                 norm_num_groups=4),  # --smoke's
}
INFO = {"format": "diffprune-pruning", "format_version": 1, "base_class": "UNet2DModel",
        "base_model": {"id": "benchmark", "revision": None}, "method": {"name": "magnitude"}, "kept_timesteps": []}
PIECES = ("data", "noise", "forward", "loss check", "backward", "clip", "optimizer", "zero_grad", "EMA")


def make_models(arch: str, folder: Path) -> dict[str, Path]:
    """Teacher and pruned (ratio 0.3, paper rule) pipeline folders; returns {name: folder}."""
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    teacher = training.build_unet(training.unet_config(**ARCHS[arch]), seed=0).eval()
    out = prune_model(teacher, family_for(teacher), PruneConfig(model="bench", method="magnitude", ratio=0.3,
                                                          ratio_rule="paper"),
                ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0), progress=False)
    folders = {}
    for name, unet in (("teacher", teacher), ("pruned", to_pruned(out.model, INFO))):
        folders[name] = folder / name
        save_pipeline(DDPMPipeline(unet=unet, scheduler=scheduler), folders[name])
    return folders


def png_folder(folder: Path, size: int, count: int = 512) -> Path:
    """`count` digits images as RGB PNGs at `size` (what a user's --data folder looks like)."""
    from PIL import Image

    from diffprune.data import digits_images

    folder.mkdir(parents=True, exist_ok=True)
    images = ((digits_images(size, 3)[:count] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    for i, img in enumerate(images.numpy()):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return folder


class Hooks:
    """Timing wrappers around the loop's pieces, installed only inside `with hooks.installed():`."""

    def __init__(self, on_step=None):
        self.step, self.on_step = -1, on_step
        self.times: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.loop_s = 0.0

    def wrap(self, piece: str, fn):
        def timed(*args, **kwargs):
            if piece == "step":
                self.step += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[self.step][piece] += time.perf_counter() - t0
                if piece == "step" and self.on_step is not None:
                    self.on_step()
        return timed

    def _stream(self, fn):
        def stream(*args, **kwargs):
            it = fn(*args, **kwargs)
            return iter(self.wrap("data", lambda: next(it)), None)  # callable iterator, timed next()
        return stream

    @contextlib.contextmanager
    def installed(self):
        from accelerate import Accelerator
        from accelerate.optimizer import AcceleratedOptimizer

        targets = [(train_loop, "train_step", "step"), (train_loop, "micro_batch", "batch"),
                   (train_loop, "step_losses", "forward"), (train_loop, "settle", "loss check"),
                   (Accelerator, "backward", "backward"), (Accelerator, "clip_grad_norm_", "clip"),
                   (AcceleratedOptimizer, "step", "optimizer"), (AcceleratedOptimizer, "zero_grad", "zero_grad"),
                   (training.EMA, "update", "EMA"), (train_loop, "save_checkpoint", "checkpoint"),
                   (train_loop, "run_steps", "loop")]
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
        saved.append((train_loop, "batch_stream", train_loop.batch_stream))
        try:
            for obj, name, piece in targets:
                setattr(obj, name, self.wrap(piece, getattr(obj, name)))
            train_loop.batch_stream = self._stream(train_loop.batch_stream)
            yield self
        finally:
            for obj, name, original in saved:
                setattr(obj, name, original)

    def summary(self, skip: int, batch_size: int) -> dict:
        """Mean ms per step of each piece over steps >= skip; `other` = step minus the pieces."""
        steps = [self.times[s] for s in sorted(self.times) if s >= skip]
        mean = {p: 1000 * statistics.fmean(t.get(p, 0.0) for t in steps) for p in ("step", "batch", *PIECES)}
        mean["noise"] = mean.pop("batch") - mean["data"]
        mean["other"] = mean["step"] - sum(mean[p] for p in PIECES)
        loop = sum(t.get("loop", 0.0) for t in self.times.values())
        inside = sum(t.get("step", 0.0) + t.get("checkpoint", 0.0) for t in self.times.values())
        return {"steps_timed": len(steps), "ms_per_step": mean, "steps_per_s": 1000 / mean["step"],
                "images_per_s": 1000 * batch_size / mean["step"],
                "outside_step_ms_per_step": 1000 * (loop - inside) / max(len(self.times), 1),
                "checkpoint_s": sum(t.get("checkpoint", 0.0) for t in self.times.values())}


def timed_run(folder: Path, data: str, out_dir: Path, args, profile: bool = False) -> dict:
    """One finetune run with the hooks (and the profiler, if asked); returns the summary."""
    config = training.FinetuneConfig(model=str(folder), data=data, steps=args.steps, batch_size=args.batch_size,
                                     checkpoint_every=args.steps, log_every=args.steps, dropout=0.1,
                                     ema_decay=0.9999)
    prof = None
    if profile:
        sched = torch.profiler.schedule(wait=args.skip, warmup=1, active=min(3, args.steps - args.skip - 1))
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=sched)
    hooks = Hooks(on_step=prof.step if prof else None)
    with hooks.installed(), prof if prof else contextlib.nullcontext():
        training.run_training(config, out_dir, tensorboard=False, progress=False)
    result = hooks.summary(args.skip, args.batch_size)
    if prof is not None:
        result["profile_table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
    return result


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def ema_update_per_tensor(ema, model, k: int) -> float:
    """The pre-fix EMA.update: one lerp_ kernel per tensor."""
    decay = ema.decay_at(k)
    for name, value in model.state_dict().items():
        shadow = ema.shadow[name]
        if shadow.is_floating_point():
            shadow.lerp_(value.detach().float(), 1 - decay)
        else:
            shadow.copy_(value)
    return decay


def ema_costs(unet, repeats: int) -> dict:
    """The pre-fix per-tensor EMA update vs EMA.update as in train/parts.py (one foreach lerp)."""
    ema = training.EMA(unet, 0.9999)
    return {"ema_loop_ms": median_ms(lambda: ema_update_per_tensor(ema, unet, 0), repeats),
            "ema_foreach_ms": median_ms(lambda: ema.update(unet, 0), repeats)}


@contextlib.contextmanager
def pre_fix_loop():
    """Swap the loop's fixed pieces back to what they were before the overhead fixes."""
    from diffprune import data as data_module

    originals = (train_setup.make_optimizer, training.EMA.update, train_loop.train_step, data_module.make_dataset)

    def train_step_with_sync(run, batches, step):
        out = originals[2](run, batches, step)
        keys = sorted(k for k, v in out.items() if isinstance(v, torch.Tensor))
        out.update(zip(keys, torch.stack([out[k] for k in keys]).tolist(), strict=True))  # host sync every step
        return out

    def uncached_dataset(source, size, channels):
        if Path(source).is_dir():
            return data_module.ImageFolderDataset(source, size, channels, cache_bytes=0)
        return originals[3](source, size, channels)

    train_setup.make_optimizer = lambda model, lr: torch.optim.Adam(model.parameters(), lr=lr)
    training.EMA.update = ema_update_per_tensor
    train_loop.train_step = train_step_with_sync
    data_module.make_dataset = uncached_dataset
    try:
        yield
    finally:
        train_setup.make_optimizer, training.EMA.update, train_loop.train_step, data_module.make_dataset = originals


def adam_costs(unet, repeats: int) -> dict:
    """Adam.step with torch's default implementation on CPU vs foreach=True vs fused=True."""
    out = {}
    for label, kwargs in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        params = [p.detach().clone().requires_grad_(True) for p in unet.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        try:
            opt = torch.optim.Adam(params, lr=2e-4, **kwargs)
            out[f"adam_{label}_ms"] = median_ms(opt.step, repeats)
        except (RuntimeError, TypeError) as err:
            out[f"adam_{label}_ms"] = f"error: {str(err).splitlines()[0][:120]}"
    return out


def data_costs(png: Path, size: int, batch_size: int, repeats: int) -> dict:
    """next(batch) from PNG files decoded every step (num_workers 0) vs cached after the first epoch vs memory."""
    from diffprune.data import ImageFolderDataset, make_dataset

    config = training.FinetuneConfig(model="x", data="digits", batch_size=batch_size)
    datasets = {"png": ImageFolderDataset(png, size, 3, cache_bytes=0), "png_cached": ImageFolderDataset(png, size, 3),
                "memory": make_dataset("digits", size, 3)}
    out = {}
    for label, dataset in datasets.items():
        if label == "png_cached":
            [dataset[i] for i in range(len(dataset))]  # the first epoch fills the cache
        stream = training.batch_stream(dataset, config, 0, 1, 0)
        out[f"data_{label}_ms"] = median_ms(lambda s=stream: next(s), repeats)
    return out


def alternatives(folders: dict[str, Path], png: Path, args) -> dict:
    from diffprune.io import load_pipeline

    out = {}
    for name, folder in folders.items():
        unet = load_pipeline(folder).unet
        out[name] = {"params": sum(p.numel() for p in unet.parameters()), **ema_costs(unet, args.micro_repeats),
                     **adam_costs(unet, args.micro_repeats)}
    size = int(unet.config.sample_size)
    out["data"] = data_costs(png, size, args.batch_size, args.micro_repeats)
    return out


def print_breakdown(runs: dict[str, dict]) -> None:
    names = list(runs)
    width = {n: max(12, len(n) + 2) for n in names}
    print(f"{'piece (ms/step)':<18}" + "".join(f"{n:>{width[n]}}{'%':>6}" for n in names))
    for piece in ("step", "data", "noise", "forward", "backward", "loss check", "clip", "optimizer", "zero_grad",
                  "EMA", "other"):
        line = f"{piece:<18}"
        for n in names:
            ms = runs[n]["ms_per_step"]
            line += f"{ms[piece]:>{width[n]}.2f}{100 * ms[piece] / ms['step']:>6.1f}"
        print(line)
    for label, key, fmt in (("outside step", "outside_step_ms_per_step", ".2f"), ("steps/s", "steps_per_s", ".3f"),
                            ("images/s", "images_per_s", ".2f")):
        print(f"{label:<18}" + "".join(f"{runs[n][key]:>{width[n]}{fmt}}{'':>6}" for n in names))


def print_alternatives(alt: dict) -> None:
    for name in ("teacher", "pruned"):
        a = alt[name]
        print(f"{name} ({a['params'] / 1e6:.2f}M params): EMA loop {a['ema_loop_ms']:.2f} ms vs foreach "
              f"{a['ema_foreach_ms']:.2f} ms; Adam default {_ms(a['adam_default_ms'])} / foreach "
              f"{_ms(a['adam_foreach_ms'])} / fused {_ms(a['adam_fused_ms'])}")
    d = alt["data"]
    print(f"data: next(batch) decoding PNGs {d['data_png_ms']:.2f} ms, from the decoded cache "
          f"{d['data_png_cached_ms']:.2f} ms, from an in-memory tensor {d['data_memory_ms']:.2f} ms")


def _ms(v) -> str:
    return f"{v:.2f} ms" if isinstance(v, float) else str(v)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=list(ARCHS), default=None, help="default cifar10 (quick: small)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30, quick 8)")
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the means (warm-up)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (quick: 8)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--data", choices=("png", "digits"), default="png",
                   help="png: a folder of PNG files (decoded each step, as with a user's --data folder); "
                        "digits: the built-in in-memory set")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler table for 3 steps of the pruned model (an extra run)")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--micro-repeats", type=int, default=None, help="repeats of the micro-benchmarks (default 20)")
    p.add_argument("--quick", action="store_true", help="smoke run: small arch, 8 steps")
    p.add_argument("--output", type=Path, default=None, help="default OUT/finetune_throughput{_quick}.json")
    add_smoke_options(p, "tiny arch, 3 steps (1 not counted), batch 2, 1 micro-repeat")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.arch = args.arch or ("tiny" if smoke else "small" if args.quick else "cifar10")
    args.steps = args.steps or (3 if smoke else 8 if args.quick else 30)
    args.batch_size = args.batch_size or (2 if smoke else 8)
    args.micro_repeats = args.micro_repeats or (1 if smoke else 5 if args.quick else 20)
    args.skip = min(args.skip, args.steps - 2)
    results = results_dir(p, args)
    args.output = args.output or results / ("finetune_throughput_quick.json" if args.quick and not smoke else
                                            "finetune_throughput.json")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = make_models(args.arch, tmp)
        size = int(training.unet_config(**ARCHS[args.arch])["sample_size"])
        png = png_folder(tmp / "png", size, count=max(1, args.skip) * args.batch_size)
        data = str(png) if args.data == "png" else "digits"
        runs = {}
        for name, folder in folders.items():
            runs[name] = timed_run(folder, data, tmp / f"run_{name}", args)
        with pre_fix_loop():
            runs["pruned, pre-fix loop"] = timed_run(folders["pruned"], data, tmp / "run_prefix", args)
        if args.profile:  # a separate run: the profiler's own overhead stays out of the timings above
            runs["pruned"]["profile_table"] = timed_run(folders["pruned"], data, tmp / "run_profile", args,
                                                        profile=True)["profile_table"]
        alt = alternatives(folders, png, args)
    print(f"\nCPU: {cpu_model()}, torch {torch.__version__}, threads {torch.get_num_threads()}, arch {args.arch}, "
          f"batch {args.batch_size}, data {args.data}, {args.steps} steps (first {args.skip} not counted)"
          + ("  [--quick/--smoke: smoke numbers, not results]" if args.quick or args.smoke else ""))
    print_breakdown(runs)
    print(f"pruned / teacher steps/s: {runs['pruned']['steps_per_s'] / runs['teacher']['steps_per_s']:.2f}")
    print(f"pruned, this loop / pre-fix loop steps/s: "
          f"{runs['pruned']['steps_per_s'] / runs['pruned, pre-fix loop']['steps_per_s']:.2f}")
    print_alternatives(alt)
    if "profile_table" in runs["pruned"]:
        print(runs["pruned"]["profile_table"])
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "versions": library_versions(),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "runs": runs, "alternatives": alt}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
