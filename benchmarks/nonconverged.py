"""Benchmark: a deliberately non-converged fine-tune — SOURCE vs single-checkpoint EK-FAC.

The demo model (tiny GPT-2 trained on Shakespeare + 40 planted facts) is fine-tuned for a few
epochs on *new* planted facts mixed with Shakespeare chunks, at a learning rate small enough
that the new facts are still being learned when training stops (their loss is far from its
floor). Influence functions assume a converged model; SOURCE (Bae et al. 2024) follows the
fine-tune's checkpoints instead. Estimators, all scored on the fine-tune's own data:

* EK-FAC influence at the final model (one checkpoint);
* SOURCE over the fine-tune's checkpoints (one EK-FAC per segment), at ``lr_scale`` 1, 10, 100
  (the closed form models plain gradient descent; AdamW's effective step is larger);
* TracIn-CP over the same checkpoints; the gradient dot product (identity) at the final model.

Criteria: LDS over ``--subsets`` fine-tunes of random half-subsets (from the same base model,
same seed), and planted-fact top-1 (is the top-ranked sequence one of the fact's own?).

Run::

    python -m benchmarks.nonconverged --assets .cache/assets --out runs/nonconverged
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import numpy as np
import torch

from influscope import FitConfig, Influence, ScoreConfig
from influscope.demo.corpus import build_demo_corpus
from influscope.demo.pipeline import direct_fact_queries, planted_top1
from influscope.demo.train import DemoTrainConfig, train_demo_model, train_lm
from influscope.evaluation import LDSConfig, RetrainingHarness, lds
from influscope.evaluation.baselines import tracin
from influscope.scoring.pairwise import Scores
from influscope.tasks import CausalLMTask
from influscope.trajectory import from_train_result, source_scores

COMMAND = "python -m benchmarks.nonconverged --assets .cache/assets --out runs/nonconverged"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=".cache/assets")
    p.add_argument("--out", type=Path, default=Path("runs/nonconverged"))
    p.add_argument("--new-facts", type=int, default=20)
    p.add_argument("--chunks", type=int, default=60, help="Shakespeare chunks in the fine-tune")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=30, help="optimizer steps")
    p.add_argument("--subsets", type=int, default=50)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--lr-scales", type=float, nargs="*", default=[1.0, 10.0, 100.0])
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.time()

    base_corpus = build_demo_corpus(args.assets, n_facts=40, n_shakespeare_chunks=300, seed=0)
    base, tok, _ = train_demo_model(base_corpus, args.out / "base", DemoTrainConfig(seed=0))
    corpus = build_demo_corpus(
        args.assets, n_facts=args.new_facts, n_shakespeare_chunks=args.chunks, seed=11
    )
    records = corpus.records
    config = base.config
    task = CausalLMTask()

    def finetune(subset, seed=0, checkpoint_every=None):
        return train_lm(
            records,
            tok,
            config,
            epochs=args.epochs,
            lr=args.lr,
            weight_decay=0.01,
            batch_size=args.batch_size,
            seed=seed,
            subset=subset,
            init=base,
            checkpoint_every=checkpoint_every,
        )

    run = finetune(range(len(records)), 0, args.checkpoint_every)
    model = run.model.double().eval()
    query_rec = direct_fact_queries(corpus)
    queries = task.encode(query_rec, tok, config.n_positions)
    train = task.encode(records, tok, config.n_positions, truncate=True)

    def measure(m):
        return task.measurement(m.double().eval(), task.collate(queries.examples))

    with torch.no_grad():
        before, after = measure(base.double()), measure(model)
    base.float()

    inf = Influence(model, task, modules="mlp", tokenizer=tok)
    fit = FitConfig(curvature="ekfac", batch_size=16)
    cfg = ScoreConfig(query_rank=None, batch_size=16)
    scores, seconds = {}, {}
    t = time.time()
    scores["ekfac (final model)"] = inf.score(queries, train, inf.fit(train, fit), cfg).pairwise
    seconds["ekfac (final model)"] = time.time() - t
    traj = from_train_result(run.checkpoints, config)
    for scale in args.lr_scales:
        t = time.time()
        key = f"SOURCE ({len(traj)} checkpoints, lr × {scale:g})"
        scores[key] = source_scores(
            traj, task, "mlp", train, queries, fit, lr_scale=scale, batch_size=16
        ).pairwise
        seconds[key] = time.time() - t
    t = time.time()
    ckpts = [(c.model(config).double().eval(), c.lr) for c in run.checkpoints]
    scores["TracIn-CP"] = tracin(
        ckpts, lambda m: Influence(m, task, modules="mlp"), queries, train, 16
    ).pairwise
    seconds["TracIn-CP"] = time.time() - t
    t = time.time()
    scores["identity (final model)"] = inf.score(
        queries, train, inf.fit(train, FitConfig(curvature="identity")), cfg
    ).pairwise
    seconds["identity (final model)"] = time.time() - t

    harness = RetrainingHarness(
        lambda subset, seed: finetune(subset, seed).model.double(),
        measure,
        len(records),
        args.out / "retrains",
        workers=args.workers,
        tag=f"finetune-f{args.new_facts}-c{args.chunks}-e{args.epochs}-lr{args.lr:g}-b{args.batch_size}",
    )
    result = lds(harness, scores, LDSConfig(n_subsets=args.subsets))
    table = result.table()
    ref = result.per_query["ekfac (final model)"]
    rows = []
    for name, s in scores.items():
        hits = planted_top1(Scores(s, [], list(range(len(records)))), records, query_rec)
        diff = result.per_query[name] - ref  # paired over queries
        ok = ~np.isnan(diff)
        d_sem = float(np.std(diff[ok], ddof=1) / np.sqrt(ok.sum())) if ok.sum() > 1 else 0.0
        rows.append(
            (
                name,
                table[name]["mean"],
                table[name]["sem"],
                float(np.nanmean(diff)),
                d_sem,
                float(np.mean(hits)),
                seconds[name],
            )
        )
    lines = [
        "## Non-converged fine-tune: SOURCE vs single-checkpoint EK-FAC",
        "",
        "```",
        COMMAND,
        "```",
        "",
        f"The demo model fine-tuned on {len(records)} sequences ({args.new_facts} new planted "
        f"facts × 3 sentences + {args.chunks} Shakespeare chunks) for {run.steps} AdamW steps "
        f"(lr {args.lr:g}, batch {args.batch_size}), {len(run.checkpoints)} checkpoints every "
        f"{args.checkpoint_every} steps. Not converged: the new facts' mean log p(answer | "
        f"prompt) went from {before.mean():.2f} (base) to {after.mean():.2f} (fine-tuned). "
        f"MLP layers tracked; LDS over {args.subsets} fine-tunes of random half-subsets "
        f"(same base, seed 0), mean ± s.e.m. over the {len(query_rec)} fact queries.",
        "",
        "| estimator | LDS | LDS − EK-FAC (paired) | planted top-1 | seconds |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {m:.3f} ± {e:.3f} | {d:+.3f} ± {de:.3f} | {h:.3f} | {s:.0f} |"
        for n, m, e, d, de, h, s in rows
    ]
    lines += ["", f"- wall clock {time.time() - start:.0f} s (shared 2-core machine)"]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "per_query": {k: [float(x) for x in v] for k, v in result.per_query.items()},
                "before": before.tolist(),
                "after": after.tolist(),
                "lines": lines,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
