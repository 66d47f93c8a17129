"""``influscope curate``: rank training data by total influence on a benchmark; list the harmful k %.

::

    influscope curate MODEL_DIR --train train.jsonl --benchmark bench.jsonl --fraction 0.1 \\
        --out curate.json [--run runs/x] [--relatif] [--kept kept.jsonl]

The total influence ``T(z) = Σ_q I_q(z)`` of every training sequence on the benchmark queries is
computed with EK-FAC (:func:`influscope.applications.curation.rank_by_influence`); the
``round(fraction · N)`` sequences with the most negative ``T`` are the harmful ones. ``curate.json``
holds every sequence's total, the harmful indices and the command's settings; ``--kept`` writes
the training records without the harmful ones (ready to retrain on).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from influscope.cli.options import (
    add_batch_size_option,
    add_curvature_option,
    add_damping_options,
    add_device_option,
    add_model_argument,
    add_modules_option,
    add_truncate_option,
    check_writable,
    damping_kwargs,
    encode_records,
)
from influscope.errors import DataError

NAME = "curate"
HELP = "Rank training data by total influence on a benchmark; list the harmful k %%."


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``curate`` on ``sub`` (the main parser's sub-parsers)."""
    p = sub.add_parser(
        NAME,
        help=HELP,
        description=__doc__.split("\n")[0].replace("``", ""),
    )
    add_model_argument(p, positional=True)
    p.add_argument("--train", required=True, help="Training records (.jsonl/.json/.txt/HF dir).")
    p.add_argument(
        "--benchmark",
        required=True,
        help="Benchmark records (`prompt` + `completion`, or `text`) whose measurement curation "
        "should raise.",
    )
    p.add_argument(
        "--fraction", type=float, default=0.1, help="Share of training data to flag (0–1)."
    )
    p.add_argument("--out", required=True, help="JSON file with the totals and harmful indices.")
    p.add_argument("--kept", default=None, help="Also write the records that are kept here.")
    p.add_argument(
        "--relatif",
        action="store_true",
        help="Normalise each score by sqrt(self-influence) before summing (RelatIF): finds "
        "individually harmful sequences rather than high-loss ones (docs/applications.md).",
    )
    add_modules_option(p, default="mlp", nargs=None, help="Modules to track (preset or regex).")
    add_curvature_option(p, help="Curvature of the influence scores (default: ekfac).")
    p.add_argument("--run", default=None, help="Run directory to store / reuse fitted factors.")
    add_batch_size_option(p)
    add_damping_options(p)
    add_truncate_option(p)
    add_device_option(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``influscope curate``."""
    from rich.console import Console

    from influscope.analyzer import Influence
    from influscope.applications.curation import harmful_subset, rank_by_influence
    from influscope.config import FitConfig, ScoreConfig
    from influscope.loading import load_model, load_records
    from influscope.storage import atomic_write_json
    from influscope.storage.atomic import atomic_write_text

    if not 0 < args.fraction < 1:
        raise DataError(
            f"--fraction must be between 0 and 1 (exclusive), received {args.fraction}."
        )
    console = Console(stderr=True)
    # data files and the output's directory are checked before the model is loaded
    records, bench_records = load_records(args.train), load_records(args.benchmark)
    check_writable(Path(args.out).parent, "directory of --out")
    model, tokenizer = load_model(args.model)
    inf = Influence(
        model, "causal_lm", modules=args.modules, run_dir=args.run, tokenizer=tokenizer,
        device=args.device,
    )  # fmt: skip
    train = encode_records(inf, records, args.train, args.truncate)
    bench = encode_records(inf, bench_records, args.benchmark, args.truncate)
    fit = FitConfig(curvature=args.curvature, batch_size=args.batch_size, **damping_kwargs(args))
    factors = inf.fit(train, fit)
    score = ScoreConfig(
        query_rank=None,
        batch_size=args.batch_size,
        normalize="relatif" if args.relatif else None,
    )
    ranking = rank_by_influence(
        inf.tracked.model,
        inf.tracked.task,
        train,
        bench,
        factors=factors,
        modules=args.modules,
        score_config=score,
    )
    harmful = harmful_subset(ranking.total, args.fraction)
    report = {
        "model": str(args.model),
        "train": str(args.train),
        "benchmark": str(args.benchmark),
        "fraction": args.fraction,
        "relatif": args.relatif,
        "curvature": args.curvature,
        "harmful": harmful,
        "order": ranking.order,
        "total": ranking.total.tolist(),
    }
    atomic_write_json(Path(args.out), report)
    if args.kept:
        drop = set(harmful)
        lines = [json.dumps(r) for i, r in enumerate(records) if i not in drop]
        atomic_write_text(Path(args.kept), "\n".join(lines) + "\n")
    worst = ranking.order[:5]
    console.print(
        f"[green]curated[/green] {len(train)} sequences against {len(bench)} benchmark queries: "
        f"{len(harmful)} flagged as harmful (most harmful: {worst}); wrote {args.out}"
    )
    return 0
