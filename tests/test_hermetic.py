"""The suite passes whatever hub/diffprune variables the caller's environment sets (issue 12.7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HOSTILE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": "/nonexistent/hf-home",
    "DIFFPRUNE_OFFLINE": "1",
    "DIFFPRUNE_CACHE": "/nonexistent/diffprune-cache",
}


def test_conftest_clears_the_callers_variables():
    for name in HOSTILE:
        if name in ("HF_HOME", "DIFFPRUNE_CACHE"):
            assert not os.environ[name].startswith("/nonexistent")
        else:
            assert name not in os.environ


def test_offline_sensitive_tests_pass_under_a_hostile_environment():
    """The tests that read these variables, run in a child whose environment sets all of them."""
    env = {**os.environ, **HOSTILE, "OMP_NUM_THREADS": "1"}
    tests = [
        "tests/test_metrics.py::test_inception_missing_weights_offline",
        "tests/test_hermetic.py::test_conftest_clears_the_callers_variables",
    ]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout
