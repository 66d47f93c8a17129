"""New queries against a stored projected index vs recomputing training gradients.

Setting: the ``small`` tiny GPT-2 of ``vs_kronfluence.py`` (2 layers, width 128, 128-token
Shakespeare sequences), MLP ``c_fc``/``c_proj`` layers, LoGra 64 × 64 projections (``D`` =
4 × 4,096 = 16,384 dims per sequence), projected EK-FAC, float16 storage.

1. *build* (once): projected curvature + one pass writing the index;
2. *query*: 20 new queries — their gradients, preconditioning, one chunked matrix product over
   the index with top-10;
3. *recompute*: what answering the same 20 queries costs without the index — one pass over the
   training set recomputing the projected training gradients and scoring them (the curvature is
   reused, so this is the cheapest possible "from scratch").

The two rankings are compared (Spearman of the full score rows) to show the index answers
the same question (they differ only by float16 storage).

    .venv/bin/python -m benchmarks.repeated_queries [--n-train 5000] [--report docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    ROOT,
    load_average,
    load_model,
    mlp_names,
    prepare,
    spearman,
    write_section,
)
from influscope import EncodedDataset, FitConfig, Influence, ScoreConfig
from influscope.index import IndexConfig, build_index, preconditioned_queries
from influscope.index.build import flatten
from influscope.modules.passes import layer_passes
from influscope.projection import LograProjector
from influscope.storage.atomic import read_tensors


def dataset(ids: torch.Tensor) -> EncodedDataset:
    ones = torch.ones(ids.shape[1], dtype=torch.long)
    return EncodedDataset([{"input_ids": r, "attention_mask": ones, "labels": r} for r in ids])


def recompute(inf, train, index, q: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Scores of every training sequence without the index: ``(Q, N)``."""
    projector = LograProjector.from_tensors(read_tensors(index.root / "projector.safetensors"))
    out = []
    for _, grads, _ in layer_passes(
        inf.model, inf.task, inf.layers, train, batch_size=batch_size, objective="loss"
    ):
        g = flatten(projector.gradients(grads), index.meta["layout"]).float()  # (B, D)
        out.append(-(q @ g.t()))  # (Q, B)
    return torch.cat(out, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-queries", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--report", default=None, help="Markdown file to update.")
    parser.add_argument(
        "--no-ekfac", action="store_true", help="Skip the comparison with unprojected EK-FAC."
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")
    data = prepare("small", args.n_train, args.n_queries)
    model = load_model(data)
    inf = Influence(model, "causal_lm", modules=mlp_names(model), device="cpu")
    train, queries = dataset(data.train), dataset(data.queries)
    cfg = IndexConfig(dtype="float16", batch_size=args.batch_size, shard_size=1000)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index = build_index(inf.tracked, train, Path(tmp) / "index", cfg)
        t_build = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (index.root / "shards").glob("*.npy"))

        t0 = time.perf_counter()
        q = preconditioned_queries(inf.tracked, queries, index, args.batch_size)
        top = index.search(q, k=10)
        t_query = time.perf_counter() - t0

        t0 = time.perf_counter()
        q2 = preconditioned_queries(inf.tracked, queries, index, args.batch_size)
        full = recompute(inf, train, index, q2, args.batch_size)
        t_recompute = time.perf_counter() - t0
        _, stored = index.search(q, k=1, return_all=True)
    rho = sum(spearman(stored[i], full[i]) for i in range(len(full))) / len(full)
    rho_ekfac = None
    if not args.no_ekfac:  # the same queries with unprojected EK-FAC (sampled Fisher)
        op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=args.batch_size))
        cfg_s = ScoreConfig(query_rank=None, batch_size=args.batch_size)
        exact = inf.score(queries, train, op, cfg_s).pairwise.float()  # (Q, N)
        rho_ekfac = sum(spearman(stored[i], exact[i]) for i in range(len(exact))) / len(exact)
    same_top = sum(
        len(set(top.indices[i].tolist()) & set(full[i].topk(10).indices.tolist()))
        for i in range(len(full))
    ) / (10 * len(full))
    n, nq = args.n_train, args.n_queries
    lines = [
        "## Repeated queries against a projected index",
        "",
        f"Command: `.venv/bin/python -m benchmarks.repeated_queries {' '.join(sys.argv[1:])}`",
        "",
        f"`small` model, {n} training sequences × 128 tokens, {nq} new queries, LoGra 64 × 64 "
        f"per layer (D = {index.meta['dim']}), float16 index of {size / 2**20:.1f} MiB.",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| build the index (once: projected EK-FAC + gradient pass) | {t_build:.2f} |",
        f"| {nq} new queries against the index (top-10) | {t_query:.2f} |",
        f"| {nq} queries recomputing the training gradients | {t_recompute:.2f} |",
        "",
        f"- speed-up of the index: **{t_recompute / t_query:.1f}×**",
        f"- agreement with recomputation: Spearman {rho:.4f} (mean over queries), top-10 "
        f"overlap {same_top:.2f}",
        f"- load average after the run (2-core machine, shared): {load_average()}",
    ]
    if rho_ekfac is not None:
        lines.insert(
            -1,
            f"- projected index vs unprojected EK-FAC (same queries, {n} sequences): Spearman "
            f"{rho_ekfac:.4f} (mean over queries)",
        )
    print("\n".join(lines))
    if args.report:
        write_section(ROOT / args.report, "repeated_queries", "\n".join(lines))
    print(
        f"index_speedup={t_recompute / t_query:.1f} spearman_vs_recompute={rho:.4f} "
        f"spearman_vs_ekfac={rho_ekfac if rho_ekfac is None else round(rho_ekfac, 4)}"
    )


if __name__ == "__main__":
    main()
