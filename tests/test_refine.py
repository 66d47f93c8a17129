"""EK-FAC-preconditioned refinement towards the joint damped Gauss-Newton influence (float64)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.errors import ConfigError, NumericalError
from influscope.reference import (
    exact_gauss_newton,
    exact_influence,
    flatten,
    per_example_gradients,
)
from influscope.solvers import GaussNewtonProduct, refine_queries
from influscope.tasks import CausalLMTask

TASK = CausalLMTask()


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2(n_embd=8, n_layer=1, vocab=16, n_positions=16)
    train = random_lm_data(6, vocab=16, min_len=3, max_len=6, seed=1)
    queries = random_lm_data(2, vocab=16, min_len=3, max_len=6, seed=2)
    inf = Influence(model, TASK, modules="all")
    factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4, damping_factor=0.1))
    gnh = exact_gauss_newton(model, TASK, inf.layers, train)
    return model, train, queries, inf, factors, gnh


def test_gnh_product_matches_dense(setup):
    model, train, _, inf, factors, gnh = setup
    assert any(layer.has_bias for layer in inf.layers)
    product = GaussNewtonProduct(model, TASK, inf.layers, factors.damping, batch_size=4)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3, gnh.shape[0], dtype=torch.float64, generator=gen)
    fast, dense = product.gauss_newton(v, train), v @ gnh
    # CausalLMTask computes its cross-entropy in float32 (``logits.float()``), so the loss
    # Hessian of both the reference and the product carries float32 rounding (~1e-7 relative).
    assert float((fast - dense).norm() / dense.norm()) < 1e-6


def test_zero_steps_equal_plain_ekfac(setup):
    _, train, queries, inf, factors, _ = setup
    plain = inf.score(queries, train, factors, ScoreConfig(query_rank=None)).pairwise
    zero = inf.score(queries, train, factors, ScoreConfig(query_rank=None, refine_steps=0))
    torch.testing.assert_close(zero.pairwise, plain, rtol=0, atol=0)


def test_cg_moves_towards_exact(setup):
    # On this tiny model EK-FAC starts at a relative residual ~10 and CG converges slowly
    # (30 steps: ~0.07); full convergence to 1e-6 was not reached in the time available.
    model, train, queries, inf, factors, gnh = setup
    exact = exact_influence(model, TASK, inf.layers, train, queries, factors.damping, gnh)
    plain = inf.score(queries, train, factors, ScoreConfig(query_rank=None)).pairwise
    cfg = ScoreConfig(query_rank=None, refine_steps=30, refine_tol=1e-12)
    pq = inf.precondition(queries, factors, cfg, train)
    est = inf.score(pq, train, factors, cfg).pairwise
    assert float((est - exact).norm()) < float((plain - exact).norm())
    assert pq.refine_residuals.shape == (len(queries), 31)
    assert bool((pq.refine_residuals[:, -1] < 0.1 * pq.refine_residuals[:, 0]).all())


def test_batch_size_invariance(setup):
    _, train, queries, inf, factors, _ = setup
    out = [
        inf.score(
            queries, train, factors, ScoreConfig(query_rank=None, refine_steps=3, batch_size=b)
        ).pairwise
        for b in (1, 4)
    ]
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-12)


def test_bad_input(setup):
    model, train, queries, inf, factors, _ = setup
    with pytest.raises(ConfigError, match="refine_steps must be ≥ 0"):
        ScoreConfig(refine_steps=-1)
    with pytest.raises(ConfigError, match="refine must be 'cg' or 'neumann'"):
        ScoreConfig(refine="lbfgs")
    with pytest.raises(ConfigError, match="needs the training data"):
        inf.precondition(queries, factors, ScoreConfig(refine_steps=2))
    with pytest.raises(ConfigError, match="needs fitted factors"):
        inf.precondition(queries, None, ScoreConfig(refine_steps=2), train)
    product = GaussNewtonProduct(model, TASK, inf.layers, factors.damping, batch_size=4)
    q = per_example_gradients(model, TASK, inf.layers, queries, "measurement")
    start = {n: factors.precondition(n, g) for n, g in q.items()}
    with pytest.raises(NumericalError, match=r"diverged for query .* layer"):
        refine_queries(product, factors, q, start, train, steps=20, method="neumann", alpha=50.0)
    assert flatten(q, inf.layers).shape[0] == len(queries)
