"""Every benchmark script runs end to end at smoke size (issue 25, item 4).

Each script in benchmarks/ that writes results runs in a subprocess with `--smoke --out TMP` (tiny
random models, 1 seed, a few steps: `benchmarks/bench_args.py`), so a benchmark bug shows here before
its numbers reach the README. The test checks the exit status and that the JSON written has the
structure of the committed result file the README quotes (benchmarks/results/<name>.json: the keys at
the levels listed in SCRIPTS, `*` standing for every row / budget / seed), plus a few properties of
the runs themselves. benchmarks/results is never written (checked).

The scripts run two at a time (one torch thread each) as soon as the module's first test asks, so the
whole file costs about the slowest pair of scripts, not their sum; only the selected tests' scripts run.
Under pytest-xdist (`make test`: `-n 2`) the other worker keeps the second core busy, and a worker does not know
which tests it will be sent: each script runs when a test first asks for it, once for all workers (a folder and a
file lock shared by the workers: a worker that asks for a script another one runs waits for that run), so the
scripts spread over both workers like other tests. benchmarks/results is checked around every run as well, since
there test_results_untouched sees only the runs its worker asked for.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
JOBS = 1 if XDIST else min(2, os.cpu_count() or 1)

# script -> (its commands, each the arguments before `--smoke --out DIR`; {file it writes: the key paths whose keys
# must include those of the committed benchmarks/results/<file>, or None for a file only checked to exist}).
# Ordered by smoke run time, longest first (the order they start in).
SCRIPTS: dict[str, tuple[list[list[str]], dict[str, list[tuple] | None]]] = {
    "full_size": ([[]], {"full_size.json": [(), ("rows", "*")]}),
    "budget_curve": ([[]], {
        "budget_curve.json": [(), ("table", "*", "*"), ("table", "*", "*", "*"), ("teacher",), ("identity_check",),
                              ("steps_to_target", "*", "*"), ("fid_lead", "*", "*"), ("prune", "*", "*"),
                              ("runs", "*", "*", "*"), ("meta",)],
        "budget_curve.md": None, "budget_curve.png": None}),
    "table1": ([[]], {
        "table1.json": [(), ("table", "*"), ("table", "*", "*"), ("runs", "*", "*"), ("meta",)],
        "table1.md": None}),
    "size_search": ([[]], {"size_search.json": [(), ("rows", "*"), ("goals", "*")]}),
    "importance_cost": ([[], ["--truth"]], {  # the second run adds the "truth" key to the same JSON
        "importance_cost.json": [(), ("cost", "*"), ("cost", "*", "*"), ("ratios",), ("agreement",),
                                 ("agreement", "*", "*"), ("runs", "*", "*"), ("meta",), ("truth",),
                                 ("truth", "vs_truth"), ("truth", "fast_minus_exact", "*"), ("truth", "cost", "*", "*"),
                                 ("truth", "truth_halves"), ("truth", "meta")]}),
    "allocation": ([[]], {
        "allocation.json": [(), ("digits",), ("digits", "table", "*", "*"), ("digits", "paired_vs_uniform", "*", "*"),
                            ("digits", "runs", "*", "*"), ("dit",), ("dit", "rows", "*"), ("meta",)],
        "allocation.md": None, "allocation.png": None,
        "allocation_search_timing.json": [("*",), ("*", "uniform"), ("*", "global")]}),
    "threshold_sweep": ([[]], {
        "threshold_sweep.json": [(), ("summary",), ("summary", "prefix", "*"), ("summary", "prefix", "*", "*"),
                                 ("summary", "threshold", "*"), ("summary", "magnitude"), ("runs", "*"), ("meta",)],
        "threshold_sweep.png": None}),
    "anchor_cifar10": ([[]], {"anchor_cifar10.json": [(), ("paper",), ("rows", "*")]}),
    "finetune_throughput": ([[]], {
        "finetune_throughput.json": [(), ("runs", "*"), ("runs", "*", "ms_per_step"), ("alternatives", "*"),
                                     ("settings",)]}),
    "latency": ([[]], {
        "latency.json": [(), ("rows", "*"), ("rows", "*", "measured"), ("rows", "*", "measured", "forward", "*"),
                         ("rows", "*", "measured", "sampling"), ("goal",), ("goal", "per_batch_size", "*")]}),
    "gpu_latency": ([[]], {"gpu_latency.json": []}),  # nothing committed: its rows are checked below
    "fast_pool": ([[]], {"fast_pool.json": [(), ("families", "*")], "fast_pool.md": None}),
    "full_size_sweep": ([[]], {"full_size_sweep.json": [(), ("goals",)], "full_size_sweep.md": None}),
    "flow_threshold": ([[]], {"flow_threshold.json": [(), ("families", "*")], "flow_threshold.png": None}),
    "sweep_precision": ([[]], {"sweep_precision.json": [(), ("models", "*")], "sweep_precision.md": None}),
    "demo": ([[]], {"demo.json": [(), ("summary",), ("summary", "rows", "*")]}),
    "depth_vs_width": ([[]], {
        "depth_vs_width.json": [(), ("rows", "*"), ("rows", "*", "latency"), ("teacher",), ("meta",)],
        "depth_vs_width.md": None, "depth_vs_width.png": None}),
    "depth_vs_width_dit": ([[]], {
        "depth_vs_width_dit.json": [(), ("rows", "*"), ("rows", "*", "latency"), ("comparisons", "*"), ("teacher",),
                                    ("meta",)],
        "depth_vs_width_dit.md": None, "depth_vs_width_dit.png": None}),
}
# keys of a committed result that only some modes write
OPTIONAL = {"model_from"}  # allocation.json: rows evaluated from --reuse-models
# the scripts each other test of this file waits for
NEEDS = {"test_smoke_runs_mean_something": ("budget_curve", "finetune_throughput", "gpu_latency"),
         "test_results_untouched": tuple(SCRIPTS)}


def _run(commands: list[list[str]], script: str, out: Path, env: dict | None = None) -> dict:
    """Run `benchmarks/<script>.py ARGS` for each ARGS in order (stop at the first failure)."""
    start, log, code, before = time.perf_counter(), "", 0, _results_snapshot()
    for args in commands:
        proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        log += f"$ {script}.py {' '.join(args)}\n{proc.stdout}{proc.stderr}"
        code = proc.returncode
        if code:
            break
    return {"rc": code, "log": log, "seconds": time.perf_counter() - start, "out": out,
            "results_untouched": _results_snapshot() == before}


def _bench_module(name: str, monkeypatch):
    """benchmarks/<name>.py imported in this process (benchmarks/ on sys.path for its own imports, until teardown)."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module(name)


