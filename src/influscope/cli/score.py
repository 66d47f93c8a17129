"""``influscope score``: influence of every training sequence on every query, with a report.

Example::

    influscope score --model runs/demo/model --train train.jsonl --queries q.jsonl --run runs/x
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from influscope.cli.options import (
    LazyChoices,
    add_batch_size_option,
    add_memory_option,
    add_run_options,
    apply_contrast,
    check_writable,
    encode_records,
    load_influence,
    non_negative_int,
)
from influscope.config import ScoreConfig

NAME = "score"
HELP = "Score training sequences against queries."

console = Console(stderr=True)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``score`` on ``sub`` (the main parser's sub-parsers)."""
    from influscope.solvers.refine import AUTO_EXAMPLES  # for the help text

    score = sub.add_parser(
        NAME,
        help=HELP,
        description="Influence of every training sequence on every query (positive = "
        "up-weighting it raises log p(completion | prompt)), with the fitted factors; writes "
        "RUN/scores/NAME, RUN/NAME.json (top-k) and an HTML report.",
    )
    add_run_options(score)
    score.add_argument(
        "--queries",
        required=True,
        help="Query records (.jsonl with 'prompt'+'completion', or 'text'; chat 'messages' "
        "or prompt/completion message lists).",
    )
    score.add_argument(
        "--contrast",
        default=None,
        help="Contrastive queries, f = log p(completion | prompt) − log p(contrast | prompt): a "
        "column of the queries holding the alternative answer, or a file of contrasts aligned "
        "with the queries (.txt one per line, or .jsonl with 'contrast'). Default: the "
        "'contrast' column when the queries have one.",
    )
    score.add_argument("--factors", default="factors", help="Name of the fitted factors stage.")
    score.add_argument("--name", default="scores", help="Name of the scores stage.")
    score.add_argument(
        "--rank",
        type=int,
        default=32,
        help="Rank of each layer's preconditioned query gradient (0 = full).",
    )
    score.add_argument(
        "--svd",
        default="auto",
        choices=["auto", "exact", "randomized"],
        help="SVD behind --rank: randomized (much faster on wide layers), exact, or auto "
        "(randomized when 4·(rank+8) ≤ the layer's smaller side).",
    )
    add_batch_size_option(score)
    add_memory_option(score)
    score.add_argument(
        "--stream-factors",
        action="store_true",
        help="Read the factors from disk one layer at a time while preconditioning, instead "
        "of loading them all (same scores, bit for bit; factors fitted in module partitions "
        "are always streamed).",
    )
    score.add_argument(
        "--refine",
        type=non_negative_int,
        default=0,
        help="Refine EK-FAC towards the joint Gauss-Newton system (cross-layer blocks "
        "included) with N iterations (default 0 = off). Each iteration is one Gauss-Newton "
        "product per query over the training sequences (see --refine-examples); the estimated "
        "time and memory are printed before the first one.",
    )
    score.add_argument(
        "--refine-method",
        default="cg",
        choices=LazyChoices("influscope.solvers.refine", "METHODS"),
        help="cg: preconditioned conjugate gradient (default); neumann: preconditioned "
        "Richardson iteration; astra: ASTRA's stochastic preconditioned Neumann iteration, a "
        "fresh random mini-batch of --refine-examples sequences per step.",
    )
    score.add_argument(
        "--refine-tol",
        type=float,
        default=0.0,
        help="Stop a query once its relative residual is at most this (default: %(default)s, "
        "run all steps).",
    )
    score.add_argument(
        "--refine-examples",
        type=refine_examples_arg,
        default="auto",
        help="Gauss-Newton products over a seeded random subset of this many training "
        "sequences, or 'all' (default: %(default)s = min(N, "
        f"{AUTO_EXAMPLES}) for N training sequences), so that the products cost a fixed "
        "number of mini-batches whatever the size of the training set (--refine 2 on 40 "
        "SmolLM2 sequences with 4 queries then stays within 3× a plain score: "
        "docs/benchmarks.md). This trades accuracy for time: an iteration costs about two "
        "forward passes plus three per query for each sequence used (less when only late "
        "layers are tracked), plus two EK-FAC preconditionings per query, while the solve then "
        "targets the curvature of that subset (cg, neumann: one subset for all steps) or a "
        "noisy average (astra: a new subset per step). Use 'all' for an exact solve on small "
        "training sets.",
    )
    score.add_argument(
        "--refine-start",
        default=ScoreConfig.refine_start,
        choices=["ekfac", "scaled"],
        help="Start the refinement from the multiple of EK-FAC's answer that minimises the "
        "Gauss-Newton-norm error (scaled, default: no extra cost; for cg, N steps are then N+1 "
        "steps from zero, never worse in that norm than N from EK-FAC's answer, and far better "
        "when EK-FAC misjudges the joint system's scale, as on SmolLM2) or from EK-FAC's "
        "answer itself (ekfac, the default before).",
    )
    score.add_argument(
        "--refine-alpha",
        type=float,
        default=None,
        help="Step size of neumann/astra (default: automatic, 1/μ_max of the preconditioned "
        "system from a few power iterations).",
    )
    score.add_argument(
        "--top-k", type=non_negative_int, default=5, help="Proponents/opponents to report."
    )
    score.add_argument(
        "--relatif", action="store_true", help="Divide scores by sqrt(self-influence) (RelatIF)."
    )
    score.add_argument(
        "--per-head",
        action="store_true",
        help="Also store per-attention-head terms (default off; needs --modules attn: every "
        "tracked layer an attention projection). See docs/heads_experts.md.",
    )
    score.add_argument(
        "--damping",
        type=float,
        default=None,
        help="Score-time absolute damping for every layer (re-damps the fitted factors).",
    )
    score.add_argument(
        "--damping-factor",
        type=float,
        default=None,
        help="Score-time damping = factor × mean eigenvalue per layer (re-damps the factors).",
    )
    score.add_argument(
        "--report", default=None, help="Write an HTML report here (default: RUN/<name>.html)."
    )
    members = score.add_mutually_exclusive_group()
    members.add_argument(
        "--ensemble",
        type=non_negative_int,
        default=None,
        metavar="M",
        help="Ensemble over M true-Fisher label-sampling seeds (0..M-1; M ≥ 2): factors are "
        "fitted per seed (RUN/factors/factors-seedS, same settings as --factors) and the report "
        "shows mean ± s.e. and top-k rank stability.",
    )
    members.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="Like --ensemble, with these label-sampling seeds.",
    )
    score.set_defaults(func=run)
    return score


