"""The ``influscope`` command line: ``fit``, ``score``, ``demo``, ``report``, ``unlearn``.

Examples::

    influscope fit   --model runs/demo/model --train train.jsonl --run runs/x
    influscope score --model runs/demo/model --train train.jsonl --queries q.jsonl --run runs/x
    influscope demo  --out runs/demo
    influscope report runs/demo --out runs/demo/studies.html
    influscope unlearn runs/demo/model --train train.jsonl --forget 3,17 --out runs/edited
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from influscope.cli_options import (
    add_batch_size_option,
    add_curvature_option,
    add_model_argument,
    add_model_options,
    load_influence,
    non_negative_int,
)
from influscope.errors import InfluscopeError

console = Console(stderr=True)


def _common(p: argparse.ArgumentParser) -> None:
    """Options of every run-directory command: model, data, run, and how the model is loaded."""
    add_model_argument(p, adapter=True)
    p.add_argument(
        "--train",
        required=True,
        help="Training records: .jsonl/.json with 'text' (or 'prompt'+'completion'), "
        "a .txt file (one record per paragraph), or a saved HF dataset dir.",
    )
    p.add_argument("--run", required=True, help="Run directory where stages are stored.")
    add_model_options(p)  # --task --modules --truncate --device
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Recompute a stored stage even if it exists (else it is reused when it "
        "matches, refused when model/data/config differ).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influscope",
        description="Which training sequences made this language model produce this output? "
        "Influence functions with EK-FAC curvature. Positive influence = "
        "up-weighting the training sequence raises log p(completion | prompt).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser(
        "fit",
        help="Fit curvature factors on the training data.",
        description="Fit curvature factors (EK-FAC by default) on the training data and store "
        "them under RUN/factors/NAME; a killed fit resumes when rerun.",
    )
    _common(fit)
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
    fit.add_argument("--seed", type=int, default=0, help="Seed of sampled labels.")
    fit.add_argument(
        "--max-examples", type=int, default=None, help="Fit on the first N training records only."
    )

    score = sub.add_parser(
        "score",
        help="Score training sequences against queries.",
        description="Influence of every training sequence on every query (positive = "
        "up-weighting it raises log p(completion | prompt)), with the fitted factors; writes "
        "RUN/scores/NAME, RUN/NAME.json (top-k) and an HTML report.",
    )
    _common(score)
    score.add_argument(
        "--queries",
        required=True,
        help="Query records (.jsonl with 'prompt'+'completion', or 'text').",
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
    score.add_argument(
        "--refine",
        type=non_negative_int,
        default=0,
        help="Refine EK-FAC towards the joint Gauss-Newton system with N iterations (0 = off).",
    )
    score.add_argument(
        "--refine-method",
        default="cg",
        choices=["cg", "neumann"],
        help="cg: preconditioned conjugate gradient (default); neumann: preconditioned "
        "Richardson iteration with step 1.",
    )
    score.add_argument(
        "--refine-tol",
        type=float,
        default=0.0,
        help="Stop a query once its relative residual is at most this (default 0: run all steps).",
    )
    score.add_argument(
        "--refine-examples",
        type=int,
        default=None,
        help="Gauss-Newton products over a seeded random subset of this many training sequences per iteration (default: all).",
    )
    score.add_argument(
        "--top-k", type=non_negative_int, default=5, help="Proponents/opponents to report."
    )
    score.add_argument(
        "--relatif", action="store_true", help="Divide scores by sqrt(self-influence) (RelatIF)."
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

    demo = sub.add_parser(
        "demo",
        help="Train a tiny GPT-2 on Shakespeare + planted facts, attribute them end to end.",
        description="Train a tiny GPT-2 on public-domain Shakespeare mixed with planted facts, "
        "fit EK-FAC and attribute the facts: OUT/report.html and OUT/summary.json.",
    )
    demo.add_argument(
        "--assets", default=".cache/assets", help="Asset cache (filled by `make assets`)."
    )
    demo.add_argument("--out", default="runs/demo", help="Output directory.")
    demo.add_argument("--seed", type=int, default=0, help="Seed of the corpus and training.")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the figure is identical across machines with the "
        "same package versions; "
        "0: torch default, faster on many cores but not reproducible across them).",
    )

    report = sub.add_parser(
        "report",
        help="Render a run directory (scores + studies) into one self-contained HTML file.",
    )
    report.add_argument("run", help="Run directory holding scores/<name> (from score or demo).")
    report.add_argument("--scores", default="scores", help="Name of the scores stage.")
    report.add_argument("--factors", default="factors", help="Name of the factors stage.")
    report.add_argument(
        "--train",
        default=None,
        help="Training records that were scored (default: RUN/data.json or RUN/model/corpus.json).",
    )
    report.add_argument("--queries", default=None, help="Query records that were scored.")
    report.add_argument(
        "--model",
        default=None,
        help="Model directory for per-token colouring (default: RUN/model if present; "
        "'none' to skip).",
    )
    report.add_argument(
        "--top-k", type=non_negative_int, default=5, help="Proponents/opponents per query."
    )
    report.add_argument(
        "--bootstrap",
        type=int,
        default=100,
        help="Bootstrap sets of the power-law goodness-of-fit test (0 skips it).",
    )
    report.add_argument("--out", default=None, help="HTML file (default: RUN/studies.html).")

    from influscope.index.cli import add_parsers as add_index_parsers

    add_index_parsers(sub, _common)  # `index`, `query`
    from influscope.corrections.cli import add_parser as add_dda_parser

    add_dda_parser(sub, _common)  # `dda`
    from influscope.damping_cli import add_parser as add_damping_parser

    add_damping_parser(sub, _common)  # `damping`
    _add_reward_bias(sub)
    _add_unlearn(sub)
    _add_curate(sub)
    from influscope.trajectory.cli import add_parser as add_trajectory_parser

    add_trajectory_parser(sub)  # `trajectory`
    from influscope.probes.cli import add_parser as add_probe_parser

    add_probe_parser(sub)  # `probe`
    fit.add_argument(
        "--dry-run", action="store_true", help="Print estimated memory and disk, then stop."
    )
    return parser


def _add_reward_bias(sub) -> None:
    """``influscope bias`` (reward-model bias detection), defined in its own module."""
    from influscope.applications.reward_cli import add_parser

    add_parser(sub)


def _add_unlearn(sub) -> None:
    """``influscope unlearn`` (:mod:`influscope.applications.unlearn_cli`)."""
    from influscope.applications.unlearn_cli import add_parser

    add_parser(sub)


def _add_curate(sub) -> None:
    """``influscope curate`` (:mod:`influscope.applications.curation_cli`)."""
    from influscope.applications.curation_cli import add_parser

    add_parser(sub)


def cmd_fit(args) -> int:
    from influscope.config import FitConfig

    inf, train = load_influence(args)
    if args.dry_run:
        from influscope.resources import describe, estimate

        estimates = estimate(
            inf,
            train,
            batch_size=args.batch_size,
            curvature=args.curvature,
            max_examples=args.max_examples,
        )
        console.print(describe(estimates))
        return 0
    config = FitConfig(
        curvature=args.curvature,
        fisher=args.fisher,
        damping=args.damping,
        damping_factor=args.damping_factor,
        batch_size=args.batch_size,
        seed=args.seed,
        max_examples=args.max_examples,
    )
    op = inf.fit(train, config, name=args.name, overwrite=args.overwrite)
    n_fit = min(len(train), config.max_examples or len(train))
    console.print(
        f"[green]fitted[/green] {config.curvature} on {n_fit} sequences, "
        f"{len(inf.layers)} layers → {inf.run.stage_dir('factors', args.name)}"
    )
    shards = inf.last_fit_shards
    if shards["loaded"]:
        console.print(
            f"  resumed: {shards['loaded']} shard pass(es) read back from the interrupted run, "
            f"{shards['computed']} computed now"
        )
    for layer, damping in op.damping.items():
        console.print(f"  {layer}: damping {damping:.3g}")
    return 0


def cmd_score(args) -> int:
    from influscope.config import ScoreConfig
    from influscope.loading import load_records
    from influscope.report import write_report
    from influscope.report.build import build_report
    from influscope.report.terminal import print_summary
    from influscope.scoring.damping import describe_damping, score_damping
    from influscope.storage import atomic_write_json

    inf, train = load_influence(args)
    queries = inf.encode(load_records(args.queries), truncate=args.truncate)
    op = inf.load_factors(train, args.factors)
    config = ScoreConfig(
        query_rank=args.rank or None,
        query_svd=args.svd,
        batch_size=args.batch_size,
        per_layer=True,
        normalize="relatif" if args.relatif else None,
        damping=args.damping,
        damping_factor=args.damping_factor,
        refine_steps=args.refine,
        refine=args.refine_method,
        refine_tol=args.refine_tol,
        refine_examples=args.refine_examples,
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
        pq = inf.precondition(queries, op, config, train)
        scores = inf.score(pq, train, op, config, name=args.name, overwrite=args.overwrite)
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
            "tracked layers": str(len(inf.layers)),
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


def cmd_demo(args) -> int:
    from influscope.demo.pipeline import run_demo

    run_demo(assets=args.assets, out=args.out, seed=args.seed, threads=args.threads or None)
    return 0


def cmd_report(args) -> int:
    from influscope.analysis.runs import StudyConfig, report_run
    from influscope.analysis.sparsity import SparsityConfig
    from influscope.report import write_report

    config = StudyConfig(sparsity=SparsityConfig(n_bootstrap=args.bootstrap), top_k=args.top_k)
    view, studies = report_run(
        args.run,
        scores_name=args.scores,
        factors_name=args.factors,
        train=args.train,
        queries=args.queries,
        model=args.model,
        config=config,
    )
    path = write_report(view, Path(args.out or Path(args.run) / "studies.html"))
    console.print(f"studies: {', '.join(studies)}; report → {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``influscope`` command."""
    args = build_parser().parse_args(argv)
    from influscope.index.cli import COMMANDS as INDEX_COMMANDS

    handlers = {"fit": cmd_fit, "score": cmd_score, "demo": cmd_demo, "report": cmd_report}
    handlers |= INDEX_COMMANDS
    from influscope.corrections.cli import COMMANDS as DDA_COMMANDS

    handlers |= DDA_COMMANDS
    from influscope.damping_cli import COMMANDS as DAMPING_COMMANDS

    handlers |= DAMPING_COMMANDS
    from influscope.applications.reward_cli import COMMANDS as BIAS_COMMANDS

    handlers |= BIAS_COMMANDS
    from influscope.applications.unlearn_cli import cmd_unlearn

    handlers["unlearn"] = cmd_unlearn
    from influscope.applications.curation_cli import cmd_curate

    handlers["curate"] = cmd_curate
    from influscope.trajectory.cli import cmd_trajectory

    handlers["trajectory"] = cmd_trajectory
    from influscope.probes.cli import COMMANDS as PROBE_COMMANDS

    handlers |= PROBE_COMMANDS
    try:
        return handlers[args.command](args)
    except InfluscopeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        hint = ""
        if args.command in ("fit", "index"):  # both keep finished shards (docs/scale.md)
            hint = (
                f" Finished shards are kept under {args.run}; rerun the same command to "
                "resume (with other data, model or options they are discarded)."
            )
        console.print(f"[yellow]interrupted.[/yellow]{hint}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
