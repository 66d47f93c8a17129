"""Approximate nearest-neighbour search over the projected index: recall@10 and query time
against the exhaustive scan (issue 24, item 5).

Synthetic projected gradients (``--dim`` floats per row, default 512 — e.g. eight layers of
8 × 8 LoGra blocks; 1M rows are 2 GiB as float32, 1 GiB as the index's default float16 storage):

    row_i = ν_i · (c_{t(i)} + z_i B + 0.3 ε_i)

with 1,024 "topic" centres ``c`` (Gaussian, scale 1), a shared low-rank part ``z_i B``
(``B``: 64 random directions with power-law scales ``j^{-0.7}``, so most of the variance lies in
few directions, like real gradients), isotropic noise ``ε``, and heavy-tailed norms
``ν_i ~ LogNormal(0, 0.5)`` (some sequences have much larger gradients). Queries are fresh draws
of the same model (the index searches ``max ⟨-q̃, g̃_m⟩``; the sign is absorbed). Rows are stored
as a float16 index of 65,536-row shards (:func:`influscope.index.write_rows_index`).

Measured, in one process, one thread for torch and FAISS alike: the exhaustive scan
(:meth:`GradientIndex.search`, chunked over the memory-mapped shards) and each FAISS backend
followed by exact re-ranking of its top ``k' = --rerank-k`` (:func:`influscope.index.rerank`,
which reads only those rows). Recall@10 = |ANN top-10 ∩ exact top-10| / 10, averaged over the
queries. Times: a batch of ``--n-queries`` queries, and single queries (mean of ``--n-single``).

    .venv/bin/python -m benchmarks.ann --rows 100000 [--report docs/benchmarks.md]
    .venv/bin/python -m benchmarks.ann --rows 1000000 --backends faiss-ivfpq --report docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, write_section
from influscope.index import AnnConfig, build_ann, rerank, write_rows_index


def synthetic_rows(n: int, dim: int, seed: int, chunk: int = 65_536):
    """The synthetic model above, ``chunk`` rows at a time (``(n_chunk, dim)`` float32)."""
    g = torch.Generator().manual_seed(0)  # the model (centres, directions) is shared
    centres = torch.randn(1024, dim, generator=g)
    scales = torch.arange(1, 65, dtype=torch.float32) ** -0.7
    basis = scales[:, None] * torch.randn(64, dim, generator=g) * 3  # (64, dim)
    g = torch.Generator().manual_seed(seed)  # the draws
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        t = torch.randint(0, len(centres), (m,), generator=g)
        z = torch.randn(m, 64, generator=g)
        nu = torch.exp(0.5 * torch.randn(m, 1, generator=g))
        yield nu * (centres[t] + z @ basis + 0.3 * torch.randn(m, dim, generator=g))


def _recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
    return hits / exact.numel()


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n-queries", type=int, default=100)
    parser.add_argument("--n-single", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rerank-k", type=int, default=100, help="k' candidates re-ranked.")
    parser.add_argument(
        "--backends", nargs="+", default=["faiss-flat", "faiss-ivf", "faiss-pq", "faiss-ivfpq"]
    )
    parser.add_argument("--mips", default="augment", choices=["augment", "direct"])
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--train-rows", type=int, default=65_536)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", default=None, help="Where the index goes (default: a temp dir).")
    parser.add_argument("--report", default=None, help="Markdown file to update.")
    args = parser.parse_args()
    os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    queries = -next(synthetic_rows(args.n_queries, args.dim, seed=10**6))  # (Q, D)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        index = write_rows_index(
            Path(tmp) / "idx", synthetic_rows(args.rows, args.dim, seed=1), "float16"
        )
        print(
            f"wrote {args.rows} rows × {args.dim} in {time.perf_counter() - t0:.0f} s", flush=True
        )
        exact, t_exact = _timed(index.search, queries, args.k)
        singles = [
            _timed(index.search, queries[i : i + 1], args.k)[1] for i in range(args.n_single)
        ]
        t_exact1 = sum(singles) / len(singles)
        print(f"exhaustive: {t_exact:.2f} s / {args.n_queries} queries, {t_exact1:.3f} s / query",
              flush=True)  # fmt: skip
        for backend in args.backends:
            cfg = AnnConfig(backend=backend, mips=args.mips, nlist=args.nlist, m=args.m,
                            train_rows=args.train_rows)  # fmt: skip
            ann, t_build = _timed(build_ann, index, cfg)
            probes = args.nprobe if "ivf" in backend else [None]
            for nprobe in probes:

                def query(q, ann=ann, nprobe=nprobe):
                    cand = ann.search(q, k=args.rerank_k, nprobe=nprobe)
                    return rerank(index, q, cand.indices, k=args.k)

                top, t_batch = _timed(query, queries)
                singles = [_timed(query, queries[i : i + 1])[1] for i in range(args.n_single)]
                t1 = sum(singles) / len(singles)
                raw = ann.search(queries, k=args.k, nprobe=nprobe)
                row = {
                    "backend": backend,
                    "nprobe": nprobe,
                    "build_s": t_build,
                    "recall_raw": _recall(raw.indices, exact.indices),
                    "recall": _recall(top.indices, exact.indices),
                    "t_batch": t_batch,
                    "t_single": t1,
                }
                results.append(row)
                print(row, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        f"### ANN over {args.rows:,} synthetic rows × {args.dim}",
        "",
        f"Command: `.venv/bin/python -m benchmarks.ann {' '.join(sys.argv[1:])}`",
        "",
        f"float16 index, {args.n_queries} queries, k = {args.k}, re-ranked k' = {args.rerank_k}; "
        f"{args.threads} thread(s) for torch and FAISS; mips = {args.mips}; nlist = {args.nlist}, PQ m = {args.m} × 8 "
        f"bits, trained on {min(args.train_rows, args.rows):,} rows; peak RSS {peak:.0f} MiB. "
        f"Exhaustive scan: {t_exact:.2f} s per batch, {t_exact1:.3f} s per single query.",
        "",
        "| backend | nprobe | build s | recall@10 (ANN) | recall@10 (re-ranked) | batch s | "
        "speed-up (batch) | single-query s | speed-up (single) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['nprobe'] or '–'} | {r['build_s']:.1f} | {r['recall_raw']:.3f} "
            f"| {r['recall']:.3f} | {r['t_batch']:.3f} | {t_exact / r['t_batch']:.1f}× | "
            f"{r['t_single']:.4f} | {t_exact1 / r['t_single']:.1f}× |"
        )
    text = "\n".join(lines)
    print(text)
    if args.report:
        write_section(ROOT / args.report, f"ann_{args.rows}", text)


if __name__ == "__main__":
    main()
