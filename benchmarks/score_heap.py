"""Resident memory of a full-rank SmolLM2-135M score pass with and without trimming the heap
after each training batch (``layer_passes(..., trim_heap=True)``, which ``score_pass`` uses).

Fits EK-FAC (true Fisher, default budget: the replay cache holds the first pass) on the first
``--sequences`` Shakespeare windows of ``vs_kronfluence``'s ``smollm2`` variant, then scores
its 8 queries at full rank, printing the resident size before and after each stage and each
stage's peak (sampled RSS, as ``vs_kronfluence`` reports it).

Run (about 3 min each; ``make assets`` first)::

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.score_heap --sequences 32
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.score_heap --sequences 32 --no-trim

With ``--llama-run RUN`` (a finished ``benchmarks.llama_1b`` run, whose first partition holds
layers 0–29) it measures the other leak instead, the one behind the 1.1 B score stage's missed
budget: the first ``--blocks`` blocks of the TinyLlama shape precondition 4 queries (rank 32,
batch 8) with those layers' factors streamed from disk, and it prints the resident size after
the query pass, then after dropping the cached layer and trimming the heap (what
``Influence.score`` does now; ``--no-trim``: without serving large blocks by ``mmap`` first)::

    PYTHONPATH=src:. OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.score_heap \
        --llama-run runs/llama_1b --blocks 10
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Stages
from benchmarks.vs_kronfluence import encoded, load, prepare_data, tracked

GIB = 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--no-trim", action="store_true", help="Score without trimming the heap.")
    p.add_argument("--llama-run", default=None, help="A benchmarks.llama_1b run directory.")
    p.add_argument("--blocks", type=int, default=10, help="With --llama-run: blocks (≤ 10).")
    args = p.parse_args()
    if args.llama_run:
        return llama_query_pass(args)
    from influscope import FitConfig, Influence, ScoreConfig
    from influscope.costs import resident_bytes

    if args.no_trim:  # score_pass asks for trim_heap=True: ignore it
        import influscope.scoring.pairwise as pairwise

        passes = pairwise.layer_passes
        pairwise.layer_passes = lambda *a, **k: passes(*a, **{**k, "trim_heap": False})
    data = prepare_data("smollm2", args.sequences, 8, 96)
    model = load(data)
    train, queries = encoded(data.train), encoded(data.queries)
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


def llama_query_pass(args) -> None:
    """The query pass of the 1.1 B score stage on its first ``args.blocks`` blocks."""
    import json
    from dataclasses import replace
    from pathlib import Path

    from benchmarks.gpu.common import FULL
    from benchmarks.gpu.model import build_llama
    from benchmarks.llama_1b import byte_windows
    from influscope import Influence, ScoreConfig
    from influscope.budget import fix_mmap_threshold, release_heap
    from influscope.costs import peak_bytes, reset_peak, resident_bytes
    from influscope.curvature.streamed import StreamedOperator

    stage = Path(args.llama_run) / "influscope" / "factors" / "factors"
    if not args.no_trim:
        fix_mmap_threshold()
    model = build_llama(replace(FULL, layers=args.blocks), torch.device("cpu"), torch.float32)
    train = byte_windows(8, 256, 0)
    queries = byte_windows(4, 256, 10_000)
    inf = Influence(model, "causal_lm", modules="mlp")
    damping = json.loads((stage / "meta.json").read_text())["damping"]
    names = inf.layer_names
    part = stage / "partition-000.safetensors"
    op = StreamedOperator("ekfac", dict.fromkeys(names, part), {n: damping[n] for n in names})
    start = resident_bytes()
    reset_peak()
    inf.precondition(queries, op, ScoreConfig(query_rank=32, batch_size=8), train)
    after = resident_bytes()
    peak = peak_bytes()
    op.release()
    release_heap()
    print(
        f"{args.blocks} blocks, query pass (mmap for large blocks: {not args.no_trim}): "
        f"resident {start / GIB:.2f} GiB before, peak +{(peak - start) / GIB:.2f}, "
        f"+{(after - start) / GIB:.2f} held after it, +{(resident_bytes() - start) / GIB:.2f} "
        "after dropping the cached layer and trimming the heap",
        flush=True,
    )


if __name__ == "__main__":
    main()
