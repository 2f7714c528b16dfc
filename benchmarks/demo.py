"""The demo's numbers as a committed result: run `make demo`'s job and write benchmarks/results/demo.json.

The README's demo table (teacher / pruned / post-trained: params, MACs, digits-FID/KID, SSIM to the teacher),
its latency and MACs speed-ups, the kept timesteps and the wall time of every stage come from this file
(`make check-claims` re-reads them). It runs exactly the job `make demo` runs (`diffprune demo`, default
DemoConfig, the embedded digits teacher) into a scratch folder and records its demo_summary.json with the
machine, date, versions and command.

    python benchmarks/demo.py                    # ~4-6 min on 2 cores; writes benchmarks/results/demo.json
    python benchmarks/demo.py --smoke --out DIR  # the same code path on a tiny random teacher in seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, smoke_teacher  # noqa: E402
from bench_args import add_smoke_options, results_dir  # noqa: E402

from diffprune.cli.demo_job import DemoConfig, run_demo  # noqa: E402
from diffprune.fsutil import write_json_atomic  # noqa: E402
from diffprune.io import library_versions  # noqa: E402

SMOKE = dict(calibration_batch=4, finetune_steps=2, finetune_batch=4, num_images=12, sample_steps=2, sample_batch=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench_demo"),
                        help="scratch folder the demo writes (replaced; --smoke: OUT/work)")
    add_smoke_options(parser, "a tiny random teacher, 2 post-training steps, 12 samples")
    args = parser.parse_args()
    out = results_dir(parser, args)
    config = DemoConfig()
    if args.smoke:
        config = dataclasses.replace(config, teacher=str(smoke_teacher(out / "work" / "teacher")), **SMOKE)
    start = time.perf_counter()
    summary = run_demo(config, args.work / "demo", overwrite=True, progress=not args.smoke)
    doc = {"benchmark": "demo", "date": datetime.date.today().isoformat(), "machine": machine(),
           "versions": library_versions(), "command": "make demo (diffprune demo, default settings)",
           "config": config.to_dict(), "summary": summary, "wall_time_s": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "demo.json", json.loads(json.dumps(doc, default=str)))
    rows, speed = summary["rows"], summary
    print(f"{'model':<10}{'digits-FID':>12}{'KID':>10}{'SSIM':>8}")
    for name, row in rows.items():
        print(f"{name:<10}{row['fid']:>12.2f}{row['kid']:>10.4f}{row['ssim']:>8.3f}")
    print(f"latency speed-up {speed['latency_speedup']:.2f}x at {speed['macs_speedup']:.2f}x MACs; "
          f"kept timesteps {summary['kept_timesteps']}; stages {summary['wall_time_s']}")
    print(f"wrote {out / 'demo.json'}")


if __name__ == "__main__":
    main()
