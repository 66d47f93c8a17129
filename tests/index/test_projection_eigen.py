"""Eigen-coordinate selection (``IndexConfig(init="eigen")``): the kept coordinates are the
largest ``Λ/(Λ+λ)`` over all layers; the index equals the dense truncated-EK-FAC reference in
float64; at full budget it is unprojected EK-FAC; stale factors and missing factors are refused."""

from __future__ import annotations

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import (
    ConfigError,
    DataError,
    FitConfig,
    Influence,
    ScoreConfig,
    StaleArtifactError,
)
from influscope.index import IndexConfig, build_index, preconditioned_queries
from influscope.modules.passes import layer_passes
from influscope.projection import EigenSelection
from influscope.reference import truncated_ekfac_influence


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2(n_embd=16)  # float64; c_fc 17 → 64, c_proj 65 → 16
    train = random_lm_data(24, seed=1)
    queries = random_lm_data(4, seed=2, prompt_len=3)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    op = inf.fit(train, FitConfig(curvature="ekfac", fisher="empirical", batch_size=4))
    exact = inf.score(queries, train, op, ScoreConfig(query_rank=None)).pairwise
    return inf, train, queries, op, exact


def _scores(inf, train, queries, root, config, factors):
    index = build_index(inf.tracked, train, root, config, factors=factors)
    q = preconditioned_queries(inf.tracked, queries, index)
    return index, index.search(q, k=3, return_all=True)[1]


def test_selection_keeps_the_largest_ratios_over_all_layers(setup):
    inf, _, _, op, _ = setup
    budget = 300
    sel = EigenSelection.from_operator(op, inf.layers, budget, torch.float64)
    assert sum(sel.size(n) for n in sel.layer_names) == budget
    kept, dropped = [], []
    for layer in inf.layers:
        n = layer.name
        lam = op.eigenvalues[n].double().clamp_min(0).flatten()
        ratio = lam / (lam + op.damping[n])
        mask = torch.zeros_like(ratio, dtype=torch.bool)
        mask[sel.coords[n]] = True
        kept.append(ratio[mask])
        dropped.append(ratio[~mask])
        torch.testing.assert_close(sel.eigenvalues[n], lam[sel.coords[n]])
    assert torch.cat(kept).min() >= torch.cat(dropped).max()
    assert all(sel.size(n) >= 1 for n in sel.layer_names)


def test_kept_coordinates_are_the_rotated_gradient(setup):
    inf, train, _, op, _ = setup
    sel = EigenSelection.from_operator(op, inf.layers, 300, torch.float64)
    _, grads, _ = next(
        iter(layer_passes(inf.model, inf.task, inf.layers, train, batch_size=4, objective="loss"))
    )
    got = sel.gradients(grads)
    for name, lb in grads.items():
        rotated = op.rotate(name, lb.gradient().double()).flatten(1)  # (B, out·in)
        torch.testing.assert_close(got[name], rotated[:, sel.coords[name]], rtol=1e-10, atol=1e-12)


def test_eigen_index_equals_the_dense_truncated_reference(setup, tmp_path):
    inf, train, queries, op, _ = setup
    cfg = IndexConfig(k_in=8, k_out=8, init="eigen", dtype="float32", batch_size=4)
    index, scores = _scores(inf, train, queries, tmp_path / "idx", cfg, op)
    sel = EigenSelection.from_operator(op, inf.layers, index.meta["dim"], torch.float64)
    assert index.meta["dim"] == sum(min(8, t.out_dim) * min(8, t.in_dim) for t in inf.layers)
    ref = truncated_ekfac_influence(inf.model, inf.task, inf.layers, train, queries, op, sel.coords)
    # float32 storage of the training rows is the only approximation
    torch.testing.assert_close(scores.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())


def test_full_budget_eigen_index_is_unprojected_ekfac(setup, tmp_path):
    inf, train, queries, op, exact = setup
    cfg = IndexConfig(k_in=10_000, k_out=10_000, init="eigen", dtype="float32", batch_size=4)
    _, scores = _scores(inf, train, queries, tmp_path / "idx", cfg, op)
    torch.testing.assert_close(scores.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max())


def test_eigen_needs_factors_and_refuses_stale_ones(setup, tmp_path):
    inf, train, _, op, _ = setup
    cfg = IndexConfig(k_in=4, k_out=4, init="eigen", batch_size=4)
    with pytest.raises(ConfigError, match="none were given"):
        build_index(inf.tracked, train, tmp_path / "a", cfg)
    with pytest.raises(ConfigError, match="needs a fitted 'kfac' or 'ekfac'"):
        diag = inf.fit(train, FitConfig(curvature="diagonal", batch_size=4))
        build_index(inf.tracked, train, tmp_path / "b", cfg, factors=diag)
    with pytest.raises(ConfigError, match="curvature must be 'ekfac'"):
        IndexConfig(init="eigen", curvature="identity")
    build_index(inf.tracked, train, tmp_path / "c", cfg, factors=op)
    other = inf.fit(train, FitConfig(curvature="ekfac", damping_factor=0.5, batch_size=4))
    with pytest.raises(StaleArtifactError, match="factors"):
        build_index(inf.tracked, train, tmp_path / "c", cfg, factors=other)
    index = build_index(inf.tracked, train, tmp_path / "c", cfg, factors=other, overwrite=True)
    assert index.n_rows == len(train)


def test_facade_builds_and_queries_an_eigen_index(setup, tmp_path):
    inf, train, queries, op, exact = setup
    cfg = IndexConfig(k_in=10_000, k_out=10_000, init="eigen", dtype="float32", batch_size=4)
    with pytest.raises(DataError, match="run_dir"):
        inf.build_index(train, cfg, op)
    index = inf.build_index(train, cfg, op, root=tmp_path / "idx")
    top = inf.query_index(queries, index, k=3)
    assert top.indices[:, 0].tolist() == exact.argmax(dim=1).tolist()


def test_dry_run_estimate_counts_the_eigenvectors(setup):
    from influscope.resources import estimate

    inf, train, *_ = setup
    dims = [(t.in_dim, t.out_dim) for t in inf.layers]
    lo = {e.stage: e for e in estimate(inf, train, index=IndexConfig(k_in=8, k_out=8))}
    eig = {
        e.stage: e for e in estimate(inf, train, index=IndexConfig(k_in=8, k_out=8, init="eigen"))
    }
    vectors = 4 * sum(i * i + o * o for i, o in dims)
    assert eig["index"].disk - lo["index"].disk == vectors
    assert eig["index"].memory - lo["index"].memory == vectors + 4 * 8 * max(i * o for i, o in dims)