def _results_snapshot() -> dict[str, int | None]:
    """mtime of each file in benchmarks/results that a smoke run would write (None: absent)."""
    names = {n for _, files in SCRIPTS.values() for n in files}
    return {n: (RESULTS / n).stat().st_mtime_ns if (RESULTS / n).exists() else None for n in sorted(names)}


def _run_once(script: str, shared: Path) -> dict:
    """Under pytest-xdist: the run of `script` that a worker did, or does now (waited for), else this one."""
    from filelock import FileLock

    record = shared / script / "run.json"
    with FileLock(str(shared / f"{script}.lock")):
        if not record.exists():
            out = shared / script / "out"
            out.mkdir(parents=True)
            run = _run([[*args, "--smoke", "--out", str(out)] for args in SCRIPTS[script][0]], script, out)
            record.write_text(json.dumps({**run, "out": str(out)}))
    run = json.loads(record.read_text())
    return {**run, "out": Path(run["out"])}


class _Runs(dict):
    """script -> future of its run, the run started (submitted to the pool) when first asked for."""

    def __init__(self, start):
        super().__init__()
        self._start = start

    def __missing__(self, script: str):
        self[script] = future = self._start(script)
        return future


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    """script -> future of its run; the selected tests' scripts start at once, JOBS at a time. Under pytest-xdist
    a worker does not know which tests it will be sent: there each script starts when first asked for."""
    before = _results_snapshot()
    pool = ThreadPoolExecutor(JOBS)

    def start(script: str):
        if XDIST:  # the folder all workers of this session share (pytest-xdist's documented way)
            shared = tmp_path_factory.getbasetemp().parent / "benchmarks-smoke"
            shared.mkdir(exist_ok=True)
            return pool.submit(_run_once, script, shared)
        out = tmp_path_factory.mktemp(script)
        commands = [[*args, "--smoke", "--out", str(out)] for args in SCRIPTS[script][0]]
        return pool.submit(_run, commands, script, out)

    futures = _Runs(start)
    if not XDIST:
        mine = [item for item in request.session.items if item.module is request.module]
        wanted = {item.callspec.params["script"] for item in mine if item.originalname == "test_benchmark_smoke_run"}
        wanted.update(*(NEEDS.get(item.originalname, ()) for item in mine))
        for script in sorted(wanted, key=list(SCRIPTS).index):  # the slowest first
            futures[script]  # starts it
    yield futures, before
    pool.shutdown(wait=True, cancel_futures=True)


