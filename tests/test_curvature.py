"""Curvature operators against dense references, and influence against the exact GNH oracle."""

from __future__ import annotations

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2, train_lm
from influscope import FitConfig, Influence, ScoreConfig
from influscope.reference import (
    ekfac_eigenvalues,
    exact_influence,
    per_example_gradients,
)
from influscope.tasks import EncodedDataset


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "diagonal"])
def test_precondition_equals_dense_solve(curvature):
    model = tiny_gpt2(n_embd=8)
    inf = Influence(model, "causal_lm", modules="mlp")
    data = random_lm_data(10)
    op = inf.fit(data, FitConfig(curvature=curvature))
    g = torch.randn(3, inf.layers[0].out_dim, inf.layers[0].in_dim, dtype=torch.float64)
    name = inf.layers[0].name
    fast = op.precondition(name, g)
    dense = op.dense(name)
    ref = torch.linalg.solve(dense, g.reshape(3, -1).t()).t().reshape_as(g)
    torch.testing.assert_close(fast, ref, rtol=1e-8, atol=1e-10)
    # the quadratic form agrees with the preconditioned inner product
    torch.testing.assert_close(op.quadratic(name, g), (g * fast).sum((-2, -1)))


def test_ekfac_eigenvalues_match_per_example_reference():
    model = tiny_gpt2(n_embd=8)
    inf = Influence(model, "causal_lm", modules="mlp")
    data = random_lm_data(10)
    op = inf.fit(data, FitConfig(curvature="ekfac", seed=11, batch_size=3))
    grads = per_example_gradients(model, inf.task, inf.layers, data, "loss", sample_seed=11)
    for layer in inf.layers:
        ref = ekfac_eigenvalues(grads[layer.name], op.q_a[layer.name], op.q_s[layer.name])
        torch.testing.assert_close(op.eigenvalues[layer.name], ref, rtol=1e-8, atol=1e-12)


def test_kfac_eigenbasis_matches_covariances():
    """Q_A diagonalises the token covariance of activations computed by hand."""
    model = tiny_gpt2(n_embd=8)
    inf = Influence(model, "causal_lm", modules="mlp")
    data = random_lm_data(6)
    op = inf.fit(data, FitConfig(curvature="kfac"))
    layer = inf.layers[0]
    acts = []
    hook = layer.module.register_forward_hook(lambda m, i, o: acts.append(i[0].detach()))
    with torch.no_grad():
        for ex in data.examples:
            model(input_ids=ex["input_ids"][None])
    hook.remove()
    a = torch.cat([torch.cat([x[0], torch.ones(x.shape[1], 1, dtype=x.dtype)], 1) for x in acts])
    cov = a.t() @ a / a.shape[0]
    q = op.q_a[layer.name]
    rotated = q.t() @ cov @ q
    off = rotated - torch.diag(torch.diagonal(rotated))
    assert off.abs().max() < 1e-8 * rotated.abs().max()


@pytest.fixture(scope="module")
def trained_small():
    model = tiny_gpt2(n_embd=8, n_layer=2, vocab=16, n_positions=16, seed=1)
    train = random_lm_data(24, vocab=16, min_len=6, max_len=10, seed=2)
    train_lm(model, train, steps=400, lr=1e-2, weight_decay=0.05)
    queries = random_lm_data(6, vocab=16, min_len=6, max_len=10, seed=3, prompt_len=3)
    return model, train, queries


def test_kfac_and_ekfac_track_exact_gauss_newton_influence(trained_small):
    model, train, queries = trained_small
    inf = Influence(model, "causal_lm", modules="mlp")
    # Many label samples per sequence reduce the Monte Carlo noise of the true Fisher.
    reps = 16
    repeated = EncodedDataset(train.examples * reps, indices=list(range(reps * len(train))))
    results = {}
    for curvature in ("kfac", "ekfac"):
        op = inf.fit(repeated, FitConfig(curvature=curvature, seed=0))
        damping = op.damping
        est = inf.score(queries, train, op, ScoreConfig(query_rank=None)).pairwise
        exact = exact_influence(model, inf.task, inf.layers, train, queries, damping)
        results[curvature] = sum(pearson(est[q], exact[q]) for q in range(len(queries))) / len(
            queries
        )
        # absolute scale, not only correlation
        ratio = float((est * exact).sum() / exact.square().sum())
        assert 0.5 < ratio < 1.5, (curvature, ratio)
    assert results["kfac"] >= 0.9, results
    assert results["ekfac"] >= 0.9, results
    assert results["ekfac"] >= results["kfac"] - 1e-3, results
