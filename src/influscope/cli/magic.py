"""``influscope magic``: exact metagradients (MAGIC) of a deterministic fine-tune.

Fine-tunes the model on ``--train`` with a fixed recipe (seeded data order, no dropout) and
differentiates each query's ``log p(completion | prompt)`` after training with respect to each
training example's weight, through every optimizer step (:mod:`influscope.metagrad`). Writes
``RUN/magic/NAME`` (the ``(Q, N)`` scores, resumable), ``RUN/NAME.json`` (top-k per query) and
prints a one-screen summary.

Example::

    influscope magic --model runs/demo/model --train train.jsonl --queries q.jsonl \\
        --run runs/x --epochs 1 --lr 1e-4 --train-batch-size 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from influscope.cli.options import (
    add_device_option,
    add_model_argument,
    add_recipe_options,
    add_task_option,
    add_truncate_option,
    non_negative_int,
    recipe_parameters,
)

NAME = "magic"
HELP = "Exact metagradients (MAGIC) of a deterministic fine-tune."

console = Console(stderr=True)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``magic`` on ``sub`` (the main parser's sub-parsers)."""
    p = sub.add_parser(
        NAME,
        help=HELP,
        description="MAGIC (Ilyas & Engstrom 2025): d f_q(θ_T) / d w_i, the exact derivative "
        "of each query's log p(completion | prompt) after a deterministic fine-tune on --train "
        "with respect to each training example's weight (positive = up-weighting it helps the "
        "query; N × this is on the influence scale), by reverse-mode differentiation through "
        "every optimizer step with REPLAY checkpointing. Writes RUN/magic/NAME and "
        "RUN/NAME.json (top-k).",
    )
    add_model_argument(p)
    p.add_argument(
        "--adapter",
        default=None,
        help="PEFT (LoRA) adapter directory applied on top of --model; the fine-tune then "
        "trains the adapter matrices (see --parameters).",
    )
    p.add_argument(
        "--train",
        required=True,
        help="Training records of the fine-tune: .jsonl/.json with 'text' (or "
        "'prompt'+'completion'), a .txt file, or a saved HF dataset dir.",
    )
    p.add_argument(
        "--queries",
        required=True,
        help="Query records (.jsonl with 'prompt'+'completion', or 'text').",
    )
    p.add_argument("--run", required=True, help="Run directory where the scores are stored.")
    p.add_argument("--name", default="magic", help="Name of the stored stage (default: magic).")
    add_task_option(p)
    add_truncate_option(p)
    add_device_option(p)
    add_recipe_options(p, old_names=True)  # --epochs --lr --train-batch-size … --parameters
    p.add_argument(
        "--replay-every",
        type=int,
        default=None,
        help="REPLAY checkpoint interval k in steps (default: ⌈√T⌉, the least memory); the "
        "scores do not depend on it.",
    )
    p.add_argument(
        "--query-batch",
        type=int,
        default=None,
        help="Queries carried through one replay (default: all; fewer = less memory, more "
        "replays).",
    )
    p.add_argument(
        "--memory-mb",
        type=float,
        default=4096.0,
        help="Budget in MiB for REPLAY's checkpoints, segment states and adjoints; a run "
        "needing more is refused before it starts.",
    )
    p.add_argument(
        "--top-k",
        type=non_negative_int,
        default=5,
        help="Proponents/opponents per query in RUN/NAME.json and the summary (default: 5).",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Recompute a stored stage even if it exists (else it is reused when it "
        "matches, refused when model/data/config differ).",
    )
    p.set_defaults(func=run, modules=None)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``influscope magic``: fine-tune, reverse pass, write the top-k, print a summary."""
    from influscope.cli.options import load_influence, recipe_from_args
    from influscope.engine.distributed import is_writer
    from influscope.loading import load_records
    from influscope.metagrad import MagicConfig
    from influscope.storage import atomic_write_json

    config = MagicConfig(
        recipe=recipe_from_args(args),
        replay_every=args.replay_every,
        query_batch=args.query_batch,
        memory_mb=args.memory_mb,
    )  # validated before the model loads
    inf, train = load_influence(args)
    queries = inf.encode(load_records(args.queries), truncate=args.truncate)
    start = time.perf_counter()
    scores = inf.magic(queries, train, config, name=args.name, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    records, query_records = train.records, queries.records
    out = []
    for q in range(len(queries)):
        out.append(
            {
                **{k: query_records[q].get(k) for k in ("prompt", "completion", "text")},
                "measurement": float(scores.measurements[q]),
                "proponents": [_row(i, s) for i, s in scores.top(q, args.top_k)],
                "opponents": [_row(i, s) for i, s in scores.top(q, args.top_k, opponents=True)],
            }
        )
    json_path = Path(args.run) / f"{args.name}.json"
    if not is_writer():  # with a process group every rank holds the scores; rank 0 writes
        return 0
    atomic_write_json(json_path, {"config": config.to_dict(), "seconds": seconds, "queries": out})
    steps = config.recipe.steps(len(train))
    _summary(Console(), args, scores, records, query_records, steps, config.interval(steps))
    console.print(
        f"top-{args.top_k} → {json_path}; scores → {Path(args.run) / 'magic' / args.name}"
    )
    return 0


def _row(index: int, score: float) -> dict:
    return {"index": index, "score": score}


def _snippet(record: dict, width: int = 60) -> str:
    text = record.get("text") or (record.get("prompt", "") + record.get("completion", ""))
    text = str(text).replace("\n", " ⏎ ").strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def _summary(out: Console, args, scores, records, query_records, steps: int, k: int) -> None:
    """One screen: the run's settings, then each query's top proponents."""
    over = Table(title=f"influscope magic — {args.run}", show_header=False, box=None)
    for key, value in {
        "model": str(args.model) + (f" + adapter {args.adapter}" if args.adapter else ""),
        "fine-tune": f"{args.optimizer}, lr {args.lr:g} ({args.schedule}), {args.epochs} "
        f"epoch(s), batch {args.train_batch_size}, seed {args.train_seed}, weight decay "
        f"{args.weight_decay:g}",
        "trained parameters": f"{len(scores.layer_names)} tensors ({recipe_parameters(args)})",
        "steps T / replay k": f"{steps} / {k}",
        "training sequences": str(len(records)),
        "queries": str(len(query_records)),
    }.items():
        over.add_row(f"[bold]{escape(key)}[/bold]", escape(value))
    out.print(over)
    table = Table(title="Top proponents (d f / d w_i; positive = up-weighting helps the query)")
    table.add_column("query", overflow="fold", max_width=40)
    table.add_column("rank", justify="right")
    table.add_column("train #", justify="right")
    table.add_column("metagradient", justify="right")
    table.add_column("training sequence", overflow="fold")
    for q, rec in enumerate(query_records[:8]):
        label = escape(_snippet(rec, 40))
        for r, (i, s) in enumerate(scores.top(q, min(3, args.top_k))):
            table.add_row(
                label if r == 0 else "",
                str(r + 1),
                str(i),
                f"{s:+.3g}",
                escape(_snippet(records[i])),
            )
        table.add_section()
    out.print(table)