def keys_at(data, path: tuple) -> set | None:
    """The keys of every dict at `path` ("*": every value of a dict or item of a list), or None if none is there."""
    nodes = [data]
    for step in path:
        nxt = []
        for node in nodes:
            if step == "*":
                nxt += list(node.values()) if isinstance(node, dict) else list(node) if isinstance(node, list) else []
            elif isinstance(node, dict) and step in node:
                nxt.append(node[step])
        nodes = nxt
    dicts = [n for n in nodes if isinstance(n, dict)]
    return set().union(*(set(d) for d in dicts)) if dicts else None


def finished(smoke_runs, script: str) -> dict:
    futures, _ = smoke_runs
    run = futures[script].result()
    print(f"{script}: {run['seconds']:.1f} s")
    assert run["rc"] == 0, f"benchmarks/{script}.py --smoke failed (exit {run['rc']}):\n{run['log'][-4000:]}"
    assert run["results_untouched"], f"benchmarks/results changed while {script}.py --smoke ran"
    return run


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_benchmark_smoke_run(smoke_runs, script):
    """The script runs at smoke size, writes its files into --out, and its JSON has the committed structure."""
    run = finished(smoke_runs, script)
    for name, paths in SCRIPTS[script][1].items():
        path = run["out"] / name
        assert path.is_file() and path.stat().st_size > 0, f"{script}.py --smoke did not write {name}"
        if paths is None:
            continue
        smoke = json.loads(path.read_text())
        committed = RESULTS / name
        if not committed.exists():
            continue
        reference = json.loads(committed.read_text())
        for keys in paths:
            want, got = keys_at(reference, keys), keys_at(smoke, keys)
            assert want is not None, f"benchmarks/results/{name} has nothing at {keys}: fix SCRIPTS in this test"
            missing = sorted(want - (got or set()) - OPTIONAL)
            assert not missing, f"{name} of the smoke run lacks {missing} at {'/'.join(keys) or 'top level'}"


def test_smoke_runs_mean_something(smoke_runs):
    """A few properties of the smoke runs themselves (not only their shape)."""
    out = {s: finished(smoke_runs, s)["out"] for s in ("budget_curve", "finetune_throughput", "gpu_latency")}
    curve = json.loads((out["budget_curve"] / "budget_curve.json").read_text())
    # one post-training run serves every budget only if resuming equals a fresh run of that many steps
    assert curve["identity_check"]["identical"], curve["identity_check"]
    ft = json.loads((out["finetune_throughput"] / "finetune_throughput.json").read_text())
    for name, r in ft["runs"].items():  # the timing hooks still wrap the loop's pieces (train/ renames show here)
        for piece in ("step", "data", "forward", "backward", "optimizer", "EMA"):
            assert r["ms_per_step"][piece] > 0, f"finetune_throughput: {name} timed no {piece!r}"
    gpu = json.loads((out["gpu_latency"] / "gpu_latency.json").read_text())
    assert gpu["rows"] and all("error" not in r and math.isfinite(r["efficiency"]) for r in gpu["rows"]), gpu["rows"]


def test_gpu_latency_refuses_without_cuda(monkeypatch):
    """Without --smoke / --device cpu and no CUDA device: one line saying what to do (SystemExit, no traceback)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        _bench_module("gpu_latency", monkeypatch).main([])
    assert "no CUDA device" in str(exc.value.code) and "--smoke" in str(exc.value.code)


def test_smoke_needs_an_out_folder_outside_results(tmp_path, monkeypatch):
    """--smoke never writes benchmarks/results: it needs --out, and not that folder or one inside it."""
    import argparse

    bench_args = _bench_module("bench_args", monkeypatch)

    def parse(*argv: str):
        parser = argparse.ArgumentParser()
        bench_args.add_smoke_options(parser, "test")
        parser.add_argument("--work", type=Path, default=Path("runs/x"))
        args = parser.parse_args(argv)
        return bench_args.results_dir(parser, args), args

    for argv in (["--smoke"], ["--smoke", "--out", str(RESULTS)], ["--smoke", "--out", str(RESULTS / "x")]):
        with pytest.raises(SystemExit):
            parse(*argv)
    assert parse()[0] == RESULTS
    out, args = parse("--smoke", "--out", str(tmp_path))
    assert out == tmp_path and args.work == tmp_path / "work"  # scratch inside the smoke folder, not runs/


def test_results_untouched(smoke_runs):
    """After every smoke run, the files of benchmarks/results they would write are as before (none created).
    Under pytest-xdist: the runs this worker asked for (finished() checks each run on its own too)."""
    futures, before = smoke_runs
    for future in futures.values():
        future.result()
    assert _results_snapshot() == before
