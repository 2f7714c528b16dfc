"""`diffprune report`: one self-contained HTML page (+ Markdown twin) from the other stages' outputs."""

from __future__ import annotations

import argparse

from .common import add_output_dir, positive_int, show_defaults

_EPILOG = """examples:
  diffprune report --prune pruned/ --finetune finetuned/ --evaluation out/student/evaluation.json \\
      --teacher-evaluation out/teacher/evaluation.json --teacher-samples out/teacher \\
      --student-samples out/student --output-dir report/
  diffprune report --prune pruned/ --output-dir report/          # whatever is given; the rest is noted

Writes report.html (images embedded as data URIs; open it anywhere, offline), report.md with the PNGs
beside it, and report_data.json (every value of the metric table with its source file and key)."""


def register(subparsers) -> None:
    from ..report import DEFAULT_NUM_PAIRS, DEFAULT_TITLE

    p = subparsers.add_parser(
        "report",
        help="self-contained HTML + Markdown report: metrics, sample pairs, loss curves, widths",
        description="Write one self-contained HTML page (+ Markdown twin) from the other stages' outputs.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("inputs (all optional; each missing one is noted in the report)")
    g.add_argument("--prune", metavar="DIR",
                   help="prune output folder (prune_report.json, loss_over_timesteps.png) (default: none)")
    g.add_argument("--finetune", metavar="DIR",
                   help="finetune or train output folder (train_log.json, finetune_config.json) (default: none)")
    g.add_argument("--evaluation", metavar="FILE",
                   help="the student's evaluation JSON from `diffprune evaluate` (cost, SSIM, FID/KID) "
                        "(default: none)")
    g.add_argument("--teacher-evaluation", metavar="FILE",
                   help="the teacher's evaluation JSON (its FID/KID) (default: none)")
    g.add_argument("--teacher-samples", metavar="DIR",
                   help="the teacher's sample folder (samples.npz), paired by index with --student-samples "
                        "(default: none)")
    g.add_argument("--student-samples", metavar="DIR",
                   help="the student's sample folder, same seed as the teacher's (default: none)")
    g = p.add_argument_group("output")
    add_output_dir(g)
    g.add_argument("--title", default=DEFAULT_TITLE, help=f"page title (default: {DEFAULT_TITLE!r})")
    g.add_argument("--num-pairs", "--num_pairs", dest="num_pairs", type=positive_int, default=DEFAULT_NUM_PAIRS,
                   help=f"teacher/student pairs shown, lowest indices first, an integer >= 1 "
                        f"(default: {DEFAULT_NUM_PAIRS})")
    show_defaults(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from ..report import write_report

    paths = write_report(args.output_dir, prune=args.prune, finetune=args.finetune, evaluation=args.evaluation,
                         teacher_evaluation=args.teacher_evaluation, teacher_samples=args.teacher_samples,
                         student_samples=args.student_samples, title=args.title, num_pairs=args.num_pairs,
                         overwrite=args.overwrite)
    print(f"wrote {paths['html']} (self-contained), {paths['markdown']}, {paths['data']}")
    pngs = [p.name for k, p in paths.items() if k not in ("html", "markdown", "data")]
    if pngs:
        print(f"wrote {len(pngs)} PNGs next to them: {', '.join(pngs)}")
    return paths
