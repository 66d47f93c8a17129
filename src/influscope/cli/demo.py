"""``influscope demo``: train a tiny GPT-2 on Shakespeare + planted facts, attribute them.

Example::

    influscope demo --out runs/demo
"""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "Train a tiny GPT-2 on Shakespeare + planted facts, attribute them end to end."


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``demo`` on ``sub`` (the main parser's sub-parsers)."""
    demo = sub.add_parser(
        NAME,
        help=HELP,
        description="Train a tiny GPT-2 on public-domain Shakespeare mixed with planted facts, "
        "fit EK-FAC and attribute the facts: OUT/report.html and OUT/summary.json.",
    )
    demo.add_argument(
        "--assets", default=".cache/assets", help="Asset cache (filled by `make assets`)."
    )
    demo.add_argument("--out", default="runs/demo", help="Output directory.")
    demo.add_argument("--seed", type=int, default=0, help="Seed of the corpus and training.")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the figure is identical across machines with the "
        "same package versions; "
        "0: torch default, faster on many cores but not reproducible across them).",
    )
    demo.set_defaults(func=run)
    return demo


def run(args: argparse.Namespace) -> int:
    """Run ``influscope demo``."""
    from influscope.cli.options import check_writable
    from influscope.demo.pipeline import run_demo

    check_writable(args.out, "output directory")  # before the corpus is built and trained on
    run_demo(assets=args.assets, out=args.out, seed=args.seed, threads=args.threads or None)
    return 0
