"""``influscope damping``: score at many dampings from one fit and recommend one.

Example::

    influscope damping --model runs/demo/model --train train.jsonl --queries q.jsonl \\
        --run runs/demo --values 1e-8 1e-6 1e-4 --relative 1e-3 0.1 --check-file check.json

``--check-file`` is JSON with any of ``"pairs"`` (``[[query, training position], ...]``,
self-consistency), ``"check"`` (per query, the training positions that should rank top) and
``"lds"`` (``{"masks": (m, N), "measured": (m, Q)}`` from retrained subsets).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from influscope.cli.options import (
    add_batch_size_option,
    add_run_options,
    check_writable,
    encode_records,
    load_influence,
)

NAME = "damping"
HELP = "Score at many dampings from one fit (one training pass) and recommend one."


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``damping`` on ``sub`` (the main parser's sub-parsers)."""
    p = sub.add_parser(
        NAME,
        help=HELP,
        description="Re-damp the fitted factors at every λ (absolute and/or relative × mean "
        "eigenvalue per layer), score the queries at all of them in one pass over the "
        "training data, and compare them against the default (relative 0.1).",
    )
    add_run_options(p)
    p.add_argument("--queries", required=True, help="Query records (.jsonl).")
    p.add_argument("--factors", default="factors", help="Name of the fitted factors stage.")
    p.add_argument(
        "--values", type=float, nargs="*", default=None, help="Absolute λ values to try."
    )
    p.add_argument(
        "--relative", type=float, nargs="*", default=None, help="Relative factors to try."
    )
    p.add_argument("--check-file", default=None, help="JSON with pairs / check / lds.")
    p.add_argument("--rank", type=int, default=32, help="Query rank (0 = full).")
    p.add_argument("--top-k", type=int, default=10, help="k of top-k overlap and recall.")
    p.add_argument("--out", default=None, help="JSON result (default: RUN/damping.json).")
    p.add_argument(
        "--html",
        default=None,
        help="HTML page with the plot and table (default: beside the JSON, damping.html).",
    )
    add_batch_size_option(p)
    p.set_defaults(func=run)
    return p


def sweep_table(sweep) -> Table:
    """A rich table with one row per damping."""
    t = Table(title=f"damping sweep (top-{sweep.k}; reference relative 0.1)")
    for col in ("damping", "λ range", "ρ vs ref", f"top-{sweep.k} ∩ ref"):
        t.add_column(col)
    extra = [
        (name, attr)
        for name, attr in (
            ("self top-1", "self_top1"),
            ("self mean rank", "self_mean_rank"),
            ("check top-1", "check_top1"),
            (f"recall@{sweep.k}", "check_recall"),
            ("LDS", "lds"),
        )
        if getattr(sweep.rows[0], attr) is not None
    ]
    for name, _ in extra:
        t.add_column(name)
    for i, r in enumerate(sweep.rows):
        lam = list(r.setting.per_layer.values())
        mark = " ★" if i == sweep.best else (" (ref)" if i == sweep.reference else "")
        t.add_row(
            r.setting.label + mark,
            f"{min(lam):.2g} … {max(lam):.2g}",
            f"{r.spearman_vs_reference:.3f}",
            f"{r.overlap_vs_reference:.3f}",
            *(f"{getattr(r, a):.3f}" for _, a in extra),
        )
    return t


def run(args: argparse.Namespace) -> int:
    """Run ``influscope damping``: the sweep, its table, JSON and HTML page."""
    from influscope.config import ScoreConfig
    from influscope.loading import load_records
    from influscope.storage import atomic_write_json

    records = load_records(args.queries)  # data and outputs are checked before the model loads
    if args.out:
        check_writable(Path(args.out).parent, "directory of --out")
    inf, train = load_influence(args)
    queries = encode_records(inf, records, args.queries, args.truncate)
    op = inf.load_factors(train, args.factors)
    crit = json.loads(Path(args.check_file).read_text()) if args.check_file else {}
    lds = crit.get("lds")
    sweep = inf.damping_sweep(
        queries,
        train,
        op,
        values=args.values,
        relative=args.relative,
        config=ScoreConfig(query_rank=args.rank or None, batch_size=args.batch_size),
        k=args.top_k,
        pairs=[tuple(p) for p in crit["pairs"]] if "pairs" in crit else None,
        check=crit.get("check"),
        lds=(lds["masks"], lds["measured"]) if lds else None,
    )
    out = Console()
    out.print(sweep_table(sweep))
    if sweep.recommended is not None:
        out.print(f"recommended by {sweep.criterion}: {sweep.recommended.label}")
    else:
        out.print("no criterion given (--check-file): compare against the reference only")
    path = Path(args.out or Path(args.run) / "damping.json")
    atomic_write_json(path, sweep.to_dict())
    from influscope.report.damping import write_damping_report

    page = write_damping_report(sweep, args.html or path.with_suffix(".html"))
    Console(stderr=True).print(f"sweep → {path}, plot and table → {page}")
    return 0
