"""Benchmark (b): every estimator against exact damped Gauss-Newton influence, PBRF and LDS.

A tanh MLP classifier (4 → 16 → 16 → 4, 420 tracked parameters incl. biases) trained with
full-batch AdamW on N noisy-teacher examples; all three layers tracked at once, so the exact
oracle also holds the cross-layer blocks that K-FAC / EK-FAC drop by construction.

Ground truths (per query, Pearson and Spearman over training points, averaged over queries):

* ``exact`` — ``-∇f^⊤ (G + Λ)^{-1} ∇L`` with the dense Gauss-Newton ``G`` and EK-FAC's damping Λ;
* ``pbrf`` — the proximal Bregman response at ``ε = 1/N`` (Newton-CG, same Λ), on a subset
  of training points;
* ``lds`` — linear datamodeling score over ``m`` retrained half-subsets.

Run::

    python -m benchmarks.accuracy_exact --out runs/accuracy/exact
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import numpy as np
import torch

from influscope import FitConfig, Influence, ScoreConfig
from influscope.evaluation import (
    LDSConfig,
    RetrainingHarness,
    default_workers,
    gradient_cosine,
    lds,
    pbrf_influence,
    pearson,
    spearman,
)
from influscope.reference import exact_gauss_newton, exact_influence
from influscope.tasks import EncodedDataset
from influscope.toy import VectorClassificationTask, make_classification, train_mlp


def per_query(metric, est: torch.Tensor, truth: torch.Tensor) -> float:
    return float(np.nanmean([metric(est[q], truth[q]) for q in range(truth.shape[0])]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-queries", type=int, default=8)
    parser.add_argument("--pbrf-points", type=int, default=24)
    parser.add_argument("--lds-subsets", type=int, default=50)
    parser.add_argument("--fisher-samples", type=int, default=8)
    parser.add_argument(
        "--refine-steps",
        type=int,
        nargs="*",
        default=[1, 2, 5, 10, 20, 50],
        help="EK-FAC + CG refinement rows: one per number of CG steps (0 rows: pass nothing).",
    )
    parser.add_argument(
        "--damping-sweep",
        action="store_true",
        help="Also score EK-FAC at the default damping grid (one pass) and report LDS per λ.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy/exact"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()

    task = VectorClassificationTask()
    data = make_classification(n=args.n_train, n_queries=args.n_queries, seed=0)
    model = train_mlp(data.x, data.y)
    train, queries = data.train(), data.queries()
    inf = Influence(model, task, modules=["l1", "l2", "l3"])
    reps = args.fisher_samples
    repeated = EncodedDataset(train.examples * reps, indices=list(range(reps * len(train))))
    cfg = ScoreConfig(query_rank=None, batch_size=1024)
    scores, ops, seconds = {}, {}, {}
    for c in ("identity", "diagonal", "kfac", "ekfac"):
        ops[c] = inf.fit(repeated, FitConfig(curvature=c, batch_size=1024))
        t0 = time.perf_counter()
        scores[c] = inf.score(queries, train, ops[c], cfg).pairwise
        seconds[c] = time.perf_counter() - t0
    residuals = {}
    for n in args.refine_steps:
        # CG on the joint damped Gauss-Newton system over all 256 training points, EK-FAC as
        # the preconditioner; same per-layer damping Λ as the exact oracle below
        t0 = time.perf_counter()
        pq = inf.precondition(queries, ops["ekfac"], replace(cfg, refine_steps=n), train)
        scores[f"ekfac_cg{n}"] = inf.score(pq, train, ops["ekfac"], cfg).pairwise
        seconds[f"ekfac_cg{n}"] = time.perf_counter() - t0
        residuals[f"ekfac_cg{n}"] = pq.refine_residuals[:, -1].tolist()
    scores["gradient_cosine"] = gradient_cosine(inf, queries, train, 1024).pairwise
    damping = ops["ekfac"].damping

    g = exact_gauss_newton(model, task, inf.layers, train, chunk=256)
    exact = exact_influence(model, task, inf.layers, train, queries, damping, g)
    sweep_exact = {}
    if args.damping_sweep:
        sweep = inf.damping_sweep(queries, train, ops["ekfac"], config=cfg)
        for row in sweep.rows:
            name = f"ekfac_{row.setting.label}"
            scores[name] = sweep.scores[row.setting.label]
            # EK-FAC vs the exact damped GNH influence at the same λ
            sweep_exact[name] = exact_influence(
                model, task, inf.layers, train, queries, row.setting.per_layer, g
            )
    scores["exact_gnh"] = exact
    points = list(range(args.pbrf_points))
    t0 = time.time()
    pbrf = pbrf_influence(
        model,
        task,
        inf.layers,
        train,
        queries,
        points,
        damping=damping,
        epsilon=1.0 / args.n_train,
        gauss_newton=g,
    )
    pbrf_s = time.time() - t0

    def measure(m):
        return task.measurement(m, task.collate(queries.examples))

    harness = RetrainingHarness(
        lambda s, seed: train_mlp(data.x, data.y, s, seed),
        measure,
        len(train),
        args.out / "retrains",
        workers=default_workers(),
        tag=f"toy-mlp-n{args.n_train}",
    )
    result = lds(harness, scores, LDSConfig(n_subsets=args.lds_subsets))
    rng = np.random.default_rng(0)
    result.add("shuffled_ekfac", scores["ekfac"][:, rng.permutation(len(train))])

    lds_table = result.table()
    table = {}
    for name, s in scores.items():
        truth = sweep_exact.get(name, exact)
        table[name] = {
            "exact_pearson": per_query(pearson, s, truth),
            "exact_spearman": per_query(spearman, s, truth),
            "pbrf_pearson": per_query(pearson, s[:, points], pbrf.influence),
            "pbrf_spearman": per_query(spearman, s[:, points], pbrf.influence),
            "lds": result.mean(name),
            "lds_sem": lds_table[name]["sem"],
            "scale_vs_exact": float((s * truth).sum() / truth.square().sum()),
            "score_seconds": seconds.get(name),
            "cost_vs_ekfac": seconds[name] / seconds["ekfac"] if name in seconds else None,
            "final_residual_max": max(residuals[name]) if name in residuals else None,
        }
    table["shuffled_ekfac"] = {"lds": result.mean("shuffled_ekfac")}
    report = {
        "n_train": args.n_train,
        "n_queries": args.n_queries,
        "pbrf_points": len(points),
        "pbrf_max_residual": float(pbrf.residual.max()),
        "pbrf_seconds": pbrf_s,
        "lds_subsets": args.lds_subsets,
        "damping": damping,
        "seconds": time.time() - start,
        "table": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    print(
        f"{'estimator':18s} {'exact r':>8s} {'exact ρ':>8s} {'PBRF r':>8s} {'PBRF ρ':>8s} {'LDS':>6s}"
    )
    for name, row in table.items():
        vals = [
            row.get(k, float("nan"))
            for k in ("exact_pearson", "exact_spearman", "pbrf_pearson", "pbrf_spearman", "lds")
        ]
        extra = ""
        if row.get("cost_vs_ekfac") is not None:
            extra = f"  cost {row['cost_vs_ekfac']:.1f}× EK-FAC"
        if row.get("final_residual_max") is not None:
            extra += f"  max rel. residual {row['final_residual_max']:.1e}"
        print(f"{name:18s} " + " ".join(f"{v:8.3f}" for v in vals) + extra)
    print(f"total {report['seconds']:.0f}s (PBRF {pbrf_s:.0f}s)")


if __name__ == "__main__":
    main()
