"""Uncertainty of demo scores over true-Fisher label-sampling seeds (an ensemble).

Loads the demo's trained model (``influscope demo --out DEMO``), rebuilds its corpus and
queries, scores them with :meth:`Influence.score_ensemble` over ``--seeds`` (rank-32 queries,
like the demo) and reports, over every query's top-10 by mean score, the median of
``sem / |mean|`` and the mean top-10 rank stability. Factors and the ensemble are stored
under ``OUT`` (a rerun reuses them).

Run::

    python -m benchmarks.ensemble_uncertainty --demo runs/demo --out runs/ensemble_demo
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from influscope import FitConfig, Influence, ScoreConfig
from influscope.demo.corpus import build_demo_corpus, free_text_queries
from influscope.demo.pipeline import direct_fact_queries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/demo")
    p.add_argument("--assets", default=os.environ.get("INFLUSCOPE_ASSETS", ".cache/assets"))
    p.add_argument("--out", default="runs/ensemble_demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()
    t0 = time.perf_counter()
    corpus = build_demo_corpus(args.assets, n_facts=40, n_shakespeare_chunks=300, seed=0)
    model = AutoModelForCausalLM.from_pretrained(Path(args.demo) / "model")
    tok = AutoTokenizer.from_pretrained(Path(args.demo) / "model")
    inf = Influence(model, "causal_lm", modules="mlp", run_dir=args.out, tokenizer=tok)
    train = inf.encode(corpus.records, truncate=True)
    queries = inf.encode(direct_fact_queries(corpus) + free_text_queries(), truncate=True)
    ens = inf.score_ensemble(
        queries,
        train,
        FitConfig(curvature="ekfac"),
        ScoreConfig(query_rank=32),
        seeds=args.seeds,
        name="ensemble",
    )
    idx = torch.topk(ens.mean, args.k, dim=-1).indices  # (Q, k)
    rel = (ens.sem.gather(-1, idx) / ens.mean.gather(-1, idx).abs()).flatten()
    result = {
        "seeds": args.seeds,
        "k": args.k,
        "n_queries": ens.n_queries,
        "n_train": ens.mean.shape[1],
        "median_sem_over_abs_mean_topk": float(rel.median()),
        "mean_topk_stability": float(ens.stability(args.k).mean()),
        "min_topk_stability": float(ens.stability(args.k).min()),
        "top1_agreement": float((ens.members.argmax(-1) == ens.mean.argmax(-1)).double().mean()),
        "seconds": time.perf_counter() - t0,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
