"""Unit tests of the evaluation metrics, configs, harness storage and baselines."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from influscope import ConfigError, DataError, Influence, StaleArtifactError
from influscope.evaluation import (
    BrittlenessConfig,
    Job,
    LDSConfig,
    MislabelConfig,
    PBRFConfig,
    RetrainingHarness,
    bm25,
    brittleness,
    found_at,
    gradient_cosine,
    gradient_dot,
    hidden_states,
    lds_score,
    lds_subsets,
    representation_similarity,
    roc_auc,
    spearman,
    tracin,
)
from influscope.reference import flatten, per_example_gradients
from influscope.toy import VectorClassificationTask, make_classification, train_mlp


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 40).astype(float)  # ties on purpose
    y = rng.random(40) < 0.3
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(s[y], s[~y])]
    assert roc_auc(s, y) == pytest.approx(np.mean(pairs))
    assert roc_auc(y.astype(float), y) == 1.0
    with pytest.raises(DataError, match="positives and negatives"):
        roc_auc(s, np.zeros(40))


def test_found_at():
    s = np.arange(10.0)
    y = np.zeros(10)
    y[[9, 8, 0]] = 1
    assert found_at(s, y, 0.2) == pytest.approx(2 / 3)
    assert found_at(s, y, 1.0) == 1.0


def test_lds_score_of_an_exact_linear_datamodel_is_one():
    rng = np.random.default_rng(0)
    tau = rng.normal(size=(3, 50))
    masks = lds_subsets(50, LDSConfig(n_subsets=30, fraction=0.5))
    assert masks.shape == (30, 50) and bool((masks.sum(1) == 25).all())
    measured = masks.numpy() @ tau.T + 7.0  # f(θ_S) = Σ_{i∈S} τ_i + constant
    np.testing.assert_allclose(lds_score(tau, masks, measured), 1.0)
    np.testing.assert_allclose(lds_score(-tau, masks, measured), -1.0)  # the sign matters
    with pytest.raises(DataError, match="Shapes do not agree"):
        lds_score(tau, masks, measured.T)


def test_spearman_constant_is_nan():
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: LDSConfig(n_subsets=2), "n_subsets must be ≥ 3, received 2"),
        (lambda: LDSConfig(fraction=1.0), r"fraction must be in \(0, 1\), received 1.0"),
        (lambda: MislabelConfig(fraction=0.0), r"fraction must be in \(0, 1\), received 0.0"),
        (lambda: PBRFConfig(epsilon=0), "epsilon must be > 0, received 0"),
        (lambda: PBRFConfig(newton="bfgs"), "newton must be 'exact' or 'gauss_newton'"),
    ],
)
def test_configs_are_validated(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_job_key_is_order_free_and_harness_refuses_another_setup(tmp_path):
    assert Job.make([3, 1, 2], 0).key == Job.make([1, 2, 3], 0).key != Job.make([1, 2, 3], 1).key
    data = make_classification(n=16, n_queries=2)
    task = VectorClassificationTask()

    def recipe(subset, seed):
        return train_mlp(data.x, data.y, subset, seed, steps=5)

    def measure(m):
        return task.measurement(m, task.collate(data.queries().examples))

    h = RetrainingHarness(recipe, measure, 16, tmp_path, tag="a")
    out = h.measure_jobs([Job.make(range(8), 0), Job.make(range(8), 0)])
    assert out.shape == (2, 2) and h.trained == 1
    with pytest.raises(StaleArtifactError, match="another setup"):
        RetrainingHarness(recipe, measure, 16, tmp_path, tag="b")
    with pytest.raises(DataError, match="indices in"):
        h.measure_jobs([Job.make([0, 16], 0)])


def test_brittleness_shares_random_removals_and_checks_query_rows():
    data = make_classification(n=24, n_queries=3)
    task = VectorClassificationTask()

    def recipe(subset, seed):
        return train_mlp(data.x, data.y, subset, seed, steps=5)

    def measure(m):
        return task.measurement(m, task.collate(data.queries().examples))  # (3,)

    h = RetrainingHarness(recipe, measure, 24)
    config = BrittlenessConfig(ks=(2, 4))
    tau = torch.randn(2, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = brittleness(h, tau, config)  # 2 of the 3 measured queries
    assert first.top.shape == first.random.shape == (2, 2) and h.trained == 1 + 2 * 2 * 2
    second = brittleness(h, -tau, config)  # another estimator (its top = first's bottom)
    assert torch.equal(first.random, second.random)
    assert h.trained == 9 + 2 * 2  # only its own top-k removals were retrained
    assert not torch.equal(first.top, second.top)
    with pytest.raises(DataError, match="query rows"):
        brittleness(h, torch.zeros(4, 24), config)


def test_gradient_baselines_match_per_example_autograd():
    data = make_classification(n=12, n_queries=2)
    task = VectorClassificationTask()
    model = train_mlp(data.x, data.y, steps=20)
    train, queries = data.train(), data.queries()
    inf = Influence(model, task, modules=["l1", "l3"])
    g = flatten(per_example_gradients(model, task, inf.layers, train), inf.layers)  # (N, P)
    q = flatten(per_example_gradients(model, task, inf.layers, queries, "measurement"), inf.layers)
    dot = -(q @ g.T)
    torch.testing.assert_close(gradient_dot(inf, queries, train).pairwise, dot)
    cos = dot / (q.norm(dim=1)[:, None] * g.norm(dim=1)[None])
    torch.testing.assert_close(gradient_cosine(inf, queries, train).pairwise, cos)
    ti = tracin(
        [(model, 0.5), (model, 1.5)], lambda m: Influence(m, task, ["l1", "l3"]), queries, train
    )
    torch.testing.assert_close(ti.pairwise, 2.0 * dot)


def test_bm25_and_representation_similarity(gpt2, lm_data):
    s = bm25(["the cat sat", "unknownword"], ["a cat sat here", "dogs run", "the cat"])
    assert s.shape == (2, 3)
    assert s[0, 0] > 0 and s[0, 1] == 0 and bool((s[1] == 0).all())
    from influscope.tasks import CausalLMTask

    h = hidden_states(gpt2, lm_data, CausalLMTask(), batch_size=4)
    assert h.shape == (len(lm_data), 16)
    sim = representation_similarity(h[:3], h, lm_data).pairwise
    torch.testing.assert_close(sim[:, :3].diagonal(), torch.ones(3, dtype=torch.float64))
