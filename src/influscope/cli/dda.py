"""``influscope dda``: fitting-error-corrected influence (DDA debias/denoise, RelatIF).

Examples::

    influscope dda --model runs/ft/model --base-model runs/base/model \\
        --checkpoints runs/ft/epoch-1 runs/ft/epoch-2 \\
        --train finetune.jsonl --queries outputs.jsonl --run runs/dda
    influscope dda --model M --base-model B --train T --queries Q --run R --variants debias

Writes ``RUN/<name>/scores.safetensors`` + ``meta.json`` (every variant and every model's own
scores) and ``RUN/<name>.json`` (the top training sequences of each query under each variant).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from influscope.cli.options import (
    LazyChoices,
    add_batch_size_option,
    add_curvature_option,
    add_damping_options,
    add_run_options,
    check_writable,
    damping_kwargs,
    data_file,
    non_negative_int,
    resolve_modules,
    task_from_args,
)

NAME = "dda"
HELP = (
    "Influence corrected for fitting error: debias (minus the base model's), denoise "
    "(smoothed over fine-tuning checkpoints), DDA (both), RelatIF."
)

console = Console(stderr=True)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``dda`` on ``sub`` (the main parser's sub-parsers)."""
    p = sub.add_parser(
        NAME,
        help=HELP,
        description="Influence corrected for the fitting error of a fine-tuned model: debias "
        "subtracts the base model's scores, denoise smooths the scores over the fine-tuning "
        "checkpoints, DDA does both, RelatIF divides by sqrt(self-influence). Fits and scores "
        "every model given, then writes RUN/NAME/scores.safetensors (every variant) and "
        "RUN/NAME.json (the top training sequences of each query under each variant).",
    )
    add_run_options(p)
    p.add_argument("--queries", required=True, help="Query records (.jsonl, prompt+completion).")
    p.add_argument("--base-model", default=None, help="The model before fine-tuning (debias, dda).")
    p.add_argument(
        "--checkpoints",
        nargs="+",
        default=[],
        help="Intermediate fine-tuning checkpoints, oldest first (denoise, dda); --model is "
        "appended as the last one.",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=LazyChoices("influscope.corrections.dda", "CORRECTIONS"),
        help="Variants to compute (default: every one the given models allow).",
    )
    p.add_argument(
        "--smoothing",
        default="mean",
        choices=LazyChoices("influscope.corrections.dda", "SMOOTHINGS"),
        help="How denoise combines checkpoints: mean of scores (default) or of per-query z-scores.",
    )
    add_curvature_option(p, help="Curvature fitted at every model (default: ekfac).")
    p.add_argument("--rank", type=int, default=32, help="Query rank (0 = full).")
    add_batch_size_option(p)
    p.add_argument(
        "--top-k", type=non_negative_int, default=5, help="Training sequences listed per query."
    )
    p.add_argument("--name", default="dda", help="Output name under the run directory.")
    add_damping_options(p)
    p.set_defaults(func=run)
    return p


def default_variants(has_base: bool, has_checkpoints: bool) -> tuple[str, ...]:
    """Every variant whose inputs are available."""
    out = ["plain", "relatif"]
    if has_base:
        out.append("debias")
    if has_checkpoints:
        out.append("denoise")
    if has_base and has_checkpoints:
        out.append("dda")
    return tuple(out)


def run(args: argparse.Namespace) -> int:
    """Run ``influscope dda``: fit and score every model, combine them into the variants."""
    from influscope.config import FitConfig, ScoreConfig
    from influscope.corrections.config import CorrectionConfig
    from influscope.corrections.run import run_corrections
    from influscope.errors import DataError
    from influscope.loading import load_model, load_records
    from influscope.storage import atomic_write_json
    from influscope.tasks import context_length, get_task
    from influscope.tasks.base import quiet_length_warning

    # data files and the run directory are checked before the model is loaded
    train_records, query_records = load_records(args.train), load_records(args.queries)
    check_writable(args.run)
    model, tokenizer = load_model(args.model, args.task, adapter=args.adapter)
    task = get_task(task_from_args(args))
    limit = context_length(model)
    with quiet_length_warning(tokenizer, args.truncate):
        with data_file(args.train):
            train = task.encode(train_records, tokenizer, limit, args.truncate)
        with data_file(args.queries):
            queries = task.encode(query_records, tokenizer, limit, args.truncate)

    def other(path: str):
        m, _ = load_model(path, args.task)
        if m.get_input_embeddings().weight.shape != model.get_input_embeddings().weight.shape:
            raise DataError(
                f"{path} has input embeddings {tuple(m.get_input_embeddings().weight.shape)}, "
                f"--model has {tuple(model.get_input_embeddings().weight.shape)}: the base model "
                "and checkpoints must share the fine-tuned model's tokenizer."
            )
        return m

    base = other(args.base_model) if args.base_model else None
    checkpoints = [other(p) for p in args.checkpoints]
    variants = args.variants or default_variants(base is not None, bool(checkpoints))
    config = CorrectionConfig(variants=tuple(variants), smoothing=args.smoothing)
    modules = resolve_modules(args.modules, model)
    result = run_corrections(
        model,
        task,
        train,
        queries,
        base=base,
        checkpoints=checkpoints,
        config=config,
        fit_config=FitConfig(
            curvature=args.curvature, batch_size=args.batch_size, **damping_kwargs(args)
        ),
        score_config=ScoreConfig(query_rank=args.rank or None, batch_size=args.batch_size),
        modules=modules,
        run_dir=Path(args.run) / "models",
        device=args.device,
        overwrite=args.overwrite,
    )
    out = result.save(Path(args.run) / args.name)
    records = load_records(args.queries)
    summary = {
        "variants": list(config.variants),
        "queries": [
            {
                "query": records[q],
                **{
                    v: [
                        {"index": result.train_indices[i], "score": s}
                        for i, s in result.top(v, q, args.top_k)
                    ]
                    for v in config.variants
                },
            }
            for q in range(len(records))
        ],
    }
    atomic_write_json(Path(args.run) / f"{args.name}.json", summary)
    for v in config.variants:
        tops = ", ".join(str(result.train_indices[i]) for i, _ in result.top(v, 0, args.top_k))
        console.print(f"{v:>8}: query 0 top-{args.top_k} training sequences [{tops}]")
    console.print(f"scores → {out}; top-{args.top_k} per query → {args.run}/{args.name}.json")
    return 0
