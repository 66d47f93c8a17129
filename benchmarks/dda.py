"""Hallucination tracing with fitting-error corrections (DDA, arXiv 2410.01285), small scale.

A tiny GPT-2 is pre-trained on Shakespeare plus true planted facts (the base model), then
fine-tuned on a set in which some facts are false; for each output of the fine-tuned model that
repeats a false fact, every method ranks the fine-tuning sequences and the ROC AUC of the ones
that state the false fact is reported (set-up: :mod:`benchmarks.dda_setup`).

Run (after ``make assets``)::

    .venv/bin/python -m benchmarks.dda --out runs/applications/dda            # 3 seeds
    .venv/bin/python -m benchmarks.dda --out runs/applications/dda --quick    # CI-sized, 1 seed

Writes ``OUT/results.json`` (every number, per seed and per query) and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import torch

from benchmarks.dda_setup import (
    METHODS,
    QUICK,
    HallucinationConfig,
    run_benchmark,
)
from influscope.metrics import summary
from influscope.storage import atomic_write_json, read_json

ROOT = Path(__file__).resolve().parents[1]

LABELS = {
    "plain": "plain influence (EK-FAC, fine-tuned model)",
    "debias": "debias (fine-tuned − base)",
    "denoise": "denoise (mean over epoch checkpoints)",
    "dda": "DDA (debias + denoise)",
    "dda_standardized": "DDA, standardized smoothing",
    "relatif": "RelatIF",
    "bm25": "BM25",
    "gradient_cosine": "gradient cosine",
    "representation_similarity": "representation similarity",
    "shuffled": "shuffled DDA scores (control)",
}


def table(runs: list[dict]) -> str:
    """Markdown table: mean AUC over seeds (± standard error) and per seed."""
    lines = [
        "| method | AUC (mean ± s.e. over seeds) | per seed |",
        "|---|---|---|",
    ]
    for method in METHODS:
        values = [r["auc"][method] for r in runs if method in r["auc"]]
        if not values:
            continue
        s = summary(values)
        per_seed = ", ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {LABELS[method]} | {s['mean']:.3f} ± {s['sem']:.3f} | {per_seed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/applications/dda", help="Output directory.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds.")
    parser.add_argument("--assets", default=str(ROOT / ".cache" / "assets"), help="Assets.")
    parser.add_argument("--quick", action="store_true", help="The reduced CI set-up, 1 seed.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="Only combine the results.json of runs made separately (e.g. one seed per "
        "process; every seed is independent, so the table is the same) into OUT.",
    )
    args = parser.parse_args(argv)
    if args.merge:
        runs = [run for path in args.merge for run in read_json(path)["runs"]]
        out = Path(args.out)
        atomic_write_json(out / "results.json", {"runs": runs, "merged_from": args.merge})
        (out / "table.md").write_text(table(runs) + "\n")
        print(table(runs))
        return 0
    torch.set_num_threads(args.threads)
    base = QUICK if args.quick else HallucinationConfig()
    seeds = args.seeds[:1] if args.quick else args.seeds
    out = Path(args.out)
    runs = []
    start = time.perf_counter()
    for seed in seeds:
        result = run_benchmark(replace(base, seed=seed), args.assets)
        runs.append(result)
        q = result["queries"]
        print(
            f"seed {seed}: {q['repeated_by_finetuned']}/{q['false_facts']} false facts repeated; "
            + ", ".join(f"{m} {v:.3f}" for m, v in result["auc"].items()),
            file=sys.stderr,
        )
        atomic_write_json(out / "results.json", {"runs": runs, "command": " ".join(sys.argv)})
    text = table(runs)
    seconds = time.perf_counter() - start
    atomic_write_json(
        out / "results.json", {"runs": runs, "command": " ".join(sys.argv), "seconds": seconds}
    )
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"{seconds:.0f} s wall-clock ({args.threads} torch threads)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
