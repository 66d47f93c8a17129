"""Data curation: drop the training sequences most harmful to a benchmark, retrain, compare.

Set-up: a demo-style corpus (Shakespeare windows + planted facts about invented entities, each
fact stated by 3 sequences) into which **false facts** are mixed: for ``--false-facts`` of the
facts, the same 3 sentences with a wrong answer (another fact's answer of the same relation).
The demo GPT-2 (2 layers, width 64) is trained on everything (fact records visited 4× per
epoch, as in the demo). Benchmark: one held-out-wording query per fact, measurement
``log p(true answer | prompt)``; benchmark loss = ``−mean log p``.

Ranking: EK-FAC total influence of each training sequence on the benchmark,
``T(z) = Σ_q I_q(z)`` (:mod:`influscope.applications.curation`); the most negative are removed.
Compared with removing a random k % and the k % with the highest mean token loss, at
k ∈ {5, 10, 20} %, each retrained from scratch with 3 seeds (the random subset changes with the
seed; the highest-loss baseline is retrained with one seed to save time). Also reported: which fraction of the removed sequences are false facts.

Run (after ``make assets``; about 10 min on an idle 2-core machine, 2 retrain workers)::

    .venv/bin/python -m benchmarks.curation --out runs/applications/curation

Writes ``results.json`` and ``table.md`` under ``--out``; retrains are stored under
``--out/retrains`` and reused when the run is repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from benchmarks.app_common import fmt, heldout_texts, query_metrics, token_nll, train_cached, visits
from influscope.applications.curation import (
    harmful_subset,
    highest_loss_subset,
    random_subset,
    rank_by_influence,
)
from influscope.applications.unlearn import sequence_losses
from influscope.assets import shakespeare_texts
from influscope.config import FitConfig, ScoreConfig
from influscope.demo.corpus import shakespeare_chunks
from influscope.demo.facts import make_facts, make_queries, make_training_records
from influscope.demo.train import DemoTrainConfig, evaluate_queries, train_tokenizer
from influscope.evaluation import Job, RetrainingHarness
from influscope.storage import atomic_write_json
from influscope.tasks import CausalLMTask

COMMAND = ".venv/bin/python -m benchmarks.curation --out runs/applications/curation"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/applications/curation")
    p.add_argument("--assets", default=None)
    p.add_argument("--n-facts", type=int, default=20)
    p.add_argument("--false-facts", type=int, default=10)
    p.add_argument("--n-chunks", type=int, default=100)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--heldout", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_corpus(args) -> tuple[list[dict], list[dict]]:
    """Training records (true facts, false facts, Shakespeare; shuffled) and benchmark queries."""
    texts = shakespeare_texts(args.assets)
    import re

    vocabulary = {w for t in texts.values() for w in re.findall(r"[a-z]+", t.lower())}
    pool = make_facts(2 * args.n_facts, args.seed, forbidden=vocabulary)
    facts, spare = pool[: args.n_facts], pool[args.n_facts :]
    records = make_training_records(facts, seed=args.seed)
    for r in records:
        r["source"], r["false"] = "fact", False
    for fact in facts[: args.false_facts]:
        donor = next(s for s in spare if s.relation == fact.relation)
        spare.remove(donor)
        wrong = dataclasses.replace(fact, answer=donor.answer, fact_id=f"{fact.fact_id}-false")
        for r in make_training_records([wrong], seed=args.seed):
            r["source"], r["false"] = "false_fact", True
            records.append(r)
    for c in shakespeare_chunks(texts, args.n_chunks, 48, args.seed):
        records.append(c | {"false": False})
    random.Random(args.seed + 1).shuffle(records)
    return records, make_queries(facts, style="context")


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records, benchmark = build_corpus(args)
    settings = DemoTrainConfig(epochs=args.epochs, seed=args.seed)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer([r["text"] for r in records], settings.vocab_size)
        tokenizer.model_max_length = settings.n_positions
        tokenizer.save_pretrained(tok_dir)
    n = len(records)
    all_visits = visits(records, settings.fact_repeats)
    model, t_train = train_cached(
        out / "model", records, tokenizer, settings, all_visits, args.seed
    )
    heldout = heldout_texts(args.assets, [r["text"] for r in records], args.heldout, args.seed)
    false = torch.tensor([r["false"] for r in records])

    # --- rankings ---------------------------------------------------------------------------
    task = CausalLMTask(add_bos=False)  # trained without a BOS token
    from influscope.analyzer import Influence

    inf = Influence(model, task, modules="mlp", tokenizer=tokenizer, device="cpu")
    train = inf.encode(records, truncate=True)
    queries = inf.encode(
        [{"prompt": q["prompt"], "completion": q["completion"]} for q in benchmark]
    )
    t1 = time.perf_counter()
    factors = inf.fit(train.subset(all_visits), FitConfig(curvature="ekfac"))
    rankings = {
        name: rank_by_influence(
            model,
            task,
            train,
            queries,
            factors=factors,
            score_config=ScoreConfig(query_rank=None, normalize=normalize),
        )
        for name, normalize in (("influence", None), ("influence (RelatIF)", "relatif"))
    }
    t_rank = time.perf_counter() - t1
    losses = sequence_losses(model, task, train)
    n_tokens = torch.tensor([len(e["input_ids"]) - 1 for e in train.examples], dtype=torch.float64)
    mean_token_loss = losses / n_tokens

    # --- retraining -------------------------------------------------------------------------
    def recipe(kept, seed):
        return train_cached_free(records, tokenizer, settings, visits_of(kept), seed)

    def visits_of(kept):
        return [
            i
            for i in kept
            for _ in range(settings.fact_repeats if records[i].get("fact_id") else 1)
        ]

    def measure(m):
        lp = evaluate_queries(m, tokenizer, benchmark).logprob
        return torch.tensor([*lp, token_nll(m, tokenizer, heldout)], dtype=torch.float64)

    harness = RetrainingHarness(
        recipe,
        measure,
        n_train=n,
        out_dir=out,
        workers=args.workers,
        tag=f"curation n_facts={args.n_facts} false={args.false_facts} chunks={args.n_chunks} "
        f"epochs={args.epochs} seed={args.seed}",
    )
    seeds = list(range(args.seed, args.seed + args.seeds))
    plans: list[tuple[str, float, int, list[int]]] = [("none", 0.0, s, []) for s in seeds]
    for frac in args.fractions:
        for s in seeds:
            for name, r in rankings.items():
                plans.append((name, frac, s, harmful_subset(r.total, frac)))
            plans.append(("random", frac, s, random_subset(n, frac, 1000 + s)))
            if s == seeds[0]:  # one seed: the baseline's subset does not depend on it
                plans.append(("highest loss", frac, s, highest_loss_subset(mean_token_loss, frac)))
    jobs = [
        Job.make([i for i in range(n) if i not in set(removed)], s) for _, _, s, removed in plans
    ]
    t2 = time.perf_counter()
    measured = harness.measure_jobs(jobs)  # (J, Q + 1)
    t_retrain = time.perf_counter() - t2

    rows = []
    for (method, frac, s, removed), values in zip(plans, measured):
        rows.append(
            {
                "method": method,
                "fraction": frac,
                "seed": s,
                "n_removed": len(removed),
                "false_removed": int(false[removed].sum()) if removed else 0,
                "benchmark_loss": float(-values[:-1].mean()),
                "heldout_ppl": float(torch.exp(values[-1])),
            }
        )
    base = query_metrics(model, tokenizer, benchmark)
    result = {
        "command": COMMAND,
        "settings": vars(args),
        "n_train": n,
        "n_false": int(false.sum()),
        "original_benchmark_loss": -base["logprob"],
        "false_fraction_of_removed": {
            name: {
                str(f): float(false[harmful_subset(r.total, f)].float().mean())
                for f in args.fractions
            }
            for name, r in rankings.items()
        },
        "false_rank_positions": {
            name: sorted(torch.argsort(torch.argsort(r.total))[false].tolist())
            for name, r in rankings.items()
        },
        "rows": rows,
        "seconds": {
            "train": t_train,
            "rank": t_rank,
            "retrain": t_retrain,
            "total": time.perf_counter() - t0,
        },
    }
    atomic_write_json(out / "results.json", result)
    (out / "table.md").write_text(table(result))
    print(table(result))
    return 0


def train_cached_free(records, tokenizer, settings, subset, seed):
    """The retraining recipe: :func:`influscope.training.train_lm` with the demo settings."""
    from influscope.demo.train import make_gpt2_config, train_lm

    config = make_gpt2_config(
        tokenizer, n_layer=settings.n_layer, n_embd=settings.n_embd, n_head=settings.n_head,
        n_positions=settings.n_positions,
    )  # fmt: skip
    return train_lm(
        records, tokenizer, config, epochs=settings.epochs, lr=settings.lr,
        weight_decay=settings.weight_decay, batch_size=settings.batch_size, seed=seed,
        subset=subset,
    ).model  # fmt: skip


def table(result: dict) -> str:
    """Markdown: mean over seeds of the benchmark loss per method and removed fraction."""
    rows = result["rows"]
    none = [r for r in rows if r["method"] == "none"]
    lines = [
        f"{result['n_train']} training sequences, {result['n_false']} of them false facts "
        f"({100 * result['n_false'] / result['n_train']:.1f} %). Benchmark loss of the model "
        f"trained on everything: {sum(r['benchmark_loss'] for r in none) / len(none):.3f} "
        f"(mean of {len(none)} seeds).",
        "",
        "| removed | method | benchmark loss (mean ± half-range over seeds) | false facts removed | held-out ppl |",
        "|---|---|---|---|---|",
    ]
    fractions = sorted({r["fraction"] for r in rows if r["fraction"] > 0})
    for frac in fractions:
        for method in ("influence", "influence (RelatIF)", "random", "highest loss"):
            sel = [r for r in rows if r["method"] == method and r["fraction"] == frac]
            losses = [r["benchmark_loss"] for r in sel]
            mean = sum(losses) / len(losses)
            half = (max(losses) - min(losses)) / 2
            fr = sum(r["false_removed"] for r in sel) / len(sel)
            ppl = sum(r["heldout_ppl"] for r in sel) / len(sel)
            lines.append(
                f"| {frac:.0%} ({sel[0]['n_removed']}) | {method} | {fmt(mean, 3)} ± {fmt(half, 3)} | "
                f"{fr:.1f} / {result['n_false']} | {fmt(ppl, 1)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
