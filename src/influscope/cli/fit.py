"""``influscope fit``: fit curvature factors on the training data and store them in the run.

Example::

    influscope fit --model runs/demo/model --train train.jsonl --run runs/x
    influscope fit ... --dry-run          # estimated memory, disk and time (one timed batch)
"""

from __future__ import annotations

import argparse

from rich.console import Console

from influscope.cli.options import (
    add_batch_size_option,
    add_curvature_option,
    add_memory_option,
    add_run_options,
    load_influence,
)

NAME = "fit"
HELP = "Fit curvature factors on the training data."

console = Console(stderr=True)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``fit`` on ``sub`` (the main parser's sub-parsers)."""
    fit = sub.add_parser(
        NAME,
        help=HELP,
        description="Fit curvature factors (EK-FAC by default) on the training data and store "
        "them under RUN/factors/NAME; a killed fit resumes when rerun.",
    )
    add_run_options(fit)
    fit.add_argument("--name", default="factors", help="Name of the factors stage.")
    add_curvature_option(fit)
    fit.add_argument(
        "--fisher",
        default="true",
        choices=["true", "empirical"],
        help="'true' samples labels from the model (default); 'empirical' uses the data labels.",
    )
    fit.add_argument(
        "--damping",
        type=float,
        default=None,
        help="Absolute damping for every layer (default: relative, see below).",
    )
    fit.add_argument(
        "--damping-factor",
        type=float,
        default=0.1,
        help="Damping = factor × mean eigenvalue per layer (default: 0.1).",
    )
    add_batch_size_option(fit)
    add_memory_option(fit)
    fit.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="Fit the tracked layers in this many contiguous module partitions, one after the "
        "other (each with its own passes over the data; its factors are written to disk and "
        "freed before the next). Default: as many as --memory-gb needs (1 when all layers fit "
        "together).",
    )
    fit.add_argument("--seed", type=int, default=0, help="Seed of sampled labels.")
    fit.add_argument(
        "--max-examples", type=int, default=None, help="Fit on the first N training records only."
    )
    fit.add_argument(
        "--dry-run",
        action="store_true",
        help="Print estimated peak memory, disk and time (from one timed batch), then stop.",
    )
    fit.set_defaults(func=run)
    return fit


def run(args: argparse.Namespace) -> int:
    """Run ``influscope fit`` (or, with ``--dry-run``, print its estimates)."""
    from influscope.config import FitConfig, check_memory_gb

    check_memory_gb(args.memory_gb)  # refused before the model is loaded
    config = FitConfig(
        curvature=args.curvature,
        fisher=args.fisher,
        damping=args.damping,
        damping_factor=args.damping_factor,
        batch_size=args.batch_size,
        seed=args.seed,
        max_examples=args.max_examples,
        memory_gb=args.memory_gb,
        partitions=args.partitions,
    )  # validated before the model is loaded
    inf, train = load_influence(args)
    if args.dry_run:
        from influscope.budget import plan_fit
        from influscope.costs import measure_batch
        from influscope.errors import MemoryBudgetError
        from influscope.resources import describe, estimate

        fit_data = train
        if args.max_examples is not None and args.max_examples < len(train):
            fit_data = train.subset(range(args.max_examples))
        try:  # the partitions the fit would use (refusals are printed, not raised)
            plan, refusal = plan_fit(inf.tracked, fit_data, config), None
        except MemoryBudgetError as exc:
            plan, refusal = None, str(exc)
        batch = plan.batch_size if plan is not None else args.batch_size  # as the fit runs
        cost = measure_batch(
            inf.tracked,
            train,
            batch,
            sample_seed=args.seed if args.fisher == "true" else None,
        )
        estimates = estimate(
            inf,
            train,
            batch_size=batch,
            curvature=args.curvature,
            max_examples=args.max_examples,
            cost=cost,
            memory_gb=args.memory_gb,
            partitions=plan.partitions if plan is not None else None,
        )
        console.print(describe(estimates, cost), soft_wrap=True)
        if plan is not None and plan.n_partitions > 1:
            from influscope.curvature.registry import CURVATURES

            passes = plan.n_partitions * (2 if CURVATURES[args.curvature].replays else 1)
            console.print(
                f"module partitions: {plan.n_partitions} (the budget "
                f"{plan.budget / 2**30:.2f} GiB does not hold every layer's statistics at "
                f"once): each partition runs its own passes over the data, up to {passes} "
                "forward + backward passes in all (fewer where the replay cache holds them); "
                "the factors are streamed from disk one layer at a time when scoring",
                soft_wrap=True,
            )
        elif plan is not None:
            console.print("module partitions: 1 (every layer's statistics fit together)")
        if plan is not None and plan.batch_size < args.batch_size:
            console.print(f"batch size {plan.batch_size} (of {args.batch_size}) to fit the budget")
        if refusal is not None:
            console.print(f"[red]the fit would be refused:[/red] {refusal}", soft_wrap=True)
        return 0
    op = inf.fit(train, config, name=args.name, overwrite=args.overwrite)
    n_fit = min(len(train), config.max_examples or len(train))
    console.print(
        f"[green]fitted[/green] {config.curvature} on {n_fit} sequences, "
        f"{len(inf.tracked.layers)} layers → {inf.run.stage_dir('factors', args.name)}"
    )
    plan = inf.last_fit_plan
    if plan is not None:
        note = (
            f"batch size {plan.batch_size} (of {config.batch_size}) to fit, "
            if plan.batch_size < config.batch_size
            else ""
        )
        parts = (
            f"{plan.n_partitions} module partitions (factors on disk, read one layer at a time), "
            if plan.n_partitions > 1
            else ""
        )
        console.print(
            f"  memory budget {plan.budget / 2**30:.2f} GiB: {note}{parts}"
            f"{inf.last_fit_shards['replayed']} shard(s) replayed from memory"
        )
    shards = inf.last_fit_shards
    if shards["loaded"]:
        console.print(
            f"  resumed: {shards['loaded']} shard pass(es) read back from the interrupted run, "
            f"{shards['computed']} computed now"
        )
    from influscope.scoring.damping import damping_range

    rule = (
        f"absolute {config.damping:.3g}"
        if config.damping is not None
        else f"{config.damping_factor:.3g} × mean eigenvalue per layer"
    )
    console.print(f"  damping: {rule}; {damping_range(op)}")
    return 0
