"""Exact vs randomized SVD of the rank-32 preconditioned query gradients on SmolLM2-135M.

Setting: SmolLM2-135M-Instruct (``make assets``), its 90 MLP layers (``gate/up/down_proj``,
576 ↔ 1536), EK-FAC fitted on ``--n-train`` Shakespeare windows of 128 tokens, 16 held-out
query windows (32-token prompt, 16-token completion), ``query_rank=32``. Measured: the time of
:meth:`Influence.precondition` (query gradients, EK-FAC preconditioning and the truncated SVD)
with ``query_svd="exact"`` and ``"randomized"``, and how far the randomized scores over the
training windows agree with the exact-SVD ones (Spearman per query, relative max difference).

    .venv/bin/python -m benchmarks.query_svd [--n-train 64] [--report docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from benchmarks.common import ROOT, load_average, smollm2_datasets, spearman, write_section
from influscope import FitConfig, Influence, ScoreConfig
from influscope.assets import smollm2_gguf
from influscope.linalg import OVERSAMPLE
from influscope.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-queries", type=int, default=16)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--report", default=None, help="Markdown file to update.")
    args = parser.parse_args()
    os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = load_model(smollm2_gguf())
    inf = Influence(model, "causal_lm", modules="mlp", tokenizer=tok, device="cpu")
    train, queries = smollm2_datasets(tok, args.n_train, args.n_queries)
    t0 = time.perf_counter()
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=8))
    fit_s = time.perf_counter() - t0
    rows, scores = [], {}
    for method in ("exact", "randomized"):
        cfg = ScoreConfig(query_rank=args.rank, query_svd=method, batch_size=8)
        t1 = time.perf_counter()
        pq = inf.precondition(queries, op, cfg)
        seconds = time.perf_counter() - t1
        scores[method] = inf.score(pq, train, op, cfg).pairwise  # (Q, N)
        rows.append((method, seconds))
        print(f"{method}: precondition {seconds:.1f} s", flush=True)
    exact, fast = scores["exact"], scores["randomized"]
    rho = [spearman(fast[q], exact[q]) for q in range(len(exact))]
    rel = float((fast - exact).abs().max() / exact.abs().max())
    lines = [
        "## Low-rank queries: exact vs randomized SVD on SmolLM2-135M",
        "",
        f"Command: `.venv/bin/python -m benchmarks.query_svd {' '.join(sys.argv[1:])}`",
        "",
        f"{len(inf.layers)} MLP layers, EK-FAC fitted on {args.n_train} Shakespeare windows × "
        f"128 tokens ({fit_s:.0f} s), {args.n_queries} queries, rank {args.rank}; CPU, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| query SVD | precondition queries s (gradients + EK-FAC + SVD) |",
        "|---|---|",
    ]
    lines += [f"| {m} | {s:.1f} |" for m, s in rows]
    auto = sum(4 * (args.rank + OVERSAMPLE) <= min(t.in_dim, t.out_dim) for t in inf.layers)
    lines += [
        "",
        f'- `query_svd="auto"` (the default) picks the randomized SVD on {auto} of the '
        f"{len(inf.layers)} layers here",
        f"- speed-up of the whole query step: {rows[0][1] / rows[1][1]:.1f}×",
        f"- randomized vs exact scores over the {args.n_train} training windows: Spearman mean "
        f"{sum(rho) / len(rho):.4f}, min {min(rho):.4f}; max |difference| / max |score| {rel:.2e}",
        f"- load average after the run: {load_average()}",
    ]
    print("\n".join(lines))
    if args.report:
        write_section(ROOT / args.report, "query_svd", "\n".join(lines))
    print(f"query_svd_speedup={rows[0][1] / rows[1][1]:.2f} spearman_min={min(rho):.4f}")


if __name__ == "__main__":
    main()
