"""`diffprune demo`: every stage runs and the folder ends complete, with the report and summary."""

from __future__ import annotations

import json

from conftest import save_tiny_pipeline

from diffprune.cli import main
from diffprune.cli.demo_job import INCOMPLETE_MARKER


def test_demo_runs_every_stage_on_a_tiny_teacher(tmp_path, capsys):
    teacher = save_tiny_pipeline(tmp_path / "teacher", num_train_timesteps=20)
    out = tmp_path / "demo"
    code = main(["demo", "--teacher", str(teacher), "--finetune-steps", "3", "--num-images", "12",
                 "--sample-steps", "3", "--output-dir", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "pruned + fine-tuned" in stdout and "report:" in stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["rows"]) == {"teacher", "pruned", "student"}
    assert summary["params"]["student"] < summary["params"]["teacher"]
    assert (out / "report" / "report.html").stat().st_size > 10_000
    assert not (out / INCOMPLETE_MARKER).exists()
    for sub in ("pruned/prune_report.json", "finetuned/model_index.json", "samples/teacher/samples.npz",
                "samples/student/samples.npz", "evaluation/student.json"):
        assert (out / sub).exists(), sub

    # `make demo` twice: --overwrite replaces the folder the demo wrote (and nothing else).
    assert main(["demo", "--teacher", str(teacher), "--finetune-steps", "3", "--num-images", "12",
                 "--sample-steps", "3", "--output-dir", str(out), "--overwrite"]) == 0
    assert json.loads((out / "demo_summary.json").read_text())["rows"] == summary["rows"]
    assert (teacher / "model_index.json").exists()


def test_demo_refuses_an_existing_folder(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("x")
    assert main(["demo", "--teacher", str(tmp_path / "teacher"), "--output-dir", str(tmp_path / "demo")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "demo" / "keep.txt").exists()
