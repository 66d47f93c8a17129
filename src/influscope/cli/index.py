"""``influscope index`` and ``influscope query``: build a projected gradient index once, then
answer new queries from it (optionally BM25-filtered and EK-FAC re-scored).

Examples::

    influscope index --model runs/demo/model --train train.jsonl --run runs/x --dtype float16
    influscope index ... --dry-run          # estimated memory and disk, nothing runs
    influscope query --model runs/demo/model --train train.jsonl --queries q.jsonl --run runs/x \\
        --bm25 10000 --top-k 10 --rescore --factors factors
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from influscope.cli_options import non_negative_int
from influscope.projection.projector import INITS

console = Console(stderr=True)


def add_parsers(sub, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the ``index`` and ``query`` subcommands to the main parser's subparsers."""
    index = sub.add_parser("index", help="Write projected training gradients to an index.")
    common(index)
    index.add_argument("--name", default="index", help="Name of the index (RUN/index/<name>).")
    index.add_argument("--k-in", type=int, default=64, help="Input projection rows per layer.")
    index.add_argument("--k-out", type=int, default=64, help="Output projection rows per layer.")
    index.add_argument(
        "--init",
        default="orthogonal",
        choices=list(INITS),
        help="LoGra projection (orthogonal, gaussian, pca), or 'eigen': the EK-FAC "
        "eigen-coordinates with most preconditioned mass, same size (docs/scale.md).",
    )
    index.add_argument(
        "--factors",
        default="factors",
        help="Factors stage used by --init pca/eigen (K-FAC/EK-FAC; eigen keeps its damping).",
    )
    index.add_argument(
        "--curvature", default="ekfac", choices=["ekfac", "identity"], help="Projected curvature."
    )
    index.add_argument(
        "--fisher",
        default="true",
        choices=["true", "empirical"],
        help="Labels of the projected curvature: sampled from the model (default) or the data.",
    )
    index.add_argument(
        "--dtype", default="float16", choices=["float32", "float16", "bfloat16"], help="Storage."
    )
    index.add_argument("--batch-size", type=int, default=8, help="Sequences per pass.")
    index.add_argument("--shard-size", type=int, default=1024, help="Sequences per shard.")
    index.add_argument("--seed", type=int, default=0, help="Seed of projections and labels.")
    index.add_argument(
        "--cache-mb",
        type=float,
        default=2048.0,
        help="MiB for replaying the projected curvature's first pass (0: off; same results).",
    )
    index.add_argument(
        "--dry-run", action="store_true", help="Print estimated memory and disk, then stop."
    )

    query = sub.add_parser("query", help="Score new queries against a stored index.")
    common(query)
    query.add_argument("--queries", required=True, help="Query records (.jsonl).")
    query.add_argument("--index", default="index", help="Name of the index.")
    query.add_argument(
        "--top-k", type=non_negative_int, default=10, help="Training sequences per query."
    )
    query.add_argument(
        "--bm25", type=int, default=0, help="Keep the BM25 top K candidates first (0: off)."
    )
    query.add_argument(
        "--index-k", type=int, default=100, help="Candidates the index passes to --rescore."
    )
    query.add_argument(
        "--rescore", action="store_true", help="Re-score the index's candidates with EK-FAC."
    )
    query.add_argument("--factors", default="factors", help="Factors stage for --rescore.")
    query.add_argument(
        "--damping",
        type=float,
        default=None,
        help="Score-time absolute damping for --rescore (re-damps the fitted factors).",
    )
    query.add_argument(
        "--damping-factor",
        type=float,
        default=None,
        help="Score-time damping for --rescore = factor × mean eigenvalue per layer.",
    )
    query.add_argument("--batch-size", type=int, default=8, help="Sequences per pass.")
    query.add_argument("--out", default=None, help="JSON output (default: RUN/<index>-query.json).")


def _text(record: dict) -> str:
    """A record's text; prompt and completion joined by one space unless one already has it."""
    if "text" in record:
        return str(record["text"])
    prompt, completion = str(record.get("prompt", "")), str(record.get("completion", ""))
    gap = "" if prompt[-1:].isspace() or completion[:1].isspace() else " "
    return f"{prompt}{gap}{completion}".strip()


def cmd_index(args) -> int:
    from influscope.cli_options import load_influence
    from influscope.index import IndexConfig
    from influscope.resources import describe, estimate

    inf, train = load_influence(args)
    config = IndexConfig(
        k_in=args.k_in,
        k_out=args.k_out,
        init=args.init,
        seed=args.seed,
        curvature=args.curvature,
        fisher=args.fisher,
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        cache_mb=args.cache_mb,
    )
    if args.dry_run:
        console.print(describe(estimate(inf, train, index=config)))
        return 0
    factors = inf.load_factors(train, args.factors) if args.init in ("pca", "eigen") else None
    index = inf.build_index(train, config, factors, name=args.name, overwrite=args.overwrite)
    root = index.root
    size = sum(p.stat().st_size for p in (root / "shards").glob("*.npy"))
    console.print(
        f"[green]indexed[/green] {index.n_rows} sequences × {index.meta['dim']} projected "
        f"dims ({config.dtype}, {size / 2**20:.1f} MiB in {len(index.meta['shards'])} shards) "
        f"→ {root}"
    )
    return 0


def cmd_query(args) -> int:
    from influscope.cli_options import load_influence
    from influscope.index import GradientIndex
    from influscope.index.retrieve import retrieve
    from influscope.loading import load_records
    from influscope.storage import atomic_write_json

    inf, train = load_influence(args)
    records = load_records(args.queries)
    queries = inf.encode(records, truncate=args.truncate)
    index = GradientIndex(inf.run.root / "index" / args.index)
    factors = inf.load_factors(train, args.factors) if args.rescore else None
    if factors is not None:
        from influscope.config import ScoreConfig
        from influscope.scoring.damping import score_damping

        override = ScoreConfig(damping=args.damping, damping_factor=args.damping_factor)
        factors = score_damping(factors, override)
    use_bm25 = args.bm25 > 0
    result = retrieve(
        inf,
        queries,
        train,
        query_texts=[_text(r) for r in records] if use_bm25 else None,
        train_texts=[_text(r) for r in train.records] if use_bm25 else None,
        bm25_k=args.bm25 if use_bm25 else None,
        index=index,
        index_k=args.index_k,
        factors=factors,
        top_k=args.top_k,
        batch_size=args.batch_size,
    )
    out = Path(args.out or inf.run.root / f"{args.index}-query.json")
    payload = {
        "stage": result.stage,
        "candidates": result.candidates,
        "queries": [
            {
                "query": _text(rec),
                "top": [
                    {"index": int(train.indices[m]), "score": s, "text": _text(train.records[m])}
                    for m, s in zip(idx, sc)
                ],
            }
            for rec, idx, sc in zip(records, result.indices, result.scores)
        ],
    }
    atomic_write_json(out, payload)
    for q in payload["queries"]:
        console.print(f"[bold]{q['query'][:80]}[/bold]")
        for hit in q["top"][:5]:
            console.print(f"  {hit['score']:+.4g}  #{hit['index']}  {hit['text'][:70]}")
    console.print(f"{result.stage} ranking → {out}")
    return 0


#: Handlers by subcommand name, merged into :func:`influscope.cli.main`'s table.
COMMANDS = {"index": cmd_index, "query": cmd_query}