def refine_examples_arg(text: str) -> int | str:
    """``argparse`` type of ``--refine-examples``: ``auto``, ``all`` or an integer ≥ 1.

    Raises:
        argparse.ArgumentTypeError: For anything else (argparse prints it with the usage and
            exits with status 2).
    """
    if text in ("auto", "all"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', 'all' or an integer ≥ 1, received {text!r}"
        )
    return value


def resolve_refine_examples(value: int | str, n_train: int) -> int | None:
    """``ScoreConfig.refine_examples`` from ``--refine-examples``.

    ``auto`` is ``min(N, AUTO_EXAMPLES)`` (:data:`influscope.solvers.refine.AUTO_EXAMPLES`),
    ``None`` (all) when that is every sequence, so that a small training set gets the exact
    solve and the same stored stage as ``all``; ``all`` is ``None``; a number is kept.
    """
    if value == "all":
        return None
    from influscope.solvers.refine import AUTO_EXAMPLES

    if value == "auto":
        return None if n_train <= AUTO_EXAMPLES else AUTO_EXAMPLES
    return int(value)


def run(args: argparse.Namespace) -> int:
    """Run ``influscope score``: precondition the queries, score, write the report."""
    from influscope.config import check_memory_gb
    from influscope.loading import load_records
    from influscope.report import write_report
    from influscope.report.build import build_report
    from influscope.report.summary import describe_layers
    from influscope.report.terminal import print_summary
    from influscope.scoring.damping import describe_damping, score_damping
    from influscope.storage import atomic_write_json

    check_memory_gb(args.memory_gb)  # refused before the model is loaded
    # data files and output directories are checked before the model is loaded
    query_records = apply_contrast(load_records(args.queries), args.contrast)
    if args.report is not None:
        check_writable(Path(args.report).parent, "directory of --report")
    inf, train = load_influence(args)
    queries = encode_records(inf, query_records, args.queries, args.truncate)
    op = inf.load_factors(train, args.factors, stream=args.stream_factors)
    config = ScoreConfig(
        query_rank=args.rank or None,
        query_svd=args.svd,
        batch_size=args.batch_size,
        per_layer=True,
        per_head=args.per_head,
        normalize="relatif" if args.relatif else None,
        damping=args.damping,
        damping_factor=args.damping_factor,
        refine_steps=args.refine,
        refine=args.refine_method,
        refine_tol=args.refine_tol,
        refine_examples=resolve_refine_examples(args.refine_examples, len(train)),
        refine_alpha=args.refine_alpha,
        refine_start=args.refine_start,
        memory_gb=args.memory_gb,
    )
    op = score_damping(op, config)  # the report's self-influence uses the same λ
    ensemble = None
    seeds = list(range(args.ensemble)) if args.ensemble is not None else args.seeds
    if seeds is not None:
        from influscope.config import FitConfig
        from influscope.scoring.pairwise import Scores

        fit_config = FitConfig.from_dict(inf.run.check("factors", args.factors, {})["config"])
        ensemble = inf.score_ensemble(
            queries,
            train,
            fit_config,
            config,
            seeds=seeds,
            name=args.name,
            overwrite=args.overwrite,
        )
        # Token colours and layer terms come from the first seed's factors.
        op = score_damping(inf.load_factors(train, f"factors-seed{seeds[0]}"), config)
        pq = inf.precondition(queries, op, config, train)
        scores = Scores(
            pairwise=ensemble.mean,
            layer_names=inf.layer_names,
            train_indices=ensemble.train_indices,
        )
    else:
        # The stored stage is checked (reused, or refused as stale) before the query pass; a
        # refinement keeps its finished query blocks, so a killed run resumes.
        scores = inf.score(queries, train, op, config, name=args.name, overwrite=args.overwrite)
        # the report's token colours need the preconditioned queries (recomputed when loaded)
        pq = inf.last_preconditioned
        if pq is None:
            pq = inf.precondition(queries, op, config, train)
    if pq.refine_residuals is not None:
        final = ", ".join(f"{float(r):.3g}" for r in pq.refine_residuals[:, -1])
        print(f"refinement ({config.refine}): final relative residual per query: {final}")
    report = build_report(
        inf,
        queries,
        pq,
        train,
        op,
        scores,
        title=f"influscope — {args.run}",
        overview={
            "model": str(args.model) + (f" + adapter {args.adapter}" if args.adapter else ""),
            "curvature": op.name,
            "training sequences": str(len(train)),
            "queries": str(len(queries)),
            "tracked layers": describe_layers(inf.layer_names),
            "query rank": str(config.query_rank or "full"),
            "damping": describe_damping(op, config),
            "normalization": "RelatIF: score / sqrt(self-influence)" if args.relatif else "none",
            **(
                {
                    "ensemble": f"{ensemble.n_members} label-sampling seeds {seeds}: mean ± s.e.; "
                    f"token colours from seed {seeds[0]}",
                    f"mean top-{args.top_k} stability": f"{float(ensemble.stability(args.top_k).mean()):.3f}",
                }
                if ensemble is not None
                else {}
            ),
        },
        top_k=args.top_k,
        ensemble=ensemble,
    )
    html_path = Path(args.report or Path(args.run) / f"{args.name}.html")
    write_report(report, html_path)
    atomic_write_json(
        Path(args.run) / f"{args.name}.json",
        {
            "queries": [
                {
                    "prompt": q.prompt,
                    "completion": q.completion,
                    **({"contrast": q.contrast} if q.contrast else {}),
                    "proponents": [_top_json(s) for s in q.proponents],
                    "opponents": [_top_json(s) for s in q.opponents],
                }
                for q in report.queries
            ]
        },
    )
    print_summary(report, Console())
    console.print(f"report → {html_path}")
    return 0


def _top_json(seq) -> dict:
    """A shown sequence for RUN/NAME.json (with ``sem`` / ``stable`` from an ensemble)."""
    out = {"index": seq.index, "score": seq.score}
    if seq.sem is not None:
        out["sem"] = seq.sem
    if seq.stable is not None:
        out["stable"] = f"{seq.stable}/{seq.n_members}"
    return out
