"""``influscope query``: answer new queries from a stored gradient index (``influscope index``),
optionally BM25-filtered first and EK-FAC re-scored.

Example::

    influscope query --model runs/demo/model --train train.jsonl --queries q.jsonl --run runs/x \\
        --bm25 10000 --top-k 10 --rescore --factors factors
    influscope query ... --ann faiss-ivf --ann-k 1000 --top-k 10   # FAISS candidates (`influscope ann`)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from influscope.cli.options import (
    add_run_options,
    check_writable,
    encode_records,
    load_influence,
    non_negative_int,
)

NAME = "query"
HELP = "Score new queries against a stored index."

console = Console(stderr=True)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``query`` on ``sub`` (the main parser's sub-parsers)."""
    query = sub.add_parser(
        NAME,
        help=HELP,
        description="Answer new queries from a gradient index written by `influscope index`: "
        "the top training sequences of each query by projected influence, optionally after a "
        "BM25 text filter (--bm25) and re-scored with the full EK-FAC factors (--rescore). "
        "Writes RUN/<index>-query.json (or --out).",
    )
    add_run_options(query)
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
        "--ann",
        default=None,
        help="ANN index under the index's ann/ (`influscope ann`) whose candidates the index "
        "re-ranks exactly (default: none, the exact scan).",
    )
    query.add_argument(
        "--ann-k", type=int, default=1000, help="Candidates the --ann index passes on (1000)."
    )
    query.add_argument(
        "--nprobe", type=int, default=None, help="IVF lists scanned by --ann (default: its own)."
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
    query.set_defaults(func=run)
    return query


def _text(record: dict) -> str:
    """A record's text; prompt and completion joined by one space unless one already has it."""
    if "text" in record:
        return str(record["text"])
    from influscope.tasks.chat import display_texts, is_conversational

    if is_conversational(record):  # chat turns as "role: content" lines
        return "".join(display_texts(record)).strip()
    prompt, completion = str(record.get("prompt", "")), str(record.get("completion", ""))
    gap = "" if prompt[-1:].isspace() or completion[:1].isspace() else " "
    return f"{prompt}{gap}{completion}".strip()


def run(args: argparse.Namespace) -> int:
    """Run ``influscope query``: candidates from BM25 and the index, optionally re-scored."""
    from influscope.index import GradientIndex
    from influscope.index.retrieve import retrieve
    from influscope.loading import load_records
    from influscope.storage import atomic_write_json

    records = load_records(args.queries)  # data and outputs are checked before the model loads
    if args.out:
        check_writable(Path(args.out).parent, "directory of --out")
    inf, train = load_influence(args)
    queries = encode_records(inf, records, args.queries, args.truncate)
    index = GradientIndex(inf.run.root / "index" / args.index)
    ann = None
    if args.ann is not None:
        from influscope.index.ann import open_ann

        ann = open_ann(index, args.ann, nprobe=args.nprobe)  # refused if built for another index
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
        ann=ann,
        ann_k=args.ann_k,
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
