"""Reward-model bias detection (Min et al., ACL 2025): ROC-AUC of each ranking vs. the flips.

For each bias (length, sycophancy), annotator-noise level and seed: draw VADER preference pairs
with 15 % of the labels flipped by the bias, train a reward model (frozen MiniLM + head by
default), rank the training pairs by targeted influence on the validation set and by the
baselines, and report the ROC-AUC of each ranking for the flipped pairs (mean ± std over seeds).

    python -m benchmarks.reward_bias --out runs/applications/reward_bias
    python -m benchmarks.reward_bias --out runs/applications/reward_bias_gpt2 --arch gpt2 --no-doc

Writes ``OUT/<bias>_noise<p>_seed<s>/`` (model, train.jsonl, validation.jsonl, result.json),
``OUT/summary.json`` and ``OUT/table.md``; with ``--doc`` (default) also the measured section of
``docs/applications_reward.md``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import load_average, write_section
from benchmarks.reward_experiment import (
    GPT2_TRAIN,
    BiasExperimentConfig,
    run_bias_experiment,
)
from influscope.applications.reward_bias import BiasDetectionConfig
from influscope.applications.reward_data import PreferenceConfig
from influscope.assets import vader_movie_reviews

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("influence", "gradient_dot", "self_influence", "loss", "random")
LABELS = {
    "influence": "targeted influence (EK-FAC)",
    "gradient_dot": "targeted gradient dot (G = I)",
    "self_influence": "self-influence",
    "loss": "training loss",
    "random": "random",
}


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f} (n={len(values)})"


def table(results: list[dict], key: str = "auc") -> str:
    """One row per method, one column per (bias, noise) setting: mean ± std over seeds."""
    settings = sorted(
        {(r["config"]["data"]["bias"], r["config"]["data"]["noise_fraction"]) for r in results}
    )
    head = "| method | " + " | ".join(f"{b}, noise {n:g}" for b, n in settings) + " |"
    lines = [head, "|---" * (len(settings) + 1) + "|"]
    for method in METHODS:
        cells = []
        for bias, noise in settings:
            vals = [
                r[key][method]
                for r in results
                if r["config"]["data"]["bias"] == bias
                and r["config"]["data"]["noise_fraction"] == noise
                and method in r.get(key, {})
            ]
            cells.append(_cell(vals) if vals else "–")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_table(results: list[dict]) -> str:
    rows = [
        "| setting | train | validation | test | test, split by the bias feature |",
        "|---|---|---|---|---|",
    ]
    settings = sorted(
        {(r["config"]["data"]["bias"], r["config"]["data"]["noise_fraction"]) for r in results}
    )
    for bias, noise in settings:
        rs = [
            r
            for r in results
            if r["config"]["data"]["bias"] == bias
            and r["config"]["data"]["noise_fraction"] == noise
        ]
        acc = {k: _cell([r["accuracy"][k] for r in rs]) for k in rs[0]["accuracy"]}
        split = "; ".join(f"{k}: {v}" for k, v in acc.items() if k.startswith("test["))
        rows.append(
            f"| {bias}, noise {noise:g} | {acc['train']} | {acc['validation']} | {acc['test']} | {split} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs/applications/reward_bias")
    p.add_argument("--biases", nargs="+", default=["length", "sycophancy"])
    p.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.1])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arch", default="minilm", choices=["minilm", "gpt2"])
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-validation", type=int, default=128)
    p.add_argument("--flip", type=float, default=0.15)
    p.add_argument("--curvature", default="ekfac")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--doc", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="Run nothing; build the table from every OUT/*/result.json of this --arch.",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reviews = vader_movie_reviews(ROOT / ".cache/assets")
    memo: dict = {}
    results = []

    for bias in args.biases:
        for noise in args.noise:
            for seed in args.seeds:
                data = PreferenceConfig(
                    bias=bias,
                    n_train=args.n_train,
                    n_validation=args.n_validation,
                    flip_fraction=args.flip,
                    noise_fraction=noise,
                    max_words=25,
                    seed=seed,
                )
                config = BiasExperimentConfig(data=data, arch=args.arch)
                if args.arch == "gpt2":
                    config = replace(config, train=GPT2_TRAIN)
                out = args.out / f"{bias}_noise{noise:g}_seed{seed}"
                if args.report_only:
                    continue
                done = out / "result.json"
                if done.is_file() and json.loads(done.read_text())["config"] == config.to_dict():
                    print(f"reusing {done}", flush=True)  # resume an interrupted benchmark
                    continue
                r = run_bias_experiment(
                    reviews,
                    config,
                    BiasDetectionConfig(curvature=args.curvature, seed=seed),
                    out_dir=out,
                    memo=memo,
                )
                print(
                    f"{bias} noise {noise:g} seed {seed}: "
                    + " ".join(f"{m} {r['auc'][m]:.3f}" for m in METHODS)
                    + f" | test acc {r['accuracy']['test']:.3f} | {r['seconds']['total']:.0f}s",
                    flush=True,
                )
    results = [
        json.loads(f.read_text()) for f in sorted(args.out.glob("*/result.json"))
    ]  # every finished experiment under OUT (also those of parallel or earlier runs)
    results = [r for r in results if r["config"]["arch"] == args.arch]
    seeds = sorted({r["config"]["data"]["seed"] for r in results})
    auc = table(results)
    text = (
        f"ROC-AUC for the pairs flipped by the bias (mean ± std over seeds {seeds}, n = number of "
        "seeds in the cell; "
        f"{args.n_train} training pairs, {args.flip:.0%} flipped by the bias, "
        f"{args.n_validation} targeted validation pairs; reward model `{args.arch}`):\n\n{auc}\n"
    )
    if any(n > 0 for n in args.noise):
        text += (
            "\nWith annotator noise, AUC of *biased* flips against the other wrong labels "
            "only (can the method tell the bias from generic label noise?):\n\n"
            + table(
                [r for r in results if "auc_biased_vs_other_wrong" in r],
                "auc_biased_vs_other_wrong",
            )
            + "\n"
        )
    text += "\nReward-model pair accuracy (share of pairs whose chosen response gets the higher reward):\n\n"
    text += accuracy_table(results) + "\n"
    text += (
        f"\nCommand: `python -m benchmarks.reward_bias --out {args.out.relative_to(ROOT) if args.out.is_absolute() and args.out.is_relative_to(ROOT) else args.out}"
        + (f" --arch {args.arch}" if args.arch != "minilm" else "")
        + "` (biases and seeds can run as parallel processes with `--biases`/`--seeds`; "
        "finished experiments are reused). The experiments took "
        + f"{sum(r['seconds']['total'] for r in results) / 60:.1f} min of wall-clock in all "
        "(most of it the MiniLM embeddings of ~1,900 texts per experiment, memoised across "
        "seeds in one process) on a shared 2-core machine under heavy load "
        f"(load average at the end {load_average()}; not a speed figure).\n"
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    if args.doc:
        write_section(ROOT / "docs/applications_reward.md", f"reward-bias-{args.arch}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
