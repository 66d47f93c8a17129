"""Query gradients rotated into a Kronecker eigenbasis from their token rows.

``Q_Sᵀ (Σ_t s_t ā_tᵀ) Q_A = Σ_t (Q_Sᵀ s_t)(Q_Aᵀ ā_t)ᵀ``: rotating the ``T`` token rows instead
of the ``(out, in)`` gradient is what makes query gradients cost about one forward + backward
plus the SVDs (SmolLM2-135M, 4 queries: the rotation was 61% of the ``query gradients`` time).
Both orders must give the same preconditioned queries (float64, tiny GPT-2).
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.curvature.eigen import factored_rotation_is_cheaper
from influscope.linalg import low_rank
from influscope.modules.passes import layer_passes
from influscope.scoring.queries import precondition_queries


@pytest.fixture(scope="module")
def fitted():
    model = tiny_gpt2(n_embd=16)  # c_fc 17 → 64, c_proj 65 → 16
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    op = inf.fit(random_lm_data(12, seed=1), FitConfig(curvature="ekfac", batch_size=4))
    return inf, op


def test_cost_rule_picks_token_rows_for_short_sequences():
    assert factored_rotation_is_cheaper(30, 1536, 576)  # SmolLM2 MLP, a one-line query
    assert not factored_rotation_is_cheaper(2000, 1536, 576)  # longer than the layer is wide
    assert factored_rotation_is_cheaper(6, 64, 17) and not factored_rotation_is_cheaper(31, 64, 17)


@pytest.mark.parametrize("length", [6, 31])  # token-row route, then the gradient route
def test_batch_rotation_equals_gradient_rotation(fitted, length):
    inf, op = fitted
    data = random_lm_data(3, min_len=length, max_len=length, seed=4)
    _, grads, _ = next(
        iter(layer_passes(inf.model, inf.task, inf.layers, data, batch_size=3, objective="loss"))
    )
    for name, lb in grads.items():
        g = lb.gradient()  # (3, out, in), float64
        assert g.dtype == torch.float64
        torch.testing.assert_close(
            op.rotate_batch(name, lb), op.rotate(name, g), rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            op.precondition_batch(name, lb), op.precondition(name, g), rtol=1e-10, atol=1e-12
        )
        u, v = op.precondition_low_rank_batch(name, lb, 3, "exact")
        uu, vv = low_rank(op.precondition(name, g), 3, "exact")
        torch.testing.assert_close(
            u.transpose(1, 2) @ v, uu.transpose(1, 2) @ vv, rtol=1e-9, atol=1e-11
        )


@pytest.mark.parametrize("rank", [None, 3])
def test_preconditioned_queries_match_the_gradient_route(fitted, rank):
    """precondition_queries (token rows) against ``P⁻¹ Σ_t s_t ā_tᵀ`` built the slow way."""
    inf, op = fitted
    queries = random_lm_data(5, seed=2, prompt_len=3)
    config = ScoreConfig(query_rank=rank, query_svd="exact", batch_size=2)
    pq = precondition_queries(inf.tracked, op, queries, config, dense_budget=0)
    expected: dict[str, list[torch.Tensor]] = {}
    for _, grads, _ in layer_passes(
        inf.model, inf.task, inf.layers, queries, batch_size=2, objective="measurement"
    ):
        for name, lb in grads.items():
            p = op.precondition(name, lb.gradient())  # (B, out, in)
            if rank is not None:
                u, v = low_rank(p, rank, "exact")
                p = u.transpose(1, 2) @ v
            expected.setdefault(name, []).append(p)
    for name, parts in expected.items():
        torch.testing.assert_close(pq.matrix(name), torch.cat(parts), rtol=1e-9, atol=1e-11)
    assert (rank is None) == (not pq.factors)
