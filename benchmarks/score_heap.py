"""Resident memory of a full-rank SmolLM2-135M score pass with and without trimming the heap
after each training batch (``layer_passes(..., trim_heap=True)``, which ``score_pass`` uses).

Fits EK-FAC (true Fisher, default budget: the replay cache holds the first pass) on the first
``--sequences`` Shakespeare windows of ``vs_kronfluence``'s ``smollm2`` variant, then scores
its 8 queries at full rank, printing the resident size before and after each stage and each
stage's peak (sampled RSS, as ``vs_kronfluence`` reports it).

Run (about 3 min each; ``make assets`` first)::

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.score_heap --sequences 32
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.score_heap --sequences 32 --no-trim
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Stages
from benchmarks.vs_kronfluence import load, prepare_data, tracked

GIB = 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--no-trim", action="store_true", help="Score without trimming the heap.")
    args = p.parse_args()
    from influscope import EncodedDataset, FitConfig, Influence, ScoreConfig
    from influscope.costs import resident_bytes

    if args.no_trim:  # score_pass asks for trim_heap=True: ignore it
        import influscope.scoring.pairwise as pairwise

        passes = pairwise.layer_passes
        pairwise.layer_passes = lambda *a, **k: passes(*a, **{**k, "trim_heap": False})
    data = prepare_data("smollm2", args.sequences, 8, 96)
    model = load(data)

    def dataset(ids: torch.Tensor) -> EncodedDataset:
        ones = torch.ones(ids.shape[1], dtype=torch.long)
        return EncodedDataset([{"input_ids": r, "attention_mask": ones, "labels": r} for r in ids])

    train, queries = dataset(data.train), dataset(data.queries)
    inf = Influence(model, "causal_lm", modules=tracked(model), device="cpu")
    stages = Stages()
    print(f"resident before the fit: {resident_bytes() / GIB:.2f} GiB", flush=True)
    with stages.stage("fit"):
        op = inf.fit(train, FitConfig(curvature="ekfac", fisher="true", batch_size=16))
    print(
        f"fit: peak {stages.peak_mib['fit'] / 1024:.2f} GiB, resident after "
        f"{resident_bytes() / GIB:.2f} GiB",
        flush=True,
    )
    with stages.stage("score"):
        inf.score(queries, train, op, ScoreConfig(batch_size=16))
    print(
        f"score (full rank, trim_heap={not args.no_trim}): peak "
        f"{stages.peak_mib['score'] / 1024:.2f} GiB, resident after "
        f"{resident_bytes() / GIB:.2f} GiB, {stages.seconds['score']:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
