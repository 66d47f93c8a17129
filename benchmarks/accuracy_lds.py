"""Benchmark (a): LDS of every estimator on a tiny GPT-2 trained on Shakespeare.

Set-up in ``lds_setup.py``. Every estimator — influscope's curvatures, the baselines
(gradient dot / cosine, TracIn and SOURCE over checkpoints of the full-data run, representation
similarity, BM25) and Kronfluence 1.0.1's EK-FAC (``kronfluence_lds.py``) — is scored on the
very same retrains (``m`` random half-subsets, ``r`` seeds; the same seeds for every subset).

Run::

    python -m benchmarks.accuracy_lds --subsets 100 --out runs/accuracy/lds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from benchmarks.lds_setup import BATCH, add_arguments, build
from influscope.config import FitConfig, ScoreConfig
from influscope.evaluation import (
    LDSConfig,
    bm25,
    gradient_cosine,
    hidden_states,
    lds,
    representation_similarity,
    tracin,
)
from influscope.trajectory import from_train_result, source_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--checkpoint-epochs",
        type=int,
        default=4,
        help="TracIn: a checkpoint of the full-data run every this many epochs.",
    )
    parser.add_argument(
        "--source-lr-scales",
        type=float,
        nargs="*",
        default=[1.0, 10.0, 100.0],
        help="SOURCE: one row per multiplier of every segment's η̄K (1 = the schedule's rate).",
    )
    parser.add_argument(
        "--no-kronfluence", action="store_true", help="Skip Kronfluence (if not installed)."
    )
    parser.add_argument(
        "--refine-steps",
        type=int,
        nargs="*",
        default=[5, 20],
        help="EK-FAC + CG refinement rows: one per number of CG steps (pass nothing for none).",
    )
    parser.add_argument(
        "--damping-sweep",
        action="store_true",
        help="Also score EK-FAC at the default damping grid (one training pass); LDS per λ.",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()

    steps_per_epoch = math.ceil(args.n_train / BATCH)
    setup = build(args, checkpoint_every=args.checkpoint_epochs * steps_per_epoch)
    model, train, queries = setup.model, setup.train, setup.queries
    seconds = {}
    scores = {}
    for c in ("identity", "diagonal", "kfac", "ekfac"):
        t = time.time()
        scores[c] = setup.scores(c).pairwise
        seconds[c] = time.time() - t
    inf = setup.influence()
    ekfac_op = inf.fit(setup.fit_data(), FitConfig(curvature="ekfac", batch_size=32))
    cfg = ScoreConfig(query_rank=None, batch_size=32)
    residuals = {}
    for n in args.refine_steps:
        # CG on the joint damped Gauss-Newton system over the 128 training chunks (attention
        # and MLP layers of both blocks together), EK-FAC as the preconditioner
        t = time.time()
        pq = inf.precondition(queries, ekfac_op, replace(cfg, refine_steps=n), train)
        scores[f"ekfac_cg{n}"] = inf.score(pq, train, ekfac_op, cfg).pairwise
        seconds[f"ekfac_cg{n}"] = time.time() - t
        residuals[f"ekfac_cg{n}"] = pq.refine_residuals[:, -1].tolist()
    if args.damping_sweep:
        t = time.time()
        sweep = inf.damping_sweep(queries, train, ekfac_op, config=cfg)
        seconds["damping_sweep"] = time.time() - t
        for row in sweep.rows:
            scores[f"ekfac_{row.setting.label}"] = sweep.scores[row.setting.label]
    scores["gradient_cosine"] = gradient_cosine(inf, queries, train, 32).pairwise
    checkpoints = [
        (c.model(setup.config).double(), c.lr) for c in setup.full_run.checkpoints
    ]  # [(model θ_k, η_k)]
    t = time.time()
    scores["tracin"] = tracin(checkpoints, setup.influence, queries, train, 32).pairwise
    seconds["tracin"] = time.time() - t
    trajectory = from_train_result(setup.full_run.checkpoints, setup.config)
    fit = FitConfig(curvature="ekfac", batch_size=32)
    for scale in args.source_lr_scales:
        t = time.time()
        key = "source" if scale == 1.0 else f"source_lr_x{scale:g}"
        scores[key] = source_scores(
            trajectory,
            setup.task,
            "all",
            train,
            queries,
            fit,
            lr_scale=scale,
            fit_train=setup.fit_data(),
            batch_size=32,
        ).pairwise
        seconds[key] = time.time() - t
    hq = hidden_states(model, queries, setup.task)
    ht = hidden_states(model, train, setup.task)
    scores["representation_cosine"] = representation_similarity(hq, ht, train).pairwise
    scores["bm25"] = bm25(
        [q["prompt"] + q["completion"] for q in setup.queries_rec], setup.train_texts
    )
    if not args.no_kronfluence:
        try:
            import kronfluence  # noqa: F401
        except ImportError:
            sys.exit(
                "Kronfluence is not installed: `pip install --no-deps kronfluence==1.0.1` "
                "(see pyproject.toml), or pass --no-kronfluence to leave its row out."
            )
        from benchmarks.kronfluence_lds import kronfluence_scores

        t = time.time()
        scores["kronfluence_ekfac"] = kronfluence_scores(setup)
        seconds["kronfluence_ekfac"] = time.time() - t
    fit_s = time.time() - start

    result = lds(setup.harness, scores, LDSConfig(n_subsets=args.subsets, n_seeds=args.seeds))
    rng = np.random.default_rng(0)
    result.add("shuffled_ekfac", scores["ekfac"][:, rng.permutation(args.n_train)])
    table = result.table()
    agreement = {}
    if "kronfluence_ekfac" in scores:
        from influscope.evaluation import spearman

        a, b = scores["ekfac"].double(), scores["kronfluence_ekfac"].double()
        agreement["spearman_per_query_mean"] = float(
            np.mean([spearman(a[q].numpy(), b[q].numpy()) for q in range(len(a))])
        )
        ekfac, kron = result.per_query["ekfac"], result.per_query["kronfluence_ekfac"]
        diff = ekfac - kron
        agreement["lds_diff_mean"] = float(np.nanmean(diff))
        agreement["lds_diff_sem"] = float(
            np.nanstd(diff, ddof=1) / np.sqrt(np.sum(~np.isnan(diff)))
        )
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "tracin_checkpoints": [(c.step, c.lr) for c in setup.full_run.checkpoints],
        "estimator_seconds": seconds,
        "refine_final_residuals": residuals,
        "fit_and_score_seconds": fit_s,
        "seconds": time.time() - start,
        "ekfac_vs_kronfluence": agreement,
        "table": table,
        "per_query": {k: [float(x) for x in v] for k, v in result.per_query.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    for name, row in table.items():
        cost = ""
        if name in seconds and "ekfac" in seconds:
            cost = (
                f"  {seconds[name]:.1f}s ({seconds[name] / seconds['ekfac']:.1f}× EK-FAC fit+score)"
            )
        print(f"{name:22s} LDS {row['mean']:.3f} ± {row['sem']:.3f} (n={row['n']}){cost}")
    if agreement:
        print(
            f"EK-FAC − Kronfluence LDS (paired over queries): {agreement['lds_diff_mean']:+.3f} ± "
            f"{agreement['lds_diff_sem']:.3f}; score Spearman {agreement['spearman_per_query_mean']:.3f}"
        )
    print(f"total {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
