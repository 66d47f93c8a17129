"""Randomized low-rank queries (``ScoreConfig(query_svd="randomized")``): exact when the sketch
covers the matrix, near-optimal on a decaying spectrum, seeded (deterministic), and scores that
track the exact truncated SVD."""

from __future__ import annotations

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import ConfigError, FitConfig, Influence, ScoreConfig
from influscope.linalg import low_rank
from influscope.metrics import spearman
from influscope.modules.passes import layer_passes


def _rank_r(p: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    return (u[..., :r] * s[:, None, :r]) @ vh[:, :r]


def test_randomized_is_exact_when_the_sketch_covers_the_matrix():
    p = torch.randn(3, 12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, v = low_rank(p, 5, "randomized")  # sketch width min(5 + 8, 12, 7) = 7 = full
    assert u.shape == (3, 5, 12) and v.shape == (3, 5, 7)
    torch.testing.assert_close(u.transpose(1, 2) @ v, _rank_r(p, 5), rtol=1e-10, atol=1e-10)


def test_randomized_is_near_optimal_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(1)
    qa, _ = torch.linalg.qr(torch.randn(4, 300, 120, dtype=torch.float64, generator=g))
    qb, _ = torch.linalg.qr(torch.randn(4, 120, 120, dtype=torch.float64, generator=g))
    sigma = 0.85 ** torch.arange(120, dtype=torch.float64)
    p = (qa * sigma) @ qb.transpose(1, 2)  # (4, 300, 120), σ_k = 0.85^k
    u, v = low_rank(p, 16, "randomized")
    err = (p - u.transpose(1, 2) @ v).flatten(1).norm(dim=1)
    best = (p - _rank_r(p, 16)).flatten(1).norm(dim=1)
    assert (err / best).max() < 1.01, err / best
    again = low_rank(p, 16, "randomized")
    assert torch.equal(again[0], u) and torch.equal(again[1], v)  # seeded


def test_randomized_scores_track_the_exact_svd():
    model = tiny_gpt2(n_embd=32)  # c_fc 33 → 128, c_proj 129 → 32: rank 4 + 8 < 32
    train = random_lm_data(16, seed=1)
    queries = random_lm_data(4, seed=2, prompt_len=3)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4))
    exact = inf.score(queries, train, op, ScoreConfig(query_rank=4)).pairwise
    fast = inf.score(queries, train, op, ScoreConfig(query_rank=4, query_svd="randomized"))
    for q in range(len(queries)):
        assert spearman(fast.pairwise[q], exact[q]) > 0.99
    torch.testing.assert_close(fast.pairwise, exact, rtol=0.05, atol=0.02 * exact.abs().max())
    with pytest.raises(ConfigError, match="query_svd must be"):
        ScoreConfig(query_svd="lanczos")


def test_auto_is_randomized_only_on_wide_layers():
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(2, 200, 170, dtype=torch.float64, generator=g)  # 4 · (32 + 8) ≤ 170
    small = torch.randn(2, 150, 120, dtype=torch.float64, generator=g)  # 160 > 120
    for a, b in zip(low_rank(wide, 32, "auto"), low_rank(wide, 32, "randomized")):
        assert torch.equal(a, b)
    for a, b in zip(low_rank(small, 32, "auto"), low_rank(small, 32, "exact")):
        assert torch.equal(a, b)
    assert ScoreConfig().query_svd == "auto"


def test_kronecker_operators_take_the_svd_in_their_eigenbasis():
    """``U_X Q_S^⊤``, ``V_X Q_A^⊤`` from the SVD of the rotated, divided gradient reconstruct the
    same rank-r matrix as the SVD of the back-rotated one (float64)."""
    model = tiny_gpt2(n_embd=16)
    train = random_lm_data(12, seed=1)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4))
    _, grads, _ = next(
        iter(layer_passes(inf.model, inf.task, inf.layers, train, batch_size=4, objective="loss"))
    )
    for name, lb in grads.items():
        g = lb.gradient()
        u, v = op.precondition_low_rank(name, g, 3, "exact")
        uu, vv = low_rank(op.precondition(name, g), 3, "exact")
        torch.testing.assert_close(
            u.transpose(1, 2) @ v, uu.transpose(1, 2) @ vv, rtol=1e-9, atol=1e-11
        )
