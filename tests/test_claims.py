"""README figures equal the committed result files they quote (issue 25, item 1: `benchmarks/check_claims.py`).

The check passes on the README and benchmarks/results as committed, and it can fail: a README copy with one
figure changed, and a results copy with one JSON value changed, each exit 1 with a line naming the claim.
Standard library only on the script's side; the whole file runs in about a second.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "check_claims.py"
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def cc():
    spec = importlib.util.spec_from_file_location("check_claims", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_claims"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("check_claims", None)


def run(cc, readme: Path = README, results: Path = RESULTS, strict: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    code = cc.run(readme, results, strict=strict, out=out)
    return code, out.getvalue()


def failures(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("FAIL ")]


@pytest.fixture
def results_copy(tmp_path) -> Path:
    """The committed JSON files (not the pictures) in a temporary folder the test may edit."""
    dest = tmp_path / "results"
    shutil.copytree(RESULTS, dest, ignore=shutil.ignore_patterns("*.png", "*.md"))
    return dest


def test_every_claim_matches_the_committed_readme_and_results(cc):
    code, text = run(cc, strict=True)
    assert code == 0, "\n".join(failures(text) + [line for line in text.splitlines() if line.startswith("WARN")])
    assert not failures(text) and "WARN" not in text
    assert text.splitlines()[-1].endswith("0 do not")


def test_the_claim_table_is_well_formed(cc):
    claims = cc.claims()
    ids = [c.id for c in claims]
    assert len(ids) == len(set(ids)), "claim ids must be unique"
    for c in claims:
        assert c.figures(), f"{c.id}: a claim quotes at least one figure"
        for name in c.files:
            assert "*" in name or (RESULTS / name).is_file(), f"{c.id}: {name} is not in benchmarks/results"
    sections = {c.section for c in claims}
    assert {"Table 1 on the digits teacher", "Performance"} <= sections


def test_cli_exit_status_on_the_committed_files():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "README says" in proc.stdout and "JSON gives" in proc.stdout


def test_a_changed_readme_figure_fails_naming_the_claim(cc, tmp_path):
    text = README.read_text()
    quoted = "fast **0.891 ± 0.009** vs exact-64"
    assert text.count(quoted) == 1
    changed = tmp_path / "README.md"
    changed.write_text(text.replace(quoted, "fast **0.901 ± 0.009** vs exact-64"))
    code, out = run(cc, readme=changed)
    assert code == 1
    (line,) = failures(out)
    assert line.startswith("FAIL truth-iou (importance_cost.json)")
    assert 'README says "0.901 / 0.009' in line and 'JSON gives "0.891 / 0.009' in line


def test_a_changed_table_cell_fails_through_the_cli(tmp_path):
    text = README.read_text()
    row = "| SD v1.5 UNet (bf16) | 32.5 s | 42.3 s | 1.30x | 13.8 s | 1.00x |"
    assert row in text
    changed = tmp_path / "README.md"
    changed.write_text(text.replace(row, row.replace("42.3 s", "41.3 s")))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--readme", str(changed)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert [line for line in proc.stdout.splitlines() if line.startswith("FAIL ")] == [
        'FAIL size-search-sd15 (size_search_slow.json): README says "32.5 / 41.3 / 1.30 / 13.8 / 1.00", JSON gives '
        '"32.5 / 42.3 / 1.30 / 13.8 / 1.00" (README should read "| SD v1.5 UNet (bf16) | 32.5 s | 42.3 s | 1.30x | '
        '13.8 s | 1.00x |")']


def test_a_changed_json_value_fails_naming_the_claim(cc, results_copy):
    path = results_copy / "latency.json"
    data = json.loads(path.read_text())
    row = next(r for r in data["rows"] if r["label"] == "target_macs=0.56, rt=16")
    row["measured"]["forward"]["8"]["speedup"] = 1.81  # the README prints 1.91
    path.write_text(json.dumps(data))
    code, out = run(cc, results=results_copy)
    assert code == 1
    (line,) = failures(out)
    assert line.startswith("FAIL latency-target_macs=0.56, rt=16 (latency.json)")
    assert "1.91" in line.split("JSON gives")[0] and "1.81" in line.split("JSON gives")[1]


def test_a_changed_value_in_a_dated_result_folder_fails_too(cc, results_copy):
    path = results_copy / "2026-11-27" / "table1.json"
    data = json.loads(path.read_text())
    data["table"]["magnitude"]["ssim"]["mean"] = 0.9401  # README: 0.926, and the range 0.91-0.93
    path.write_text(json.dumps(data))
    code, out = run(cc, results=results_copy)
    assert code == 1
    named = sorted(line.split(" (")[0] for line in failures(out))
    assert named == ["FAIL table1-3seed-magnitude", "FAIL table1-3seed-ssim-magnitude", "FAIL table1-3seed-ssim-range"]


def test_a_missing_result_file_or_key_fails_without_a_traceback(cc, results_copy):
    (results_copy / "anchor_cifar10.json").unlink()
    path = results_copy / "finetune_throughput.json"
    data = json.loads(path.read_text())
    del data["alternatives"]
    path.write_text(json.dumps(data))
    code, out = run(cc, results=results_copy)
    assert code == 1
    lines = failures(out)
    assert all(line.startswith(("FAIL anchor-", "FAIL finetune-alternatives")) for line in lines), lines
    assert any("FileNotFoundError" in line for line in lines) and any("KeyError" in line for line in lines)
    assert "Traceback" not in out
