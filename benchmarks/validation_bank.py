"""A small real validation bank: a demo-size GPT-2 fine-tuned on VADER snippets, EK-FAC scored.

Set-up: a byte-level BPE tokenizer and a demo-size GPT-2 (2 layers, width 64) pre-trained for
one epoch on ``--pretrain`` VADER movie-review snippets (Hutto & Gilbert 2014; asset
``vader``); the bank's fine-tune is the built-in deterministic recipe
(:mod:`influscope.metagrad.recipe`, AdamW, all parameters) on ``--n-train`` other snippets;
the queries are ``--queries`` held-out snippets, measured by ``log p(text)``. The bank holds
leave-k-out retrains for each ``--fractions`` (``--subsets`` each). EK-FAC (MLP layers,
full-rank queries), the gradient dot product (identity curvature) and a shuffled EK-FAC
attribution are scored against it, with the top-k removal test for EK-FAC.

Run (single thread; the bank and removal retrains resume from ``--out``)::

    python -m benchmarks.validation_bank --out runs/validation_bank
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from influscope import FitConfig, Influence, ScoreConfig
from influscope.assets import vader_movie_reviews
from influscope.evaluation import BankConfig, ScoreBankConfig, build_bank, finetune_recipe
from influscope.evaluation.bank_report import summary_lines
from influscope.evaluation.bank_score import score_bank
from influscope.metagrad.recipe import FinetuneConfig
from influscope.training import fixed_threads, make_gpt2_config, train_lm, train_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/validation_bank", help="Output directory.")
    p.add_argument("--pretrain", type=int, default=1000, help="Pre-training snippets (1000).")
    p.add_argument("--n-train", type=int, default=100, help="Fine-tune snippets N (100).")
    p.add_argument("--queries", type=int, default=8, help="Held-out query snippets (8).")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05], help="(0.05).")
    p.add_argument("--subsets", type=int, default=8, help="Subsets per fraction (8).")
    p.add_argument("--epochs", type=int, default=2, help="Fine-tune epochs (2).")
    p.add_argument("--lr", type=float, default=1e-3, help="Fine-tune learning rate (1e-3).")
    p.add_argument("--top-k", type=int, nargs="*", default=[5], help="Removal sizes (5).")
    args = p.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    with fixed_threads(1):
        rows = [t for t, _ in vader_movie_reviews() if 5 <= len(t.split()) <= 20]
        pre = [{"text": t} for t in rows[: args.pretrain]]
        fine = [{"text": t} for t in rows[args.pretrain : args.pretrain + args.n_train]]
        held = rows[args.pretrain + args.n_train : args.pretrain + args.n_train + args.queries]
        queries = [{"text": t} for t in held]
        tok = train_tokenizer([r["text"] for r in pre + fine], vocab_size=1024)
        cfg = make_gpt2_config(tok, n_layer=2, n_embd=64, n_head=4, n_positions=64)
        base = train_lm(
            pre, tok, cfg, epochs=1, lr=3e-3, weight_decay=0.0, batch_size=16, seed=0
        ).model.eval()
        probe = Influence(base, "causal_lm", modules="mlp", tokenizer=tok, device="cpu")
        train, qs = probe.encode(fine, truncate=True), probe.encode(queries, truncate=True)
        ft = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=8, seed=0)
        made = finetune_recipe(base, "causal_lm", train, qs, ft)
        kept: dict[str, torch.nn.Module] = {}
        config = BankConfig(fractions=tuple(args.fractions), subsets=args.subsets)
        t0 = time.perf_counter()
        bank = build_bank(
            made.recipe,
            made.measure,
            made.n_train,
            made.fingerprints,
            config,
            out,
            keep_full=lambda m: kept.update(model=m),
        )
        build_s = time.perf_counter() - t0
        full = kept.get("model") or made.recipe(torch.ones(made.n_train, dtype=torch.float64))
        inf = Influence(full, "causal_lm", modules="mlp", tokenizer=tok, device="cpu")
        results = {}
        for curvature in ("ekfac", "identity"):
            factors = inf.fit(train, FitConfig(curvature=curvature, batch_size=8))
            scores = inf.score(qs, train, factors, ScoreConfig(query_rank=None, batch_size=8))
            meta = {"data": train.fingerprint(), "queries": qs.fingerprint()}
            top = ScoreBankConfig(top_k=tuple(args.top_k)) if curvature == "ekfac" else None
            results[curvature] = score_bank(
                bank, scores, meta, top, made.recipe, made.measure, out, name=curvature
            )
            if curvature == "ekfac":
                perm = torch.randperm(made.n_train, generator=torch.Generator().manual_seed(0))
                shuffled = scores.pairwise[:, perm]
                results["ekfac_shuffled"] = score_bank(bank, shuffled, name="ekfac shuffled")
    summary = {
        "args": vars(args),
        "finetune": ft.to_dict(),
        "n_train": made.n_train,
        "n_queries": bank.n_queries,
        "mean_abs_change": {
            f"{k:g}": float((bank.of_fraction(f)[1] - bank.full).abs().mean())
            for f, k in enumerate(config.fractions)
        },
        "bank_build_seconds": build_s,
        "total_seconds": time.perf_counter() - start,
        "results": {k: v.to_json() for k, v in results.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for name, res in results.items():
        print(f"== {name}")
        for line in summary_lines(res):
            print("  " + line)
    print(f"bank build {build_s:.0f} s, total {summary['total_seconds']:.0f} s; {out}/summary.json")


if __name__ == "__main__":
    main()
