"""The validation bank: subsets, resume, staleness, determinism, and the scores against it.

All recipes are float64 toys (``bank_toys``): a weighted least-squares fine-tune by gradient
descent, and a planted recipe whose measurement is exactly linear in the weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bank_toys import FINGERPRINTS, Held, PlantedRecipe, RegressionRecipe, measure
from torch import nn

from influscope.errors import ConfigError, DataError, StaleArtifactError
from influscope.evaluation import BankConfig, BankScore, ScoreBankConfig, build_bank, score_bank
from influscope.evaluation.bank import drop_sets, load_bank
from influscope.evaluation.bank_report import report_section
from influscope.evaluation.bank_score import _column_spearman
from influscope.metrics import spearman
from influscope.scoring.pairwise import Scores

CFG = BankConfig(fractions=(0.1, 0.5), subsets=4, seed=3)


def _exact_attribution(recipe: RegressionRecipe) -> torch.Tensor:
    """A first-order attribution of the toy fine-tune: ``−∇f_qᵀ H⁻¹ ∇L_i`` at θ (Q, N)."""
    theta = recipe(torch.ones(recipe.x.shape[0], dtype=torch.float64)).theta.detach()
    g, q = recipe.gradients(theta)  # (N, d), (Q, d)
    h = 2 * recipe.x.T @ recipe.x / recipe.x.shape[0]  # (d, d)
    return -q @ torch.linalg.solve(h, g.T)  # (Q, N)


def test_the_vectorised_column_spearman_equals_the_metric() -> None:
    gen = np.random.default_rng(0)
    x, y = gen.normal(size=(7, 5)), gen.normal(size=(7, 5))
    x[3, 1] = x[5, 1]  # a tie
    y[:, 4] = 2.0  # a constant column
    got = _column_spearman(x, y)
    want = [spearman(x[:, q], y[:, q]) for q in range(5)]
    np.testing.assert_allclose(got[:4], want[:4], rtol=1e-12)
    assert np.isnan(got[4]) and np.isnan(want[4])


def test_drop_sets_are_reproducible_and_independent_of_other_fractions() -> None:
    masks, which = drop_sets(40, CFG)
    assert masks.shape == (8, 40) and which.tolist() == [0] * 4 + [1] * 4
    assert masks[:4].sum(1).tolist() == [4.0] * 4 and masks[4:].sum(1).tolist() == [20.0] * 4
    assert len({tuple(r.tolist()) for r in masks}) == 8  # distinct subsets
    alone, _ = drop_sets(40, BankConfig(fractions=(0.5,), subsets=4, seed=3))
    assert torch.equal(alone, masks[4:])
    other, _ = drop_sets(40, BankConfig(fractions=(0.1, 0.5), subsets=4, seed=4))
    assert not torch.equal(other, masks)


def test_zero_fine_tune_steps_give_the_constant_prediction_result_exactly(tmp_path) -> None:
    # with no training step every retrain is the starting point: the measured change is 0 on
    # every subset, so Spearman is undefined for every query: LDS is NaN, flagged as constant,
    # n = 0, and the removal test measures exactly 0 change
    recipe = RegressionRecipe(steps=0)
    bank = build_bank(recipe, measure, 20, FINGERPRINTS, CFG, tmp_path)
    assert torch.equal(bank.measured, bank.full.expand_as(bank.measured))
    tau = torch.randn(4, 20, dtype=torch.float64)
    result = score_bank(
        bank, tau, config=ScoreBankConfig(top_k=(2,)), recipe=recipe, measure=measure
    )
    for row in result.lds:
        assert np.isnan(row.mean) and np.isnan(row.sem) and row.n == 0
        assert row.constant_queries == 4 and all(np.isnan(v) for v in row.per_query)
        assert np.isnan(row.subset_se)
    (rem,) = result.removal
    assert rem.per_query_top == [0.0] * 4 and rem.per_query_random == [0.0] * 4
    assert rem.top_below_random == 0.0
    payload = result.to_json()
    assert payload["lds"][0]["mean"] is None and json.dumps(payload)  # strict JSON, no NaN
    assert "undefined (constant)" in report_section(result).html


def test_planted_linear_recipe_gives_lds_one_for_the_exact_attribution() -> None:
    recipe = PlantedRecipe(n=30, q=3)
    bank = build_bank(recipe, measure, 30, FINGERPRINTS, CFG)
    exact = score_bank(bank, recipe.a / 30)
    for row in exact.lds:
        assert row.per_query == [1.0, 1.0, 1.0] and row.mean == 1.0 and row.n == 3
        assert row.subset_se == 0.0  # every resample of the subsets still ranks perfectly
    # the sign matters: the negated attribution is perfectly wrong
    assert all(r.mean == -1.0 for r in score_bank(bank, -recipe.a).lds)
    gen = torch.Generator().manual_seed(1)
    shuffled = recipe.a[:, torch.randperm(30, generator=gen)]
    assert all(r.mean < 0.9 for r in score_bank(bank, shuffled).lds)
    # removal: dropping the top-k proponents changes f by minus their summed A exactly
    res = score_bank(
        bank, recipe.a, config=ScoreBankConfig(top_k=(3,)), recipe=recipe, measure=measure
    )
    top3 = recipe.a.sort(dim=1, descending=True).values[:, :3].sum(1)  # (Q,)
    torch.testing.assert_close(
        torch.tensor(res.removal[0].per_query_top, dtype=torch.float64),
        -top3,
        rtol=1e-12,
        atol=1e-12,
    )
    assert res.removal[0].top_below_random == 1.0


def test_a_real_toy_fine_tune_ranks_a_first_order_attribution_above_a_shuffled_one() -> None:
    recipe = RegressionRecipe(n=20, steps=200, lr=0.2)  # converged: influence functions apply
    bank = build_bank(recipe, measure, 20, FINGERPRINTS, BankConfig((0.1, 0.5), 6))
    good = score_bank(bank, _exact_attribution(recipe))
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    bad = score_bank(bank, _exact_attribution(recipe)[:, perm])
    for g, b in zip(good.lds, bad.lds):
        assert g.mean > 0.8 and g.mean > b.mean + 0.3, (g.mean, b.mean)


def test_an_interrupted_build_resumes_with_only_the_missing_retrains(tmp_path) -> None:
    class Killed(RegressionRecipe):
        def __call__(self, weights):
            if self.calls == 5:  # 2 full runs + 3 subsets done, then "killed"
                raise KeyboardInterrupt("killed")
            return super().__call__(weights)

    with pytest.raises(KeyboardInterrupt, match="killed"):
        build_bank(Killed(), measure, 20, FINGERPRINTS, CFG, tmp_path)
    assert not (tmp_path / "bank" / "bank").exists()  # no half-written stage
    again = RegressionRecipe()
    resumed = build_bank(again, measure, 20, FINGERPRINTS, CFG, tmp_path)
    assert again.calls == 8 - 3  # the full runs and 3 subsets were loaded
    reference = build_bank(RegressionRecipe(), measure, 20, FINGERPRINTS, CFG)
    assert torch.equal(resumed.measured, reference.measured)
    assert torch.equal(resumed.full, reference.full)
    assert not (tmp_path / "bank" / ".bank.partial").exists()  # cleared once saved
    loaded = RegressionRecipe()
    assert torch.equal(
        build_bank(loaded, measure, 20, FINGERPRINTS, CFG, tmp_path).measured, reference.measured
    )
    assert loaded.calls == 0
    assert torch.equal(load_bank(tmp_path).dropped, reference.dropped)


class _NoTraining:
    def __call__(self, weights):
        raise AssertionError("trained although the request should be refused first")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"fingerprints": {**FINGERPRINTS, "data": "d1"}}, "data"),
        ({"fingerprints": {**FINGERPRINTS, "model": "m1"}}, "model"),
        ({"fingerprints": {**FINGERPRINTS, "queries": "q1"}}, "queries"),
        ({"config": BankConfig((0.1, 0.5), 5, seed=3)}, "config"),
    ],
)
def test_a_stale_bank_is_refused_before_any_training(tmp_path, change, named) -> None:
    build_bank(RegressionRecipe(), measure, 20, FINGERPRINTS, CFG, tmp_path)
    kwargs = {"fingerprints": FINGERPRINTS, "config": CFG, **change}
    with pytest.raises(StaleArtifactError, match=rf"different {named}.*--overwrite"):
        build_bank(_NoTraining(), measure, 20, bank_dir=tmp_path, **kwargs)


@pytest.mark.parametrize(
    ("fractions", "message"),
    [((0.01, 0.5), r"removes 0 rows.*at least one"), ((0.5, 0.99), r"removes all 20")],
)
def test_fractions_removing_nothing_or_everything_are_refused_before_work(
    tmp_path, fractions, message
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_bank(_NoTraining(), measure, 20, FINGERPRINTS, BankConfig(fractions), tmp_path)
    assert not tmp_path.joinpath("bank").exists()


class _DropoutRecipe:
    """A fine-tune that leaves dropout on (unseeded masks): two runs differ."""

    def __call__(self, weights):
        gen = torch.Generator().manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1)).double()
        for p in net.parameters():
            nn.init.normal_(p, generator=gen)
        x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            (weights[:, None] * net(x) ** 2).sum().backward()
            opt.step()
        net.eval()
        return Held(net(x[:2]).detach().reshape(-1))


class _NoisyRecipe:
    def __call__(self, weights):
        return Held(weights[:2] + torch.rand(2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("recipe", "cause"),
    [(_DropoutRecipe(), r"dropout is on"), (_NoisyRecipe(), r"unseeded randomness")],
)
def test_a_nondeterministic_recipe_is_refused_naming_the_cause(tmp_path, recipe, cause) -> None:
    if isinstance(recipe, _DropoutRecipe):  # the model the recipe returns carries the dropout

        def with_dropout(weights, inner=recipe):
            model = inner(weights)
            model.drop = nn.Dropout(0.5)
            return model

        recipe = with_dropout
    kept = []
    with pytest.raises(ConfigError, match=rf"not deterministic.*{cause}.*Nothing was stored"):
        build_bank(
            recipe,
            measure,
            10,
            FINGERPRINTS,
            BankConfig((0.2,), 3),
            tmp_path,
            keep_full=kept.append,
        )
    assert not any(tmp_path.rglob("*")) and not kept  # no stage, partial store or saved model


def _bank_and_scores(tmp_path):
    recipe = RegressionRecipe()
    bank = build_bank(recipe, measure, 20, FINGERPRINTS, CFG, tmp_path)
    tau = torch.randn(4, 20, dtype=torch.float64)
    scores = Scores(tau, [], list(range(20)), measurements=bank.full.clone())
    return bank, scores


@pytest.mark.parametrize("key", ["data", "queries"])
def test_scores_of_other_data_or_queries_are_refused(tmp_path, key) -> None:
    bank, scores = _bank_and_scores(tmp_path)
    meta = {**{k: FINGERPRINTS[k] for k in ("data", "queries")}, key: "other"}
    with pytest.raises(StaleArtifactError, match=rf"other {key} than the bank.*validate build"):
        score_bank(bank, scores, meta)
    assert score_bank(bank, scores, {k: FINGERPRINTS[k] for k in ("data", "queries")}).lds


def test_scores_of_another_model_or_shape_are_refused(tmp_path) -> None:
    bank, scores = _bank_and_scores(tmp_path)
    scores.measurements = bank.full + 0.1
    with pytest.raises(StaleArtifactError, match=r"another model than the bank's full fine-tune"):
        score_bank(bank, scores)
    with pytest.raises(DataError, match=r"4 queries × 20 training rows.*\(4, 19\)"):
        score_bank(bank, torch.zeros(4, 19))


def test_removal_needs_a_recipe_and_k_below_n(tmp_path) -> None:
    bank, scores = _bank_and_scores(tmp_path)
    with pytest.raises(ConfigError, match=r"pass the bank's recipe and measure"):
        score_bank(bank, scores, config=ScoreBankConfig(top_k=(2,)))
    with pytest.raises(ConfigError, match=r"below N = 20"):
        score_bank(
            bank,
            scores,
            config=ScoreBankConfig(top_k=(20,)),
            recipe=RegressionRecipe(),
            measure=measure,
        )


def test_removal_retrains_resume_and_the_result_round_trips(tmp_path) -> None:
    bank, scores = _bank_and_scores(tmp_path)
    cfg = ScoreBankConfig(top_k=(1, 3), removal_queries=2)
    first = RegressionRecipe()
    a = score_bank(bank, scores, config=cfg, recipe=first, measure=measure, bank_dir=tmp_path)
    # (top, random) × 2 ks × 2 queries, of which identical removal sets are trained once
    stored = list((tmp_path / "bank" / "removals" / "retrains").glob("*.json"))
    assert 4 < first.calls == len(stored) <= 8
    second = RegressionRecipe()
    b = score_bank(bank, scores, config=cfg, recipe=second, measure=measure, bank_dir=tmp_path)
    assert second.calls == 0 and b.to_json() == a.to_json()
    path = a.save(tmp_path / "v.json")
    assert BankScore.load(path).to_json() == a.to_json()
