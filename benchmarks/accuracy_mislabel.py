"""Benchmark (c): mislabel detection on human-rated movie-review sentences, influscope vs Kronfluence.

Data: ``--n-train`` sentences of Hutto & Gilbert's movie-review set (``vaderSentiment==3.3.2``
sdist), label = sign of the mean human rating (ratings of exactly 0 dropped), 10 % of the
training labels flipped. Model: all-MiniLM-L6-v2 with its lower layers frozen (states cached
once under ``OUT/states``) and its top ``--top-layers`` layers + a linear head trained on the
noisy labels (:mod:`benchmarks.sentiment`). Every linear layer of the trained part is
tracked. Ranking: self-influence ``∇L(z)^⊤ (G + λI)^{-1} ∇L(z)`` (highest first), true Fisher,
damping ``0.1 × mean eigenvalue`` per layer for both libraries; baselines: training loss,
random scores, EK-FAC scores shuffled over the training set. Each flip seed (one flip draw and
one training run) is stored as ``OUT/seed<k>.json``, so an interrupted run resumes.

Run::

    python -m benchmarks.accuracy_mislabel --out runs/accuracy/mislabel
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import ExampleRows
from benchmarks.sentiment import (
    MINILM_LAYERS,
    HiddenStateTask,
    SentimentConfig,
    accuracy,
    encoder_states,
    make_classifier,
    mean_pooled,
    movie_review_split,
    predict,
    states_dataset,
    train_classifier,
)
from influscope import FitConfig, Influence, ScoreConfig
from influscope.assets import minilm_dir, vader_movie_reviews
from influscope.evaluation import MislabelConfig, detection_report, flip_labels
from influscope.storage import atomic_write_json, read_json

CURVATURES = {"ekfac": "EK-FAC", "kfac": "K-FAC", "diagonal": "diagonal", "identity": "identity"}
ORDER = [
    ("ekfac", "influscope EK-FAC self-influence"),
    ("ekfac_ensemble", "influscope EK-FAC self-influence, mean over label-sampling seeds"),
    ("kronfluence", "Kronfluence 1.0.1 EK-FAC self-influence"),
    ("kfac", "influscope K-FAC self-influence"),
    ("diagonal", "influscope diagonal self-influence"),
    ("identity", "influscope identity (squared gradient norm)"),
    ("heldout", "influscope EK-FAC: −Σ influence on the clean held-out margins"),
    ("loss", "training loss"),
    ("shuffled", "control: EK-FAC scores shuffled"),
    ("random", "control: random scores"),
]


def tracked_modules(model: torch.nn.Module) -> list[str]:
    """Every ``nn.Linear`` of the trained part (top MiniLM layers and the head)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def kronfluence_self_influence(model, train, modules: list[str], batch_size: int) -> torch.Tensor:
    """Kronfluence's EK-FAC self-influence with the same task, modules, Fisher and damping."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    logging.disable(logging.WARNING)
    ours = HiddenStateTask()

    class KronTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = ours.outputs(model, batch)  # (B, C)
            labels = batch["labels"]
            if sample:  # true Fisher: labels drawn from the model
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1)[:, 0]
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return ours.measurement(model, batch).sum()

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = KronTask()
    model = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("mislabel", model, task, cpu=True, disable_tqdm=True, output_dir=out)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=ours.collate))
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=ExampleRows(train.examples),
            per_device_batch_size=batch_size,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        analyzer.compute_self_scores(
            scores_name="self",
            factors_name="ekfac",
            train_dataset=ExampleRows(train.examples),
            per_device_train_batch_size=batch_size,
            score_args=ScoreArguments(damping_factor=None),
            overwrite_output_dir=True,
        )
        return analyzer.load_self_scores("self")["all_modules"].detach().clone()  # (N,)


def run_seed(seed: int, args, test, states_train, clean: list[int], mdir) -> dict:
    """One flip draw + one training run, every ranking of its training set."""
    noisy, flipped = flip_labels(clean, 2, MislabelConfig(fraction=args.fraction, seed=seed))
    train = states_dataset(states_train, noisy)
    config = SentimentConfig(
        n_train=args.n_train,
        n_test=args.n_test,
        top_layers=args.top_layers,
        hidden=args.hidden,
        epochs=args.epochs,
        lr=args.lr,
        train_seed=seed,
    )
    t0 = time.time()
    model = train_classifier(
        make_classifier(mdir, args.top_layers, args.hidden, seed), train, config
    )
    seconds = {"train": time.time() - t0}
    result = {
        "seed": seed,
        "test_accuracy": accuracy(model, test),
        "train_accuracy_noisy_labels": accuracy(model, train),
        "n_flipped": int(flipped.sum()),
    }
    print(
        f"seed {seed}: test acc {result['test_accuracy']:.3f}, trained in {seconds['train']:.0f} s",
        flush=True,
    )
    modules = tracked_modules(model)
    inf = Influence(model, HiddenStateTask(), modules=modules, device="cpu")
    scores: dict[str, torch.Tensor] = {}
    for curvature in args.curvatures:
        t0 = time.time()
        op = inf.fit(train, FitConfig(curvature=curvature, batch_size=args.batch_size))
        scores[curvature] = inf.self_influence(train, op, batch_size=args.batch_size)
        seconds[curvature] = time.time() - t0
        print(f"  {curvature}: {seconds[curvature]:.0f} s", flush=True)
        if curvature == "ekfac" and args.damping_sweep:
            # the same fitted factors re-damped (no refit): λ = v, or λ_ℓ = v · mean(Λ_ℓ)
            from influscope.scoring.damping import DEFAULT_ABSOLUTE, DEFAULT_RELATIVE, redamp

            t0 = time.time()
            for v in DEFAULT_ABSOLUTE:
                scores[f"ekfac_absolute {v:g}"] = inf.self_influence(
                    train, redamp(op, damping=v), batch_size=args.batch_size
                )
            for v in DEFAULT_RELATIVE:
                scores[f"ekfac_relative {v:g}"] = inf.self_influence(
                    train, redamp(op, damping_factor=v), batch_size=args.batch_size
                )
            seconds["damping_sweep"] = time.time() - t0
        for n in args.refine_steps if curvature == "ekfac" else ():
            # refined self-influence: v_i ≈ (G + Λ)^{-1} ∇L(z_i) by n CG steps over the joint
            # Gauss-Newton system of both head layers, then ⟨v_i, ∇L(z_i)⟩ (the diagonal)
            from dataclasses import replace as _replace

            t0 = time.time()
            cfg = ScoreConfig(query_rank=None, batch_size=args.batch_size)
            pq = inf.precondition(train, op, _replace(cfg, refine_steps=n), train)
            diag = inf.score(pq, train, op, cfg).pairwise.diagonal().double()  # (N,)
            # The query's measurement is the margin m, not the loss: for two classes
            # ∇L = −σ(−m) ∇m, so the pairwise diagonal −∇mᵀ(G+Λ)⁻¹∇L equals
            # σ(−m) ∇mᵀ(G+Λ)⁻¹∇m, and the self-influence ∇Lᵀ(G+Λ)⁻¹∇L is σ(−m) times it.
            m = pq.measurements.double()  # (N,) margins, taken with the query gradients
            scores[f"ekfac_cg{n}"] = torch.sigmoid(-m) * diag
            if n == 0:  # the identity above, checked against the plain self-influence
                ref = scores["ekfac"].double()
                result["cg0_vs_self_influence_max_rel"] = float(
                    ((scores["ekfac_cg0"] - ref).abs() / ref.abs().max()).max()
                )
                print(f"  cg0 vs self-influence: {result['cg0_vs_self_influence_max_rel']:.2e}")
            seconds[f"ekfac_cg{n}"] = time.time() - t0
            if pq.refine_residuals is not None:  # None for 0 steps
                res = pq.refine_residuals[:, -1]
                result[f"ekfac_cg{n}_median_residual"] = float(res.median())
            print(f"  ekfac + {n} CG steps: {seconds[f'ekfac_cg{n}']:.0f} s", flush=True)
        if curvature == "ekfac" and args.heldout:
            # A wrong label pulls the model away from clean data: its influence on the summed
            # margin of the clean held-out sentences is negative, so rank by minus that sum.
            t0 = time.time()
            config = ScoreConfig(query_rank=None, batch_size=args.batch_size)
            pairwise = inf.score(test, train, op, config).pairwise  # (Q, N)
            scores["heldout"] = -pairwise.double().sum(0)
            seconds["heldout"] = time.time() - t0
    if args.ensemble_seeds:
        # Mean self-influence over true-Fisher label-sampling seeds (an EnsembleScores of
        # (1, N) members); seed 0 is the plain EK-FAC ranking above.
        from influscope.scoring.ensemble import EnsembleScores
        from influscope.scoring.pairwise import Scores

        t0 = time.time()
        members = []
        for s in args.ensemble_seeds:
            fit = FitConfig(curvature="ekfac", batch_size=args.batch_size, seed=s)
            si = inf.self_influence(train, inf.fit(train, fit), batch_size=args.batch_size)
            members.append(Scores(si[None], [], list(range(len(train)))))  # (1, N)
        ens = EnsembleScores.from_members(members)
        scores["ekfac_ensemble"] = ens.mean[0]
        result["ensemble_median_sem_over_abs_mean"] = float(
            (ens.sem[0] / ens.mean[0].abs()).median()
        )
        seconds["ekfac_ensemble"] = time.time() - t0
        print(f"  ekfac ensemble {args.ensemble_seeds}: {seconds['ekfac_ensemble']:.0f} s")
    if args.kronfluence:
        t0 = time.time()
        scores["kronfluence"] = kronfluence_self_influence(model, train, modules, args.batch_size)
        seconds["kronfluence"] = time.time() - t0
        print(f"  kronfluence: {seconds['kronfluence']:.0f} s", flush=True)
    y = torch.tensor(noisy)
    scores["loss"] = F.cross_entropy(predict(model, train).double(), y, reduction="none")
    g = torch.Generator().manual_seed(1000 + seed)
    scores["random"] = torch.rand(len(train), generator=g, dtype=torch.float64)
    if "ekfac" in scores:
        scores["shuffled"] = scores["ekfac"][torch.randperm(len(train), generator=g)]
    inspect = MislabelConfig(inspect=(0.1, 0.2))
    result["reports"] = {k: detection_report(v, flipped, inspect).row() for k, v in scores.items()}
    if "ekfac" in scores and "kronfluence" in scores:
        from influscope.evaluation import spearman

        result["spearman_ekfac_vs_kronfluence"] = spearman(scores["ekfac"], scores["kronfluence"])
    result["seconds"] = seconds
    result["modules"] = modules
    return result


def table(results: list[dict]) -> list[str]:
    """Markdown rows: mean ± std over seeds of AUC, found@10 %, found@20 %."""
    lines = [
        f"| ranking | ROC-AUC | found@10 % | found@20 % |  (mean ± std over {len(results)} seeds)",
        "|---|---|---|---|",
    ]
    sweep = [
        (k, f"influscope EK-FAC + {k.removeprefix('ekfac_cg')} CG steps, self-influence")
        for k in results[0]["reports"]
        if k.startswith("ekfac_cg")
    ] + [
        (k, f"influscope EK-FAC self-influence, damping {k.removeprefix('ekfac_')}")
        for k in results[0]["reports"]
        if k.startswith(("ekfac_absolute", "ekfac_relative"))
    ]
    for key, label in ORDER + sweep:
        rows = [r["reports"][key] for r in results if key in r["reports"]]
        if not rows:
            continue
        cells = []
        for metric in ("auc", "found@10%", "found@20%"):
            v = np.array([row[metric] for row in rows])
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy/mislabel"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of labels flipped")
    parser.add_argument("--top-layers", type=int, default=0, help="MiniLM layers trained")
    parser.add_argument("--hidden", type=int, default=64, help="head width (0: linear head)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64, help="influence batch size")
    parser.add_argument(
        "--curvatures", nargs="+", default=list(CURVATURES), choices=list(CURVATURES)
    )
    parser.add_argument("--no-kronfluence", dest="kronfluence", action="store_false")
    parser.add_argument(
        "--no-heldout",
        dest="heldout",
        action="store_false",
        help="skip the ranking by influence on the clean held-out sentences",
    )
    parser.add_argument(
        "--ensemble-seeds",
        type=int,
        nargs="+",
        default=None,
        help="also rank by the EK-FAC self-influence averaged over these true-Fisher "
        "label-sampling seeds (an ensemble; e.g. 0 1 2 3)",
    )
    parser.add_argument(
        "--damping-sweep",
        action="store_true",
        help="EK-FAC self-influence also at the default damping grid (same factors, re-damped)",
    )
    parser.add_argument(
        "--refine-steps",
        type=int,
        nargs="*",
        default=[],
        help="EK-FAC self-influence refined by this many CG steps (one row per value)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--assets", type=Path, default=None, help="asset cache directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    mdir = minilm_dir(args.assets)
    train_rows, test_rows = movie_review_split(
        vader_movie_reviews(args.assets), args.n_train, args.n_test, seed=0
    )
    layer = MINILM_LAYERS - args.top_layers
    t0 = time.time()
    texts = [t for t, _ in train_rows + test_rows]
    states = encoder_states(texts, mdir, layer, cache_dir=args.out / "states")
    print(
        f"frozen MiniLM states (layer {layer}) for {len(texts)} sentences: {time.time() - t0:.0f} s",
        flush=True,
    )
    if args.top_layers == 0:  # the head only sees the mean: same model, T times cheaper
        states = mean_pooled(states)
    states_train, states_test = states[: args.n_train], states[args.n_train :]
    test = states_dataset(states_test, [y for _, y in test_rows])

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.pop("out"), settings.pop("threads"), settings.pop("assets"), settings.pop("seeds")
    results = []
    for seed in args.seeds:
        path = args.out / f"seed{seed}.json"
        if path.is_file() and read_json(path).get("settings") == settings:
            results.append(read_json(path))
            print(f"seed {seed}: reusing {path}", flush=True)
            continue
        clean = [y for _, y in train_rows]
        result = run_seed(seed, args, test, states_train, clean, mdir)
        result["settings"] = settings
        atomic_write_json(path, result)
        results.append(result)

    lines = table(results)
    acc = np.array([r["test_accuracy"] for r in results])
    lines.append("")
    lines.append(
        f"- test accuracy (clean labels, {args.n_test} sentences): {acc.mean():.3f} ± {acc.std():.3f}"
    )
    rho = [
        r["spearman_ekfac_vs_kronfluence"] for r in results if "spearman_ekfac_vs_kronfluence" in r
    ]
    if rho:
        lines.append(
            f"- Spearman(influscope EK-FAC, Kronfluence EK-FAC) self-influence: {np.mean(rho):.4f}"
        )
    lines.append(f"- wall clock: {time.time() - start:.0f} s (this invocation; shared machine)")
    print("\n".join(lines))
    atomic_write_json(
        args.out / "summary.json",
        {"command": " ".join(sys.argv), "table": lines, "results": results},
    )


if __name__ == "__main__":
    main()
