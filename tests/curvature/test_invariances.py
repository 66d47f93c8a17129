"""Invariances: batch size, decompositions that sum to the total, self vs pairwise diagonal,
low-rank query batching, GPT-2 Conv1D vs nn.Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.metrics import spearman


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2(n_embd=16)
    train = random_lm_data(14, seed=1)
    queries = random_lm_data(4, seed=2, prompt_len=3)
    inf = Influence(model, "causal_lm", modules="all")
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4))
    return inf, train, queries, op


def test_fit_and_scores_independent_of_batch_size(setup):
    inf, train, queries, op = setup
    op1 = inf.fit(train, FitConfig(curvature="ekfac", batch_size=1))
    for name in op.eigenvalues:
        torch.testing.assert_close(
            op1.eigenvalues[name], op.eigenvalues[name], rtol=1e-7, atol=1e-12
        )
    s1 = inf.score(queries, train, op, ScoreConfig(batch_size=1, query_rank=None)).pairwise
    s5 = inf.score(queries, train, op, ScoreConfig(batch_size=5, query_rank=None)).pairwise
    torch.testing.assert_close(s1, s5, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cache_mb", [0.0, 0.3])
def test_replay_cache_gives_identical_factors(setup, cache_mb):
    """EK-FAC's second pass replayed from memory (default) equals recomputing it (0 MiB), and
    a budget that holds only some shards (0.3 MiB) replays those and recomputes the rest."""
    inf, train, _, _ = setup
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4, shard_size=4))
    assert inf.last_fit_shards["replayed"] == 4  # 14 examples → 4 shards, all replayed
    ref = inf.fit(
        train, FitConfig(curvature="ekfac", batch_size=4, shard_size=4, cache_mb=cache_mb)
    )
    assert inf.last_fit_shards["replayed"] == (0 if cache_mb == 0 else 2)
    for name in op.eigenvalues:
        assert torch.equal(ref.eigenvalues[name], op.eigenvalues[name]), name
        assert torch.equal(ref.q_a[name], op.q_a[name]), name


def test_per_layer_terms_sum_to_total(setup):
    inf, train, queries, op = setup
    s = inf.score(queries, train, op, ScoreConfig(per_layer=True, query_rank=None))
    assert s.per_layer.shape == (4, 14, len(inf.layers))
    torch.testing.assert_close(s.per_layer.sum(-1), s.pairwise, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 3])
def test_per_token_terms_sum_to_sequence_score(setup, rank):
    inf, train, queries, op = setup
    cfg = ScoreConfig(query_rank=rank)
    pq = inf.precondition(queries, op, cfg)
    if rank is not None:  # exercise the factored path too
        pq.factors = {
            n: __import__("influscope.linalg", fromlist=["low_rank"]).low_rank(pq.matrix(n), rank)
            for n in pq.layer_names
        }
        pq.dense = {}
    total = inf.score(pq, train, op, cfg).pairwise
    tokens = inf.token_scores(pq, train, op, cfg)
    assert len(tokens) == len(train)
    for m, t in enumerate(tokens):
        assert t.shape == (4, train.examples[m]["input_ids"].numel())
        torch.testing.assert_close(t.sum(-1), total[:, m], rtol=1e-9, atol=1e-11)


def test_self_influence_equals_pairwise_diagonal(setup):
    inf, train, _, op = setup
    self_inf = inf.self_influence(train, op)
    pairwise = inf.score(train, train, op, ScoreConfig(query_rank=None)).pairwise
    torch.testing.assert_close(self_inf, torch.diagonal(pairwise), rtol=1e-9, atol=1e-12)
    assert (self_inf > 0).all()


def test_low_rank_queries_track_full_rank(setup):
    inf, train, queries, op = setup
    full = inf.score(queries, train, op, ScoreConfig(query_rank=None)).pairwise
    low = inf.score(queries, train, op, ScoreConfig(query_rank=4)).pairwise
    for q in range(full.shape[0]):
        assert spearman(full[q], low[q]) > 0.8
    same = inf.score(queries, train, op, ScoreConfig(query_rank=10_000)).pairwise
    torch.testing.assert_close(same, full)


def _to_linear(model: nn.Module) -> nn.Module:
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1]).to(child.weight.dtype)
                lin.weight.data.copy_(child.weight.data.t())
                lin.bias.data.copy_(child.bias.data)
                setattr(module, child_name, lin)
    return model


def test_conv1d_equals_linear():
    train = random_lm_data(10, seed=4)
    queries = random_lm_data(3, seed=5, prompt_len=2)
    scores = []
    for convert in (False, True):
        model = tiny_gpt2(n_embd=16, seed=7)
        if convert:
            model = _to_linear(model)
            assert not any(isinstance(m, Conv1D) for m in model.modules())
        inf = Influence(model, "causal_lm", modules="all")
        op = inf.fit(train, FitConfig(curvature="ekfac"))
        scores.append(inf.score(queries, train, op, ScoreConfig(per_layer=True)).per_layer)
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-8, atol=1e-10)
