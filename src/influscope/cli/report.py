"""``influscope report``: render a run directory (scores + studies) into one HTML file.

Example::

    influscope report runs/demo --out runs/demo/studies.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from influscope.cli.options import non_negative_int

NAME = "report"
HELP = "Render a run directory (scores + studies) into one self-contained HTML file."

console = Console(stderr=True)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``report`` on ``sub`` (the main parser's sub-parsers)."""
    report = sub.add_parser(
        NAME,
        help=HELP,
        description="Render a run directory into one self-contained HTML file: the stored "
        "scores stage (top proponents and opponents of each query, their tokens coloured by "
        "influence) and the studies run beside it (influence distribution and its power-law "
        "fit, layers, probes). Reads only stored stages: nothing is recomputed.",
    )
    report.add_argument("run", help="Run directory holding scores/<name> (from score or demo).")
    report.add_argument("--scores", default="scores", help="Name of the scores stage.")
    report.add_argument("--factors", default="factors", help="Name of the factors stage.")
    report.add_argument(
        "--train",
        default=None,
        help="Training records that were scored (default: RUN/data.json or RUN/model/corpus.json).",
    )
    report.add_argument("--queries", default=None, help="Query records that were scored.")
    report.add_argument(
        "--model",
        default=None,
        help="Model for per-token colouring: a Hugging Face model directory or a .gguf file, "
        "as given to fit and score (default: RUN/model if present; 'none' to skip).",
    )
    report.add_argument(
        "--top-k", type=non_negative_int, default=5, help="Proponents/opponents per query."
    )
    report.add_argument(
        "--bootstrap",
        type=int,
        default=100,
        help="Bootstrap sets of the power-law goodness-of-fit test (0 skips it).",
    )
    report.add_argument("--out", default=None, help="HTML file (default: RUN/studies.html).")
    report.set_defaults(func=run)
    return report


def run(args: argparse.Namespace) -> int:
    """Run ``influscope report``: the studies of a stored run, as one page."""
    from influscope.analysis.runs import StudyConfig, report_run
    from influscope.analysis.sparsity import SparsityConfig
    from influscope.cli.options import check_writable
    from influscope.report import write_report

    out = Path(args.out or Path(args.run) / "studies.html")
    check_writable(out.parent, "directory of the report")  # before the studies run
    config = StudyConfig(sparsity=SparsityConfig(n_bootstrap=args.bootstrap), top_k=args.top_k)
    view, studies = report_run(
        args.run,
        scores_name=args.scores,
        factors_name=args.factors,
        train=args.train,
        queries=args.queries,
        model=args.model,
        config=config,
    )
    path = write_report(view, out)
    console.print(f"studies: {', '.join(studies)}; report → {path}")
    return 0
