"""`diffprune report`: self-contained HTML, every number traced to its input, pairs by index, skips."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffprune.cli import build_parser, main
from diffprune.errors import DiffpruneError
from diffprune.report import write_report

# --------------------------------------------------------------------------- fake inputs


def _prune_report(losses: bool = True) -> dict:
    before = {"conv_in": 32, "time_embedding.linear_1": 128, "down_blocks.0.resnets.0.conv1": 32,
              "up_blocks.0.resnets.0.conv1": 64, "mid_block.resnets.0.conv1": 64, "conv_norm_out": 32,
              "conv_out": 1}
    after = {k: (v if k == "conv_out" else v * 3 // 4) for k, v in before.items()}
    sweep = [[t, 1.2 - 0.1 * t] for t in range(6)] if losses else []
    return {
        "config": {"stage": "prune", "version": 1, "model": "/models/teacher", "data": "digits",
                   "method": "diff-pruning" if losses else "magnitude", "threshold": 0.05, "ratio": 0.3,
                   "ratio_rule": "uniform", "target_macs": 0.56, "target_params": None, "round_to": None,
                   "batch_size": 6, "seed": 0, "device": "cpu"},
        "output_dir": "/runs/pruned",
        "family": "unet2d",
        "calibration": {"images": 6, "skipped_files": 0},
        "ratio": 0.1716,
        "params": {"before": 35_746_307, "after": 19_845_123, "fraction": 19_845_123 / 35_746_307},
        "macs": {"before": 6_065_000_000, "after": 3_390_000_000, "fraction": 3_390_000_000 / 6_065_000_000},
        "importance": {"method": "diff-pruning" if losses else "magnitude", "threshold": 0.05,
                       "kept_timesteps": [[0, 5]] if losses else [], "num_kept_timesteps": 5 if losses else 0,
                       "cut_timestep": 5 if losses else None, "losses": sweep,
                       "tail_losses": [[t, 0.5 / t] for t in range(6, 12)] if losses else [],
                       "sample_gradient_evals": 30, "wall_time_s": 1.5},
        "widths": {"before": before, "after": after},
        "ratio_search": None,
        "wall_time_s": {"importance": 1.5, "prune": 0.5, "total": 2.25},
        "versions": {"diffprune": "0.1.0", "torch": "2.x", "diffusers": "0.x", "torch_pruning": "1.6"},
    }


def _evaluation(student: bool) -> dict:
    fid = {"value": 5.2913 if student else 4.1874, "feature_extractor": "digits-cnn-v1", "feature_dim": 64,
           "reference": {"kind": "builtin", "name": "digits", "split": "all"}, "num_samples": 12,
           "num_reference": 1797, "conversions": [], "notes": []}
    out = {"format": "diffprune-evaluation", "format_version": 1,
           "samples": {"path": "/runs/student" if student else "/runs/teacher", "num_images": 12},
           "fid": fid,
           "kid": {"mean": 0.00123 if student else -0.00042, "std": 0.00051, "subsets": 5, "subset_size": 4,
                   **{k: v for k, v in fid.items() if k != "value"}},
           "warnings": ["samples have 12 images, fewer than the feature dimension"] if student else [],
           "config": {"stage": "evaluate", "version": 1, "reference": "digits", "feature_net": "digits",
                      "kid_subsets": 5, "kid_subset_size": 4, "seed": 0},
           "versions": {"diffprune": "0.1.0"}}
    if student:
        per = [0.93, 0.91, 0.95, 0.90]
        out["consistency"] = {"num_pairs": 4, "indices": [0, 1, 2, 3],
                              "ssim": {"mean": float(np.mean(per)), "std": float(np.std(per)), "min": 0.90,
                                       "max": 0.95, "per_image": per},
                              "psnr_db": {"mean": 24.937, "std": 0.642, "min": 24.0, "max": 26.0, "per_image": []},
                              "mse": {"mean": 0.00324, "std": 0.0001, "min": 0.003, "max": 0.0034, "per_image": []}}
        out["cost"] = {
            "teacher": {"path": "/models/teacher", "params": 35_746_307, "macs": 6_065_000_000},
            "student": {"path": "/runs/ft", "params": 19_845_123, "macs": 3_390_000_000},
            "macs_protocol": "one forward pass, batch 1, model resolution (PAPER.md)",
            "latency": {"settings": {"device": "cpu", "torch_threads": 2, "repeats": 20, "warmup": 3},
                        "batch_size": 1, "teacher": {"median_ms": 571.96, "p10_ms": 561.2, "p90_ms": 576.6},
                        "student": {"median_ms": 426.29, "p10_ms": 410.8, "p90_ms": 442.3}},
            "ratios": {"params_student_over_teacher": 19_845_123 / 35_746_307,
                       "macs_student_over_teacher": 3_390_000_000 / 6_065_000_000,
                       "macs_speedup_teacher_over_student": 6_065_000_000 / 3_390_000_000,
                       "latency_speedup": 571.96 / 426.29},
        }
    return out


def _sample_folder(folder: Path, indices: list[int], base: int, seed: int = 0) -> Path:
    """Constant-grey 8x8 images: image i has value base + 20 i, so pairs are recognisable in the grid."""
    folder.mkdir(parents=True)
    images = np.stack([np.full((8, 8, 1), base + 20 * i, np.uint8) for i in indices])
    for i, im in zip(indices, images, strict=True):
        Image.fromarray(im[..., 0]).save(folder / f"{i:06d}.png")
    np.savez(folder / "samples.npz", images=images, indices=np.array(indices, dtype=np.int64))
    (folder / "sample_config.json").write_text(json.dumps(
        {"stage": "sample", "version": 1, "model": str(folder), "num_images": len(indices), "seed": seed,
         "steps": 100, "eta": 0.0, "sampler": "ddim", "spacing": "uniform"}))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    (root / "pruned").mkdir()
    prune = _prune_report()
    (root / "pruned" / "prune_report.json").write_text(json.dumps(prune))
    (root / "ft").mkdir()
    log = {"stage": "finetune", "log_every": 10, "keys": ["step", "loss"],
           "records": [{"step": 10 * (k + 1), "loss": 1.0 / (k + 1) + 0.01 * (k % 3), "lr": 2e-4,
                        "ema_decay": 0.9999, "steps_per_s": 3.0, "elapsed_s": 3.0 * k} for k in range(40)]}
    (root / "ft" / "train_log.json").write_text(json.dumps(log))
    (root / "ft" / "finetune_config.json").write_text(json.dumps(
        {"stage": "finetune", "version": 1, "data": "digits", "steps": 400, "batch_size": 128, "lr": 2e-4,
         "model": str(root / "pruned")}))
    (root / "eval_student.json").write_text(json.dumps(_evaluation(True)))
    (root / "eval_teacher.json").write_text(json.dumps(_evaluation(False)))
    # Student has a subset of the indices, stored out of order: pairs must still match by index.
    _sample_folder(root / "teacher", [0, 1, 2, 3, 4, 5], base=10)
    _sample_folder(root / "student", [3, 0, 2, 1], base=15)
    return {"root": root, "prune": prune, "finetune": log, "finetune_config":
            json.loads((root / "ft" / "finetune_config.json").read_text()),
            "evaluation": _evaluation(True), "teacher_evaluation": _evaluation(False)}


def _all_args(root: Path, out: Path) -> list[str]:
    return ["report", "--prune", str(root / "pruned"), "--finetune", str(root / "ft"),
            "--evaluation", str(root / "eval_student.json"), "--teacher-evaluation", str(root / "eval_teacher.json"),
            "--teacher-samples", str(root / "teacher"), "--student-samples", str(root / "student"),
            "--output-dir", str(out), "--title", "Test <report>"]


@pytest.fixture(scope="module")
def full_report(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rep") / "report"
    assert main(_all_args(inputs["root"], out)) == 0
    return out


# --------------------------------------------------------------------------- HTML parsing helpers


class _Doc(HTMLParser):
    """Collects <img src>, metric-table cells (class num, data-src) and every tag name."""

    def __init__(self):
        super().__init__()
        self.imgs, self.cells, self.tags, self.attrs = [], [], [], []
        self._table = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.attrs.append(a)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self._table = a.get("class")
        if tag == "td" and self._table == "metrics" and a.get("class") == "num":
            self._cell = {"src": a.get("data-src"), "text": ""}

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None
        if tag == "table":
            self._table = None


def _parse(path: Path) -> _Doc:
    doc = _Doc()
    doc.feed(path.read_text())
    return doc


def _resolve(data: dict, path: str):
    cur = data
    for key in path.split("."):
        cur = cur[int(key)] if isinstance(cur, list) else cur[key]
    return cur


_NUM = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)([MG](?![a-z]))?")


# --------------------------------------------------------------------------- tests


def test_full_report_files_and_self_contained_html(full_report, capsys):
    names = {p.name for p in full_report.iterdir()}
    assert {"report.html", "report.md", "report_data.json", "sample_pairs.png", "loss_over_timesteps.png",
            "widths.png", "training_loss.png"} <= names
    assert not list(full_report.parent.glob(".*tmp*"))
    text = (full_report / "report.html").read_text()
    doc = _parse(full_report / "report.html")
    assert "script" not in doc.tags and "link" not in doc.tags and "iframe" not in doc.tags
    for a in doc.attrs:
        for key in ("src", "href"):
            assert not a.get(key) or a[key].startswith("data:image/png;base64,"), a
    assert "<title>Test &lt;report&gt;</title>" in text  # the title is escaped
    assert len(doc.imgs) == 4
    for src in doc.imgs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as im:
            im.load()
            assert im.width > 10 and im.height > 10


def test_every_metric_number_comes_from_an_input(full_report, inputs):
    cells = _parse(full_report / "report.html").cells
    checked = 0
    for cell in cells:
        numbers = _NUM.findall(cell["text"])
        if not numbers:
            assert not cell["src"], cell
            continue
        assert cell["src"], f"number without a source: {cell}"
        sources = cell["src"].split()
        assert len(sources) == len(numbers), cell
        for (num, unit), src in zip(numbers, sources, strict=True):
            name, path = src.split(":", 1)
            value = _resolve(inputs[name], path)
            decimals = len(num.split(".")[1]) if "." in num else 0
            scale = {"M": 1e6, "G": 1e9, "": 1.0}[unit]
            assert abs(float(num) * scale - value) <= 0.5 * 10 ** -decimals * scale * (1 + 1e-9), (cell, value)
            checked += 1
    texts = {c["text"] for c in cells}
    # Spot-check the formats: params in M, MACs in G, latency, speed-ups, FID, KID, SSIM, steps.
    assert {"35.746M", "19.845M", "6.065G", "3.390G", "571.96 ms", "426.29 ms", "4.187", "5.291", "400"} <= texts
    assert "24.94 ± 0.64 dB" in texts and "×1.34 measured speed-up" in texts
    assert "-0.00042 ± 0.00051" in texts and "0.9225 ± 0.0192" in texts
    assert checked >= 20
    html_text = (full_report / "report.html").read_text()
    assert "digits-cnn-v1" in html_text and "student evaluation (eval_student.json) › cost.ratios.latency_speedup" \
        in html_text
    data = json.loads((full_report / "report_data.json").read_text())
    assert data["format"] == "diffprune-report"
    row = next(r for r in data["metrics"] if r["metric"] == "params")
    assert row["student"]["sources"] == ["evaluation:cost.student.params"] and row["student"]["values"] == [19_845_123]


def test_pairs_are_matched_by_index(full_report):
    grid = np.array(Image.open(full_report / "sample_pairs.png").convert("L"))
    # Common indices are 0..3 (student folder has 4 of the teacher's 6, stored out of order).
    runs = []
    for row in grid:
        vals = [int(v) for v in row if v != 255]
        seq = [v for k, v in enumerate(vals) if k == 0 or vals[k - 1] != v]
        if seq:
            runs.append(tuple(seq))
    tiles = sorted(set(runs), key=len)[-1]
    expected = []
    for i in range(4):
        expected += [10 + 20 * i, 15 + 20 * i]  # teacher i, then student i
    assert tiles == tuple(expected), tiles  # 4 tiles fit one row: teacher 0, student 0, teacher 1, ...


def test_markdown_twin_references_existing_pngs(full_report):
    md = (full_report / "report.md").read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == 4
    for ref in refs:
        assert (full_report / ref).is_file() and ref.endswith(".png")
    assert "| params | 35.746M | 19.845M |" in md
    assert "kept timesteps [0, 5)" in md


def test_missing_inputs_are_reported_as_skipped(inputs, tmp_path, capsys):
    root = inputs["root"]
    out = tmp_path / "only_prune"
    assert main(["report", "--prune", str(root / "pruned"), "--output-dir", str(out)]) == 0
    html_text = (out / "report.html").read_text()
    for what in ("--evaluation not given", "--teacher-evaluation not given", "--finetune not given",
                 "side-by-side pairs skipped: --teacher-samples and --student-samples not given"):
        assert what in html_text
    cells = _parse(out / "report.html").cells
    assert {"35.746M", "6.065G"} <= {c["text"] for c in cells}  # params/MACs fall back to the prune report
    assert not (out / "training_loss.png").exists()

    # A finetune folder without a log yet, student samples alone, a method without a loss sweep.
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "finetune_config.json").write_text((root / "ft" / "finetune_config.json").read_text())
    (tmp_path / "mag").mkdir()
    (tmp_path / "mag" / "prune_report.json").write_text(json.dumps(_prune_report(losses=False)))
    out2 = tmp_path / "partial"
    paths = write_report(out2, prune=tmp_path / "mag", finetune=tmp_path / "ft",
                         student_samples=root / "student", num_pairs=2)
    html_text = paths["html"].read_text()
    assert "training loss curve skipped" in html_text and "train_log.json is missing" in html_text
    assert "evaluates no per-timestep loss" in html_text
    assert "--teacher-samples not given" in html_text
    assert paths["student_samples"].is_file() and "training" not in paths
    assert all(p.is_file() for p in paths.values())


def test_num_pairs_limits_the_grid(inputs, tmp_path):
    root = inputs["root"]
    paths = write_report(tmp_path / "r", teacher_samples=root / "teacher", student_samples=root / "student",
                         num_pairs=2)
    grid = np.array(Image.open(paths["samples"]).convert("L"))
    assert set(np.unique(grid)) == {10, 15, 30, 35, 255}


def test_overwrite_and_bad_inputs(inputs, full_report, tmp_path, capsys):
    root = inputs["root"]
    capsys.readouterr()
    assert main(_all_args(root, full_report)) == 2  # exists, no --overwrite
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert main([*_all_args(root, full_report), "--overwrite"]) == 0

    bad_eval = tmp_path / "not_ours.json"
    bad_eval.write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--prune", str(tmp_path / "nope")], "does not exist"),
        (["--prune", str(tmp_path / "empty")], "no prune_report.json"),
        (["--evaluation", str(bad_eval)], "not a diffprune evaluation"),
        (["--teacher-evaluation", str(tmp_path / "list.json")], "not a diffprune result"),
        (["--evaluation", str(tmp_path / "broken.json")], "not valid JSON"),
        (["--finetune", str(tmp_path / "empty")], "neither train_log.json"),
        (["--student-samples", str(tmp_path / "empty")], "no samples.npz"),
        (["--teacher-samples", str(bad_eval)], "is a file"),
        ([], "nothing to report"),
    ]
    for extra, match in cases:
        out = tmp_path / "out"
        assert main(["report", *extra, "--output-dir", str(out)]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, (extra, err)
        assert not out.exists()
    with pytest.raises(DiffpruneError, match="num_pairs"):
        write_report(tmp_path / "x", prune=root / "pruned", num_pairs=0)
    with pytest.raises(SystemExit):
        main(["report", "--num-pairs", "0", "--output-dir", str(tmp_path / "y")])


def test_help_states_every_default():
    sub = build_parser()._subparsers._group_actions[0].choices["report"]
    fmt = sub._get_formatter()
    for action in sub._actions:
        if action.dest in ("help", "output_dir"):
            continue
        assert "default" in fmt._get_help_string(action), action.dest
    assert "(default: 32)" in sub.format_help()


def test_widths_chart_groups_big_models_by_block(tmp_path):
    from diffprune.report import MAX_LAYER_BARS, group_by_block, plot_widths

    names = [f"down_blocks.{b}.resnets.{k}.conv1" for b in range(3) for k in range(MAX_LAYER_BARS // 2)]
    names = ["conv_in", *names, "up_blocks.0.resnets.0.conv1", "mid_block.resnets.0.conv1", "conv_out"]
    before = dict.fromkeys(names, 64)
    after = dict.fromkeys(names, 48)
    path, how = plot_widths(before, after, tmp_path / "w.png")
    assert "per block" in how and Image.open(path).height < 1000
    assert list(group_by_block(names)) == ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2",
                                           "mid_block", "up_blocks.0", "conv_out"]


def test_samples_with_another_schedule_are_noted(inputs, tmp_path):
    """Teacher and student folders sampled by another sampler version or clip setting are flagged."""
    root = inputs["root"]

    def copy(name: str, **changes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for f in (root / name).iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        config = json.loads((folder / "sample_config.json").read_text())
        (folder / "sample_config.json").write_text(json.dumps({**config, **changes}))
        return folder

    student = copy("student", version=2, clip_sample="off")
    paths = write_report(tmp_path / "r1", teacher_samples=root / "teacher", student_samples=student, num_pairs=2)
    assert "teacher folder has version=1, student folder has version=2" in paths["html"].read_text()
    teacher = copy("teacher", version=2, clip_sample="auto")
    paths = write_report(tmp_path / "r2", teacher_samples=teacher, student_samples=student, num_pairs=2)
    text = paths["html"].read_text()
    assert "clip_sample=&#x27;auto&#x27;" in text or "clip_sample='auto'" in text
    assert "version=" not in text


def test_clip_score_row_when_the_evaluations_have_one(inputs, full_report, tmp_path):
    """A CLIP score (teacher and student, with the CLIP model) gets its own sourced row; none: no row."""
    assert "CLIP" not in (full_report / "report.html").read_text()  # absent in both evaluations
    root = inputs["root"]
    model = "openai/clip-vit-base-patch16"
    student = {**_evaluation(True), "clip_score": {"value": 31.4159, "clip_model": model, "num_images": 12,
                                                    "per_image": {"mean": 31.4159, "std": 2.5}}}
    teacher = {**_evaluation(False), "clip_score": 32.5, "clip_model": model}  # a bare number is read too
    (tmp_path / "student.json").write_text(json.dumps(student))
    (tmp_path / "teacher.json").write_text(json.dumps(teacher))
    paths = write_report(tmp_path / "r", evaluation=tmp_path / "student.json",
                         teacher_evaluation=tmp_path / "teacher.json", prune=root / "pruned")
    by_text = {c["text"]: c["src"] for c in _parse(paths["html"]).cells}
    assert by_text["31.416"] == "evaluation:clip_score.value" and by_text["32.500"] == "teacher_evaluation:clip_score"
    data = json.loads(paths["data"].read_text())
    row = next(r for r in data["metrics"] if r["metric"].startswith("CLIP score"))
    assert row["metric"] == f"CLIP score ({model})" and row["note"] == "student: 12 images"
    assert row["student"]["values"] == [31.4159] and row["teacher"]["values"] == [32.5]
    names = [r["metric"] for r in data["metrics"]]
    assert names.index(row["metric"]) == names.index("SSIM vs teacher (same noise)") - 1  # beside FID/KID, SSIM
    md = paths["markdown"].read_text()
    assert f"| CLIP score ({model}) | 32.500 | 31.416 |" in md and f"| CLIP model | {model} |" in md

    other = {**student, "clip_score": {**student["clip_score"], "clip_model": "laion/CLIP-ViT-H-14"}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    paths = write_report(tmp_path / "r2", evaluation=tmp_path / "other.json",
                         teacher_evaluation=tmp_path / "teacher.json")
    assert "scored with different CLIP models" in paths["html"].read_text()


def test_allocation_and_estimator_are_shown_with_the_kept_widths(tmp_path):
    prune = _prune_report()
    before, after = prune["widths"]["before"], prune["widths"]["after"]
    groups = [{"layer": n, "kept": after[n], "total": before[n], "channel_groups": 1}
              for n in before if n != "conv_out"]
    groups[0]["kept"] = before[groups[0]["layer"]] // 8  # a non-uniform allocation: one group cut hard
    prune.update(estimator="fast", allocation={"mode": "global", "ratio": 0.3, "max_group_ratio": 0.9,
                                               "groups": groups})
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "prune_report.json").write_text(json.dumps(prune))
    paths = write_report(tmp_path / "r", prune=tmp_path / "p")
    text = paths["markdown"].read_text()
    assert "Allocation 'global' (each group loses at most 90%)" in text
    assert "kept fraction per ranked group 0.12 to 0.75" in text
    first = groups[0]
    assert f"{first['kept']} / {first['total']}" in text
    assert "| allocation | global |" in text and "| estimator | fast |" in text  # the settings table

    old = _prune_report()  # a report written before the allocation existed: no table, no error
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "prune_report.json").write_text(json.dumps(old))
    assert "kept width per ranked channel group" not in write_report(tmp_path / "r2", prune=tmp_path / "o")[
        "html"].read_text()
