"""Curvature operators against dense references (exact-influence agreement: test_exact_influence)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence
from influscope.reference import ekfac_eigenvalues, per_example_gradients


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
