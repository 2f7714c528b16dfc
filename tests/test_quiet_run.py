"""A correct run shows nothing alarming (issue 23, item 7): no transformers notice about torchvision on a
text-family command, no traceback; run as a user runs it, in a fresh process."""

from __future__ import annotations

import subprocess
import sys

from conftest import sd_pipeline


def test_text_family_sample_prints_no_library_notices(tmp_path):
    sd_pipeline().save_pretrained(tmp_path / "sd", safe_serialization=True)
    cmd = [sys.executable, "-m", "diffprune.cli", "sample", "--model", str(tmp_path / "sd"), "--prompt", "a cat",
           "--num-images", "1", "--steps", "2", "--no-progress", "--output-dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for alarming in ("torchvision", "Traceback", "will be ignored", "deprecated"):
        assert alarming not in proc.stderr, proc.stderr
    assert "sampler: DDIMScheduler (the folder's own), 2 steps" in proc.stdout
