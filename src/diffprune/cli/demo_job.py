"""The whole job on the embedded default, offline: prune -> fine-tune -> sample -> evaluate -> report.

Teacher: the small digits DDPM shipped in `assets/digits_ddpm` (its model card names the command
that trained it). Pruned with Diff-Pruning to the paper's MACs fraction (3.4G / 6.1G = 0.56),
briefly fine-tuned with the paper's recipe, sampled from the same noise as the teacher (DDIM,
eta 0), and compared on digits-FID/KID, SSIM to the teacher, params, MACs and CPU latency.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from importlib import resources
from pathlib import Path

from ..config import StageConfig
from ..errors import DiffpruneError
from ..fsutil import check_output_dir, check_output_location, output_lock, read_json, write_json_atomic

TEACHER_ASSET = "digits_ddpm"
INCOMPLETE_MARKER = "DEMO_INCOMPLETE"


def embedded_teacher() -> Path:
    """Folder of the embedded digits DDPM teacher, or a clear error if this build lacks it."""
    folder = Path(str(resources.files("diffprune") / "assets" / TEACHER_ASSET))
    if not (folder / "model_index.json").is_file():
        raise DiffpruneError(f"the embedded teacher is not available in this build ({folder}); "
                             "pass --teacher with a pipeline folder")
    return folder


@dataclasses.dataclass(frozen=True)
class DemoConfig(StageConfig):
    """Settings of the demo run (defaults: the documented demo)."""

    stage = "demo"
    version = 1
    teacher: str | None = None
    method: str = "diff-pruning"
    threshold: float = 0.05
    target_macs: float = 0.56
    calibration_batch: int = 32
    finetune_steps: int = 300
    finetune_batch: int = 64
    lr: float = 1e-3  # the teacher's own training lr, as the paper post-trains at the pre-training lr
    ema_decay: float = 0.999
    distill: str = "none"
    num_images: int = 256
    sample_steps: int = 50
    sample_batch: int = 128
    seed: int = 0
    device: str = "cpu"


def run_demo(config: DemoConfig, output_dir: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Run every stage into `output_dir` (locked meanwhile); returns the summary dict.

    `overwrite` replaces only a folder an earlier demo wrote (demo_config.json).
    """
    teacher = Path(config.teacher) if config.teacher else embedded_teacher()
    out = check_output_location(output_dir, {"--teacher": teacher})
    with output_lock(out):  # held for the whole run, not only while writing
        check_output_dir(out, overwrite, DemoConfig.stage)
        return _run_demo(config, out, teacher, progress)


