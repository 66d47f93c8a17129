"""On the demo model (tiny GPT-2 trained on Shakespeare + planted facts, as `make demo`):
planted facts are attributed to their own sequences, rank-32 query batching matches full rank,
and bfloat16 autocast keeps the ranking of float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from influscope import FitConfig, Influence, ScoreConfig
from influscope.demo.pipeline import direct_fact_queries, planted_top1
from influscope.metrics import spearman

ASSETS = Path(__file__).resolve().parents[2] / ".cache" / "assets"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.assets,
    pytest.mark.skipif(
        not (ASSETS / "shakespeare").is_dir(),
        reason="Shakespeare texts not fetched: run `make assets`",
    ),
]


@pytest.fixture(scope="module")
def demo():
    from influscope.demo.corpus import build_demo_corpus, free_text_queries
    from influscope.demo.train import DemoTrainConfig, train_demo_model

    corpus = build_demo_corpus(ASSETS, n_facts=40, n_shakespeare_chunks=300, seed=0)
    model, tok, _ = train_demo_model(corpus, None, DemoTrainConfig(seed=0))
    inf = Influence(model, "causal_lm", modules="mlp", tokenizer=tok)
    train = inf.encode(corpus.records, truncate=True)
    records = direct_fact_queries(corpus) + free_text_queries()
    queries = inf.encode(records, truncate=True)
    factors = inf.fit(train, FitConfig(curvature="ekfac"))
    return inf, train, queries, records, factors


def test_planted_facts_rank_their_own_sequences_first(demo):
    inf, train, queries, records, factors = demo
    scores = inf.score(queries, train, factors, ScoreConfig(query_rank=32))
    hits = planted_top1(scores, train.records, records)
    assert len(hits) == 40
    assert sum(hits) / len(hits) >= 0.9, sum(hits) / len(hits)


def test_rank32_matches_full_rank(demo):
    inf, train, queries, _, factors = demo
    low = inf.score(queries, train, factors, ScoreConfig(query_rank=32)).pairwise
    full = inf.score(queries, train, factors, ScoreConfig(query_rank=None)).pairwise
    rho = [spearman(low[q], full[q]) for q in range(len(queries))]
    assert min(rho) >= 0.99, min(rho)


def test_bfloat16_autocast_keeps_float32_ranking(demo):
    inf, train, queries, _, factors = demo
    ref = inf.score(queries, train, factors, ScoreConfig(query_rank=32)).pairwise
    bf16_factors = inf.fit(train, FitConfig(curvature="ekfac", amp_dtype="bfloat16"))
    low = inf.score(
        queries, train, bf16_factors, ScoreConfig(query_rank=32, amp_dtype="bfloat16")
    ).pairwise
    assert torch.isfinite(low).all()
    rho = sum(spearman(low[q], ref[q]) for q in range(len(queries))) / len(queries)
    assert rho >= 0.96, rho
