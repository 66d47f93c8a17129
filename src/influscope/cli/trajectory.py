"""``influscope trajectory``: SOURCE or TracIn-CP over a Trainer ``output_dir``'s checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from influscope.cli.options import (
    add_batch_size_option,
    add_damping_options,
    add_model_options,
    check_writable,
    damping_kwargs,
    data_file,
    resolve_modules,
)

NAME = "trajectory"
HELP = "SOURCE / TracIn-CP over a run's checkpoints (models that have not converged)."

console = Console(stderr=True)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``trajectory`` on ``sub`` (the main parser's sub-parsers)."""
    p = sub.add_parser(
        NAME,
        help=HELP,
        description="Scores of every training sequence on every query from the checkpoints "
        "of one run (a Hugging Face Trainer output_dir with checkpoint-<step>/ folders): "
        "SOURCE (per-segment EK-FAC, Bae et al. 2024) or TracIn-CP. Positive = up-weighting "
        "the sequence raises log p(completion | prompt) at the final checkpoint. Writes a JSON "
        "file with the (Q, N) scores.",
    )
    p.add_argument("--checkpoints", required=True, help="Directory of checkpoint-<step>/ folders.")
    p.add_argument("--train", required=True, help="Training records (.jsonl with 'text').")
    p.add_argument("--queries", required=True, help="Query records ('prompt'+'completion').")
    p.add_argument(
        "--method",
        default="source",
        choices=["source", "tracin"],
        help="source: SOURCE over per-segment EK-FAC (default); tracin: TracIn-CP over the checkpoints.",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="Learning rate (default: trainer_state.json)."
    )
    p.add_argument("--segments", type=int, default=None, help="SOURCE segments (default: all).")
    p.add_argument("--lr-scale", type=float, default=1.0, help="SOURCE: multiplies every η̄K.")
    p.add_argument("--stationary", action="store_true", help="SOURCE with η̄K = ∞.")
    p.add_argument("--out", required=True, help="JSON file for the scores.")
    add_damping_options(p, "each segment's EK-FAC (SOURCE)")
    add_model_options(p)  # --task --modules --truncate --device
    add_batch_size_option(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``influscope trajectory``: SOURCE or TracIn-CP scores, written as JSON."""
    from transformers import AutoTokenizer

    from influscope.config import FitConfig
    from influscope.loading import load_records
    from influscope.tasks import context_length, get_task
    from influscope.tasks.base import quiet_length_warning
    from influscope.trajectory import from_directory, source_scores, tracin_scores

    # data files and the output's directory are checked before any checkpoint is loaded
    train_records, query_records = load_records(args.train), load_records(args.queries)
    check_writable(Path(args.out).parent, "directory of --out")
    traj = from_directory(args.checkpoints, lr=args.lr)
    last = Path(args.checkpoints) / traj[-1].name
    tokenizer = AutoTokenizer.from_pretrained(last)
    model = traj[-1].load()
    task = get_task(args.task)
    limit = context_length(model)
    with quiet_length_warning(tokenizer, args.truncate):
        with data_file(args.train):
            train = task.encode(train_records, tokenizer, limit, args.truncate)
        with data_file(args.queries):
            queries = task.encode(query_records, tokenizer, limit, args.truncate)
    modules = resolve_modules(args.modules, model)
    common = {"batch_size": args.batch_size, "device": args.device}
    if args.method == "tracin":
        scores = tracin_scores(traj, task, modules, train, queries, **common)
    else:
        scores = source_scores(
            traj,
            task,
            modules,
            train,
            queries,
            FitConfig(**damping_kwargs(args)),
            segments=args.segments,
            stationary=args.stationary,
            lr_scale=args.lr_scale,
            **common,
        )
    out = {
        "method": args.method,
        "checkpoints": [{"name": c.name, "step": c.step, "lr": c.lr} for c in traj],
        "scores": scores.pairwise.double().cpu().tolist(),
    }
    from influscope.storage.atomic import atomic_write_text

    atomic_write_text(args.out, json.dumps(out))  # a killed run leaves no partial file
    console.print(f"{args.method} over {len(traj)} checkpoints → {args.out}")
    return 0
