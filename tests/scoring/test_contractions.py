"""The scoring contractions written as matrix products match their ``einsum`` definitions
(float64): layer terms ``-Σ_{o,i} q̃_{qoi} g_{boi}`` and the per-head row/column sums."""

from __future__ import annotations

import pytest
import torch

from influscope.modules.capture import LayerBatch
from influscope.scoring.heads import _line_terms
from influscope.scoring.pairwise import layer_terms, token_terms
from influscope.scoring.queries import PreconditionedQueries


def _case(n_q: int = 3, b: int = 4, t: int = 5, out_dim: int = 6, in_dim: int = 7):
    g = torch.Generator().manual_seed(0)
    lb = LayerBatch(
        torch.randn(b, t, in_dim, generator=g, dtype=torch.float64),
        torch.randn(b, t, out_dim, generator=g, dtype=torch.float64),
        None,
    )
    q = torch.randn(n_q, out_dim, in_dim, generator=g, dtype=torch.float64)
    return PreconditionedQueries(["w"], dense={"w": q}), q, lb


def test_layer_terms_equal_einsum_and_token_sum():
    pq, q, lb = _case()
    got = layer_terms(pq, "w", lb)  # (Q, B)
    ref = -torch.einsum("qoi,bto,bti->qb", q, lb.s, lb.a)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(token_terms(pq, "w", lb).sum(-1), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_head_line_terms_equal_einsum(axis):
    pq, q, lb = _case()
    g = torch.einsum("bto,bti->boi", lb.s, lb.a)
    spec = "qoi,boi->qbo" if axis == "out" else "qoi,boi->qbi"
    got = _line_terms(pq, "w", lb, axis)
    torch.testing.assert_close(got, -torch.einsum(spec, q, g), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.sum(-1), layer_terms(pq, "w", lb), rtol=1e-12, atol=1e-12)
