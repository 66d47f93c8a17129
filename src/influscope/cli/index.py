"""``influscope index``: write projected training gradients to an index, once.

``influscope query`` (:mod:`influscope.cli.query`) then answers new queries from it.

Examples::

    influscope index --model runs/demo/model --train train.jsonl --run runs/x --dtype float16
    influscope index ... --dry-run          # estimated memory and disk, nothing runs
    influscope index ... --curvature identity --optimizer adam \
        --optimizer-state ckpt/checkpoint-500/optimizer.pt --normalize   # TrackStar rows
"""

from __future__ import annotations

import argparse

from rich.console import Console

from influscope.cli.options import LazyChoices, add_run_options, load_influence

NAME = "index"
HELP = "Write projected training gradients to an index."

console = Console(stderr=True)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``index`` on ``sub`` (the main parser's sub-parsers)."""
    index = sub.add_parser(
        NAME,
        help=HELP,
        description="Project every training sequence's gradient (LoGra: per-layer input and "
        "output projections) and write the rows to RUN/index/NAME in shards, with the "
        "projected curvature, so that `influscope query` answers new queries without a pass "
        "over the training data. An interrupted build resumes from its finished shards.",
    )
    add_run_options(index)
    index.add_argument("--name", default="index", help="Name of the index (RUN/index/<name>).")
    index.add_argument("--k-in", type=int, default=64, help="Input projection rows per layer.")
    index.add_argument("--k-out", type=int, default=64, help="Output projection rows per layer.")
    index.add_argument(
        "--init",
        default="orthogonal",
        choices=LazyChoices("influscope.projection.projector", "INITS"),
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
        help="Labels of the projected curvature: sampled from the model (true) or the data "
        "(empirical) (default: %(default)s).",
    )
    index.add_argument(
        "--dtype",
        default="float16",
        choices=LazyChoices("influscope.index.config", "INDEX_DTYPES"),
        help="Storage.",
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
        "--optimizer",
        default="none",
        choices=LazyChoices("influscope.index.config", "OPTIMIZERS"),
        help="'adam': scale gradients by Adam's second moments before projecting (TrackStar; "
        "needs --optimizer-state and --curvature identity).",
    )
    index.add_argument(
        "--optimizer-state",
        default=None,
        help="Adam state for --optimizer adam: a Trainer checkpoint's optimizer.pt (read with "
        "torch.load(weights_only=True), nothing unpickled) or a .safetensors by parameter name.",
    )
    index.add_argument(
        "--adam-eps", type=float, default=1e-8, help="ε of the (v + ε)^(-1/2) scaling (1e-8)."
    )
    index.add_argument(
        "--normalize",
        action="store_true",
        help="Unit-normalise rows and queries (TrackStar; scores become cosines). Default: off.",
    )
    index.add_argument(
        "--dry-run", action="store_true", help="Print estimated memory and disk, then stop."
    )
    index.set_defaults(func=run)
    return index


def run(args: argparse.Namespace) -> int:
    """Run ``influscope index`` (or, with ``--dry-run``, print its estimates)."""
    from influscope.errors import ConfigError
    from influscope.index import IndexConfig
    from influscope.resources import describe, estimate

    if args.optimizer == "adam" and args.optimizer_state is None:
        raise ConfigError(
            "--optimizer adam needs Adam's second moments: pass --optimizer-state "
            "<checkpoint>/optimizer.pt (or a .safetensors by parameter name)."
        )
    if args.optimizer_state is not None and args.optimizer != "adam":
        raise ConfigError(
            f"--optimizer-state is only read with --optimizer adam (got --optimizer "
            f"{args.optimizer}). Add --optimizer adam --curvature identity, or drop it."
        )
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
        optimizer=args.optimizer,
        adam_eps=args.adam_eps,
        normalize=args.normalize,
    )  # validated before the model loads
    inf, train = load_influence(args)
    if args.dry_run:
        console.print(describe(estimate(inf, train, index=config)))
        return 0
    moments = None
    if args.optimizer == "adam":
        from influscope.index.trackstar import load_adam_moments

        moments = load_adam_moments(args.optimizer_state, inf.tracked.model)
    factors = inf.load_factors(train, args.factors) if args.init in ("pca", "eigen") else None
    index = inf.build_index(
        train, config, factors, name=args.name, overwrite=args.overwrite, second_moments=moments
    )
    root = index.root
    size = sum(p.stat().st_size for p in (root / "shards").glob("*.npy"))
    console.print(
        f"[green]indexed[/green] {index.n_rows} sequences × {index.meta['dim']} projected "
        f"dims ({config.dtype}, {size / 2**20:.1f} MiB in {len(index.meta['shards'])} shards) "
        f"→ {root}"
    )
    return 0