def _run_demo(config: DemoConfig, out: Path, teacher: Path, progress: bool) -> dict:
    from ..evaluate.stage import EvaluateConfig, evaluate
    from ..prune.pruning import PruneConfig
    from ..prune.stage import run_prune
    from ..report import write_report
    from ..sample.loop import sample_to_folder
    from ..train import FinetuneConfig, run_training

    times: dict[str, float] = {}
    # The stages write their own outputs atomically and record absolute paths, so the demo runs in
    # its final folder (not a temp name) and marks it incomplete until the last stage is done.
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / INCOMPLETE_MARKER).write_text("this demo run did not finish; delete this folder\n")
    try:
        config.save(out)
        t0 = time.perf_counter()
        _stage("1/5 prune", progress)
        run_prune(PruneConfig(model=str(teacher), data="digits", method=config.method,
                              target_macs=config.target_macs, threshold=config.threshold,
                              batch_size=config.calibration_batch, seed=config.seed, device=config.device),
                  out / "pruned", progress=progress)
        times["prune"] = time.perf_counter() - t0
        _stage("2/5 fine-tune", progress)
        t0 = time.perf_counter()
        ft = FinetuneConfig(model=str(out / "pruned"), data="digits", steps=config.finetune_steps,
                            batch_size=config.finetune_batch, lr=config.lr, ema_decay=config.ema_decay,
                            ema_warmup="ratio", distill=config.distill, teacher=str(teacher),
                            seed=config.seed, checkpoint_every=config.finetune_steps, keep_checkpoints=1)
        run_training(ft, out / "finetuned", device=config.device, progress=progress, tensorboard=False)
        times["finetune"] = time.perf_counter() - t0
        _stage("3/5 sample teacher and student from the same noise", progress)
        t0 = time.perf_counter()
        for name, model in (("teacher", teacher), ("pruned", out / "pruned"), ("student", out / "finetuned")):
            sample_to_folder(model, out / "samples" / name, config.num_images, batch_size=config.sample_batch,
                             steps=config.sample_steps, sampler="ddim", seed=config.seed, device=config.device,
                             progress=progress)
        times["sample"] = time.perf_counter() - t0
        _stage("4/5 evaluate", progress)
        t0 = time.perf_counter()
        (out / "evaluation").mkdir()
        results = {}
        for name in ("teacher", "pruned", "student"):
            is_student = name != "teacher"
            results[name] = evaluate(EvaluateConfig(
                samples=str(out / "samples" / name), reference="digits",
                teacher_samples=str(out / "samples" / "teacher") if is_student else None,
                model=str(out / ("finetuned" if name == "student" else "pruned")) if is_student else None,
                teacher_model=str(teacher) if name == "student" else None,
                device=config.device, seed=config.seed, allow_download=False,
                output=str(out / "evaluation" / f"{name}.json")))
        times["evaluate"] = time.perf_counter() - t0
        _stage("5/5 report", progress)
        paths = write_report(prune=out / "pruned", finetune=out / "finetuned",
                             evaluation=out / "evaluation" / "student.json",
                             teacher_evaluation=out / "evaluation" / "teacher.json",
                             teacher_samples=out / "samples" / "teacher", student_samples=out / "samples" / "student",
                             output_dir=out / "report", title="diffprune demo: digits DDPM, Diff-Pruning")
        summary = _summary(results, out, times)
        summary["report"] = str(paths["html"])
        write_json_atomic(out / "demo_summary.json", summary)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    (out / INCOMPLETE_MARKER).unlink()
    return summary


def _stage(title: str, progress: bool) -> None:
    if progress:
        print(f"== {title}", flush=True)


def _summary(results: dict, out: Path, times: dict) -> dict:
    prune_report = read_json(out / "pruned" / "prune_report.json", "prune report")
    student = results["student"]
    rows = {}
    for name, res in results.items():
        rows[name] = {"fid": res["fid"]["value"], "kid": res["kid"]["mean"],
                      "ssim": res.get("consistency", {}).get("ssim", {}).get(
                          "mean", 1.0 if name == "teacher" else None)}
    cost = student["cost"]
    return {"rows": rows, "feature_extractor": student["fid"]["feature_extractor"],
            "params": {"teacher": cost["teacher"]["params"], "student": cost["student"]["params"]},
            "macs": {"teacher": cost["teacher"]["macs"], "student": cost["student"]["macs"]},
            "latency_speedup": cost["ratios"].get("latency_speedup"),
            "macs_speedup": cost["ratios"].get("macs_speedup_teacher_over_student"),
            "kept_timesteps": prune_report["importance"]["num_kept_timesteps"],
            "wall_time_s": {**times, "total": sum(times.values())}}


def summary_table(summary: dict) -> str:
    """The demo's closing table: one row per model."""
    lines = [f"{'model':<22}{'params':>10}{'MACs':>10}{'FID*':>9}{'KID*':>9}{'SSIM':>8}"]
    labels = {"teacher": "teacher", "pruned": "pruned (no fine-tune)", "student": "pruned + fine-tuned"}
    for name, row in summary["rows"].items():
        key = "teacher" if name == "teacher" else "student"
        ssim = "-" if row["ssim"] is None else f"{row['ssim']:.3f}"
        lines.append(f"{labels[name]:<22}{summary['params'][key] / 1e6:>9.3f}M{summary['macs'][key] / 1e6:>9.1f}M"
                     f"{row['fid']:>9.2f}{row['kid']:>9.4f}{ssim:>8}")
    lines.append(f"* {summary['feature_extractor']} features (not comparable with Inception FIDs). "
                 f"Latency speed-up {summary['latency_speedup']:.2f}x vs MACs ratio {summary['macs_speedup']:.2f}x; "
                 f"{summary['kept_timesteps']} timesteps kept; wall time {summary['wall_time_s']['total']:.0f}s")
    return "\n".join(lines)
