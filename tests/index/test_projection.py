"""LoGra projection: the projected gradient equals ``P_out ∇W P_in^⊤``; with PCA projections of
full width the projected EK-FAC index reproduces unprojected EK-FAC scores; with narrow
Gaussian projections the ranking stays close."""

from __future__ import annotations

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import ConfigError, FitConfig, Influence, ScoreConfig
from influscope.index import IndexConfig, build_index, preconditioned_queries
from influscope.metrics import spearman
from influscope.modules.passes import layer_passes
from influscope.projection import LograProjector


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2(n_embd=16)
    train = random_lm_data(24, seed=1)
    queries = random_lm_data(4, seed=2, prompt_len=3)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4))
    exact = inf.score(queries, train, op, ScoreConfig(query_rank=None)).pairwise
    return inf, train, queries, op, exact


def test_projected_gradient_is_projection_of_full_gradient(setup):
    inf, train, _, _, _ = setup
    proj = LograProjector.gaussian(inf.layers, k_in=5, k_out=7, seed=3)
    _, grads, _ = next(
        iter(layer_passes(inf.model, inf.task, inf.layers, train, batch_size=4, objective="loss"))
    )
    projected = proj.gradients(grads)
    for name, lb in grads.items():
        p_in, p_out = proj.p_in[name].double(), proj.p_out[name].double()
        expected = p_out @ lb.gradient() @ p_in.t()  # (B, k_out, k_in)
        assert projected[name].shape == (4, 7, 5)
        torch.testing.assert_close(projected[name], expected, rtol=1e-10, atol=1e-12)
    again = LograProjector.gaussian(inf.layers, k_in=5, k_out=7, seed=3)
    assert all(torch.equal(again.p_in[n], proj.p_in[n]) for n in proj.p_in)


def _index_scores(inf, train, queries, tmp_path, config, factors=None):
    index = build_index(inf.tracked, train, tmp_path / "idx", config, factors=factors)
    q = preconditioned_queries(inf.tracked, queries, index)
    _, full = index.search(q, k=3, return_all=True)
    return full


def test_full_width_pca_projection_reproduces_ekfac(setup, tmp_path):
    inf, train, queries, op, exact = setup
    cfg = IndexConfig(k_in=10_000, k_out=10_000, init="pca", dtype="float32", batch_size=4)
    full = _index_scores(inf, train, queries, tmp_path, cfg, factors=op)
    # An orthogonal change of basis: same EK-FAC up to float32 storage of the gradients.
    torch.testing.assert_close(full.double(), exact, rtol=2e-3, atol=2e-3 * exact.abs().max())


def test_full_width_orthogonal_projection_is_exact_and_gaussian_is_not(tmp_path):
    """``P P^⊤ = I``: at full width the projected EK-FAC is a change of basis (exact scores);
    a square Gaussian ``P`` turns the damping into ``λ̃ (P^⊤P)^{-1}`` and changes the scores."""
    model = tiny_gpt2(n_embd=16)
    train, queries = random_lm_data(24, seed=1), random_lm_data(4, seed=2, prompt_len=3)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    op = inf.fit(train, FitConfig(curvature="ekfac", fisher="empirical", batch_size=4))
    exact = inf.score(queries, train, op, ScoreConfig(query_rank=None)).pairwise
    kw = {"k_in": 10_000, "k_out": 10_000, "fisher": "empirical", "dtype": "float32"}
    orth = _index_scores(inf, train, queries, tmp_path / "o", IndexConfig(**kw, batch_size=4))
    torch.testing.assert_close(orth.double(), exact, rtol=2e-3, atol=2e-3 * exact.abs().max())
    proj = LograProjector.orthogonal(inf.layers, 5, 7, seed=3)
    for name in proj.p_in:
        torch.testing.assert_close(proj.p_in[name] @ proj.p_in[name].t(), torch.eye(5))
    cfg = IndexConfig(**kw, init="gaussian", batch_size=4)
    gauss = _index_scores(inf, train, queries, tmp_path / "g", cfg)
    assert (gauss.double() - exact).abs().max() > 0.05 * exact.abs().max()


def test_narrow_projection_keeps_the_ranking(setup, tmp_path):
    inf, train, queries, _, exact = setup
    # widths: c_fc 17 → 64, c_proj 65 → 16; 16 × 16 keeps 6 % of c_fc's and c_proj's entries
    cfg = IndexConfig(k_in=16, k_out=16, dtype="float16", batch_size=4)
    full = _index_scores(inf, train, queries, tmp_path, cfg)
    rho = [spearman(full[q].double(), exact[q]) for q in range(len(queries))]
    assert min(rho) > 0.8 and sum(rho) / len(rho) > 0.88, rho


def test_pca_needs_kronecker_factors(setup):
    inf, *_ = setup
    with pytest.raises(ConfigError, match="PCA initialisation needs"):
        LograProjector.pca(object.__new__(type("Op", (), {"name": "diagonal"})), inf.layers, 4, 4)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        IndexConfig(dtype="int8")
