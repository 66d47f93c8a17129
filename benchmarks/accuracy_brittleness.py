"""Benchmark (a), brittleness: remove a query's top-k proponents, retrain, measure Δf.

Same model, queries and retraining harness as ``accuracy_lds.py`` (``lds_setup.py``; the
retrains are stored in the same folder, so the full-data models are shared). For each of the
first ``--queries`` queries and each ``k``: remove EK-FAC's ``k`` top proponents (largest
``df/dε``), identity's (gradient dot) ``k`` top proponents, or ``k`` random training
sequences (the same random draws for both estimators), retrain with ``--seeds`` seeds and
report ``Δf = f(θ_{-removed}) - f(θ)`` (both averaged over the seeds), mean ± s.e.m. over
queries. A faithful estimator makes ``f`` (the completion's log-probability) drop much more
than random removal does (Ilyas et al. 2022; Park et al. 2023).

Run::

    python -m benchmarks.accuracy_brittleness --queries 8 --ks 10 20 50 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks.lds_setup import add_arguments, build
from influscope.evaluation import BrittlenessConfig, brittleness


def _row(values: torch.Tensor) -> dict[str, float]:
    v = values.double().numpy()
    return {"mean": float(v.mean()), "sem": float(v.std(ddof=1) / np.sqrt(v.size))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--queries", type=int, default=8, help="The first this many queries.")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()

    setup = build(args)
    config = BrittlenessConfig(ks=tuple(args.ks), n_seeds=args.seeds)
    rows, results = [], {}
    for name, curvature in (("ekfac", "ekfac"), ("identity", "identity")):
        scores = setup.scores(curvature).pairwise[: args.queries]  # (Q_b, N)
        results[name] = brittleness(setup.harness, scores, config)
    ek, ident = results["ekfac"], results["identity"]
    assert torch.equal(ek.random, ident.random)  # shared random removals (same config)
    for i, k in enumerate(config.ks):
        rows.append(
            {
                "k": k,
                "ekfac_top": _row(ek.top[i]),
                "identity_top": _row(ident.top[i]),
                "random": _row(ek.random[i]),
                "ekfac_below_random": float((ek.top[i] < ek.random[i]).double().mean()),
                "ekfac_below_identity": float((ek.top[i] < ident.top[i]).double().mean()),
            }
        )
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "retrains_stored": setup.harness.stored(),
        "seconds": time.time() - start,
        "table": rows,
        "per_query": {
            "ekfac_top": ek.top.tolist(),
            "identity_top": ident.top.tolist(),
            "random": ek.random.tolist(),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "brittleness.json").write_text(json.dumps(report, indent=1))
    for r in rows:
        cells = [
            f"{name} {r[name]['mean']:+.2f} ± {r[name]['sem']:.2f}"
            for name in ("ekfac_top", "identity_top", "random")
        ]
        print(
            f"k={r['k']:3d}  " + "  ".join(cells) + f"  EK-FAC<random {r['ekfac_below_random']:.2f}"
            f"  EK-FAC<identity {r['ekfac_below_identity']:.2f}"
        )
    print(f"total {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
