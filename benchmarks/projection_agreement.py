"""How far do projected-index scores agree with unprojected EK-FAC on the demo model?

Issue 4's target: projected-index scores keep Spearman ≥ 0.9 against unprojected EK-FAC on
the demo model. Setting: the demo corpus and model of ``make demo`` (40 planted facts among
300 Shakespeare chunks, GPT-2 with 2 layers of width 64, MLP ``c_fc`` 65 → 256 and ``c_proj``
257 → 64 tracked), its planted-fact and free-text queries. Reference: unprojected EK-FAC,
full-rank queries. Candidates: the projected gradient index (:func:`influscope.index.build_index`,
projected EK-FAC) at several LoGra widths ``k_in × k_out``, with orthogonal (default), plain
Gaussian and PCA projections, and the ``eigen`` selection (the ``Σ k_out k_in`` EK-FAC
eigen-coordinates with the largest ``Λ/(Λ+λ)``, same storage). ``pca`` and ``eigen`` are derived
from the reference's own EK-FAC fit, whose time is not in "build + query s". The trained demo
model is kept in ``--out`` and reused by later runs.

Both sides use the same Fisher (``--fisher``, default ``empirical`` so that the comparison sees
the projection only; with ``true`` the two fits draw their labels independently and Monte Carlo
noise enters as well). Printed: mean / min per-query Spearman over all training sequences, and
the top-10 overlap, and how many of the exact top-10 the index's top-50 holds (what
``influscope query --rescore`` with ``--index-k 50`` would recover).

    .venv/bin/python -m benchmarks.projection_agreement [--widths 32 64 128] [--inits orthogonal gaussian] [--report docs/benchmarks.md]
    .venv/bin/python -m benchmarks.projection_agreement --widths 64 --inits orthogonal --damping-factors 0.003 0.01 0.03 0.1 0.3 1 --report docs/benchmarks.md
    .venv/bin/python -m benchmarks.projection_agreement --model smollm2 --widths 64 --inits orthogonal eigen --report docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.common import ROOT, load_average, smollm2_datasets, spearman, write_section
from influscope import FitConfig, Influence, ScoreConfig
from influscope.assets import smollm2_gguf
from influscope.demo.corpus import build_demo_corpus, free_text_queries
from influscope.demo.pipeline import direct_fact_queries
from influscope.demo.train import DemoTrainConfig, train_demo_model
from influscope.index import IndexConfig, build_index, preconditioned_queries
from influscope.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", default=str(ROOT / ".cache" / "assets"))
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--inits", nargs="+", default=["orthogonal", "gaussian", "pca", "eigen"])
    parser.add_argument(
        "--damping-factors",
        type=float,
        nargs="+",
        default=[0.1],
        help="Relative damping of the projected EK-FAC (the reference keeps 0.1).",
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "projection"))
    parser.add_argument("--fisher", choices=["empirical", "true"], default="empirical")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", default=None, help="Markdown file to update.")
    parser.add_argument(
        "--model",
        choices=["demo", "smollm2"],
        default="demo",
        help="The demo GPT-2, or SmolLM2-135M's 90 MLP layers on Shakespeare windows.",
    )
    parser.add_argument("--n-train", type=int, default=128, help="SmolLM2 only.")
    parser.add_argument("--n-queries", type=int, default=8, help="SmolLM2 only.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")
    t0 = time.perf_counter()
    _model, inf, train, queries = (_smollm2 if args.model == "smollm2" else _demo)(args)
    op = inf.fit(train, FitConfig(curvature="ekfac", fisher=args.fisher))
    exact = inf.score(queries, train, op, ScoreConfig(query_rank=None)).pairwise  # (Q, N)
    print(
        f"{args.model} model ready, unprojected EK-FAC scored in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )

    rows = []
    grid = [(i, k, d) for i in args.inits for k in args.widths for d in args.damping_factors]
    for init, k, damping in grid:
        cfg = IndexConfig(
            k_in=k,
            k_out=k,
            init=init,
            dtype="float32",
            fisher=args.fisher,
            seed=args.seed,
            damping_factor=damping,
        )
        with tempfile.TemporaryDirectory() as tmp:
            t1 = time.perf_counter()
            factors = op if init in ("pca", "eigen") else None  # the reference's own fit
            index = build_index(inf.tracked, train, Path(tmp) / "idx", cfg, factors=factors)
            q = preconditioned_queries(inf.tracked, queries, index)
            _, stored = index.search(q, k=1, return_all=True)  # (Q, N)
            seconds = time.perf_counter() - t1
            dim = index.meta["dim"]
        rho = [spearman(stored[i], exact[i]) for i in range(len(exact))]
        top = [_overlap(stored[i], exact[i], 10) for i in range(len(exact))]
        recall = [_overlap(stored[i], exact[i], 50) for i in range(len(exact))]
        rows.append(
            (
                init,
                k,
                damping,
                dim,
                sum(rho) / len(rho),
                min(rho),
                sum(top) / len(top),
                sum(recall) / len(recall),
                seconds,
            )
        )
        print(f"{init} k={k} damping={damping}: spearman mean={rows[-1][4]:.4f}", flush=True)

    setting = (
        f"SmolLM2-135M-Instruct, {len(inf.layers)} MLP layers, {len(train)} Shakespeare windows "
        f"× 128 tokens, {len(queries)} held-out queries"
        if args.model == "smollm2"
        else f"Demo corpus and model (`make demo` settings, seed {args.seed}): {len(train)} "
        f"training sequences, {len(queries)} queries, MLP layers tracked"
    )
    lines = [
        "## Projected index vs unprojected EK-FAC on "
        + ("SmolLM2-135M" if args.model == "smollm2" else "the demo model")
        + ("" if args.damping_factors == [0.1] else ": damping sweep"),
        "",
        f"Command: `.venv/bin/python -m benchmarks.projection_agreement {' '.join(sys.argv[1:])}`",
        "",
        f"{setting}, {args.fisher} Fisher on both "
        "sides, float32 index; `orthogonal` = seeded Gaussian with orthonormal rows (the default), "
        "`gaussian` = i.i.d. N(0, 1/k), `pca` = top-k eigenvectors of the K-FAC factors, "
        "`eigen` = the same number of single EK-FAC eigen-coordinates, largest Λ/(Λ+λ) first "
        "(`pca` and `eigen` reuse the reference's EK-FAC fit; its time is not included).",
        "",
        "| projection | k_in × k_out | damping factor | D per sequence | Spearman mean | "
        "Spearman min | top-10 overlap | exact top-10 in index top-50 | build + query s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {i} | {k} × {k} | {df:g} | {d} | {m:.4f} | {lo:.4f} | {t:.2f} | {r:.2f} | {s:.1f} |"
        for i, k, df, d, m, lo, t, r, s in rows
    ]
    lines += ["", f"- load average after the run (2-core machine, shared): {load_average()}"]
    print("\n".join(lines))
    if args.report:
        section = "projection_agreement" + ("" if args.damping_factors == [0.1] else "_damping")
        section += "_smollm2" if args.model == "smollm2" else ""
        write_section(ROOT / args.report, section, "\n".join(lines))
    at64 = {r[0]: r[4] for r in rows if r[1] == 64 and r[2] == 0.1}
    print(" ".join(f"{i}64_spearman_vs_ekfac={v:.4f}" for i, v in at64.items()))


def _overlap(stored: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    """Fraction of the exact top-10 found among the index's top-``k`` (``k = 10``: overlap)."""
    found = set(stored.topk(k).indices.tolist()) & set(exact.topk(10).indices.tolist())
    return len(found) / 10


def _demo(args):
    corpus = build_demo_corpus(args.assets, n_facts=40, n_shakespeare_chunks=300, seed=args.seed)
    saved = Path(args.out) / f"model-seed{args.seed}"
    if (saved / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(saved)
    else:
        model, tokenizer, _ = train_demo_model(corpus, saved, DemoTrainConfig(seed=args.seed))
    inf = Influence(model, "causal_lm", modules="mlp", tokenizer=tokenizer, device="cpu")
    train = inf.encode(corpus.records, truncate=True)
    queries = inf.encode(direct_fact_queries(corpus) + free_text_queries(), truncate=True)
    return model, inf, train, queries


def _smollm2(args):
    model, tokenizer = load_model(smollm2_gguf())
    inf = Influence(model, "causal_lm", modules="mlp", tokenizer=tokenizer, device="cpu")
    train, queries = smollm2_datasets(tokenizer, args.n_train, args.n_queries)
    return model, inf, train, queries


if __name__ == "__main__":
    main()
