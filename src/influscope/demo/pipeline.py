"""The embedded default (``make demo``): train a tiny GPT-2 on Shakespeare plus planted facts,
fit EK-FAC, attribute planted-fact and free-text queries, write a report and a summary.

Outputs in ``OUT``: ``model/`` (the trained model and tokenizer, Hugging Face format),
``factors/``, ``scores/`` (run stages), ``report.html``, ``summary.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from influscope.analyzer import Influence
from influscope.config import FitConfig, ScoreConfig
from influscope.demo.corpus import build_demo_corpus, free_text_queries
from influscope.demo.train import DemoTrainConfig, fixed_threads, train_demo_model
from influscope.metrics import spearman
from influscope.report import write_report
from influscope.report.build import build_report
from influscope.report.terminal import print_summary
from influscope.scoring.pairwise import Scores
from influscope.storage import atomic_write_json


def direct_fact_queries(corpus) -> list[dict]:
    """One query per planted fact in the wording it was taught.

    The prompt is the fact's first training sequence up to the answer, the completion the answer
    (no trailing punctuation): the model is asked to complete a fact it was trained on, and the
    question is which training sequence taught it. (The corpus' own queries use a lead-in no
    training sequence of the fact has; their figure is reported separately.)
    """
    facts = {f.fact_id: f for f in corpus.facts}
    queries = []
    for fact_id, fact in facts.items():
        positions = corpus.fact_indices(fact_id)
        if not positions:
            continue
        text = corpus.records[positions[0]]["text"]
        cut = text.find(fact.answer)
        if cut <= 0:
            continue
        queries.append(
            {
                "prompt": text[:cut].rstrip(" "),
                "completion": " " + fact.answer,
                "fact_id": fact_id,
                "style": "taught wording",
            }
        )
    return queries


def planted_top1(scores: Scores, train_records: list[dict], queries: list[dict]) -> list[bool]:
    """For each planted-fact query: does its top-ranked training sequence state that fact?"""
    hits = []
    for q, query in enumerate(queries):
        if query.get("fact_id") is None:
            continue
        top, _ = scores.top(q, 1)[0]
        hits.append(train_records[top].get("fact_id") == query["fact_id"])
    return hits


def run_demo(
    assets: str | Path = ".cache/assets",
    out: str | Path = "runs/demo",
    seed: int = 0,
    n_facts: int = 40,
    n_chunks: int = 300,
    train_settings: DemoTrainConfig | None = None,
    console: Console | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the demo end to end and return the summary written to ``OUT/summary.json``.

    ``threads`` fixes torch's CPU thread count for the whole run (restored afterwards): the
    trained weights, and with them ``planted_fact_top1``, depend on how reductions are split over
    threads, which by default follows the machine's core count (docs/design.md, "Reproducible
    demo"). ``None`` keeps torch's setting (faster on many cores, not reproducible across them).
    """
    with fixed_threads(threads):
        return _run_demo(assets, out, seed, n_facts, n_chunks, train_settings, console, threads)


def _run_demo(assets, out, seed, n_facts, n_chunks, train_settings, console, threads):
    console = console or Console()
    out = Path(out)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    corpus = build_demo_corpus(assets, n_facts=n_facts, n_shakespeare_chunks=n_chunks, seed=seed)
    console.print(
        f"[bold]corpus[/bold]: {len(corpus.records)} training sequences "
        f"({n_facts} planted facts), {len(corpus.queries)} planted-fact queries"
    )
    model, tokenizer, training = train_demo_model(
        corpus, out / "model", train_settings or DemoTrainConfig(seed=seed, threads=threads)
    )
    t_train = time.perf_counter() - t0
    console.print(
        f"[bold]trained[/bold] GPT-2 ({training['n_parameters']:,} parameters) in {t_train:.0f} s"
    )

    inf = Influence(model, "causal_lm", modules="mlp", run_dir=out, tokenizer=tokenizer)
    train = inf.encode(corpus.records, truncate=True)
    query_records = direct_fact_queries(corpus) + free_text_queries()
    heldout_records = list(corpus.queries)
    queries = inf.encode(query_records, truncate=True)

    t1 = time.perf_counter()
    factors = inf.fit(train, FitConfig(curvature="ekfac"), overwrite=True)
    t_fit = time.perf_counter() - t1
    config = ScoreConfig(query_rank=32, per_layer=True)
    t2 = time.perf_counter()
    pq = inf.precondition(queries, factors, config)
    scores = inf.score(pq, train, factors, config, name="scores", overwrite=True)
    t_score = time.perf_counter() - t2
    full = inf.score(queries, train, factors, ScoreConfig(query_rank=None))
    rank_agreement = [spearman(scores.pairwise[q], full.pairwise[q]) for q in range(len(queries))]

    hits = planted_top1(scores, train.records, query_records)
    heldout = inf.score(inf.encode(heldout_records, truncate=True), train, factors, config)
    heldout_hits = planted_top1(heldout, train.records, heldout_records)
    notes = []
    for q, rec in enumerate(query_records):
        if rec.get("fact_id") is None:
            notes.append({"kind": "free text"})
        else:
            top, _ = scores.top(q, 1)[0]
            correct = train.records[top].get("fact_id") == rec["fact_id"]
            notes.append(
                {
                    "kind": "planted fact",
                    "fact": str(rec["fact_id"]),
                    "top-1 states the fact": "yes" if correct else "no",
                }
            )
    summary = {
        "planted_fact_top1": sum(hits) / max(len(hits), 1),
        "n_planted_queries": len(hits),
        "planted_fact_top1_heldout_wording": sum(heldout_hits) / max(len(heldout_hits), 1),
        "n_free_text_queries": len(query_records) - len(hits),
        "n_train": len(train),
        "n_parameters": training["n_parameters"],
        "tracked_layers": inf.layer_names,
        "curvature": "ekfac",
        "torch_threads": torch.get_num_threads(),
        "damping": factors.damping,
        "rank32_vs_full_spearman_mean": sum(rank_agreement) / len(rank_agreement),
        "rank32_vs_full_spearman_min": min(rank_agreement),
        "answer_token_accuracy": training["queries"],
        "seconds": {
            "train": round(t_train, 1),
            "fit": round(t_fit, 1),
            "score": round(t_score, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
    }
    report = build_report(
        inf,
        queries,
        pq,
        train,
        factors,
        scores,
        title="influscope demo — tiny GPT-2 on Shakespeare with planted facts",
        overview={
            "model": f"GPT-2, {training['n_parameters']:,} parameters (trained here)",
            "training sequences": str(len(train)),
            "queries": f"{len(hits)} planted facts + {len(query_records) - len(hits)} free text",
            "curvature": "EK-FAC (true Fisher), damping 0.1 × mean eigenvalue",
            "tracked layers": ", ".join(inf.layer_names),
            "planted_fact_top1": f"{summary['planted_fact_top1']:.3f}",
        },
        top_k=5,
        notes=notes,
    )
    write_report(report, out / "report.html")
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "summary.json", summary)
    print_summary(report, console, per_query=1)
    console.print(
        f"planted_fact_top1 = [bold]{summary['planted_fact_top1']:.3f}[/bold]; "
        f"report → {out / 'report.html'}, summary → {out / 'summary.json'} "
        f"({summary['seconds']['total']:.0f} s)"
    )
    return summary
