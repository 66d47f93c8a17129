"""Iterative (refitted-curvature) Newton unlearning and automatic layer selection."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_lm_data, saved_lm_corpus, tiny_gpt2, train_lm
from influscope import ConfigError, DataError, FitConfig, Influence
from influscope.applications.unlearn import (
    UnlearnConfig,
    auto_layer_count,
    sequence_losses,
    unlearn,
)
from influscope.modules.selection import select_layers
from influscope.reference import DenseBlockOperator, exact_gauss_newton
from influscope.tasks import CausalLMTask
from influscope.toy import VectorClassificationTask, make_classification, train_mlp

FORGET = [0, 1, 2]


@pytest.fixture(scope="module")
def lm():
    data = random_lm_data(24, seed=1)
    model = train_lm(tiny_gpt2(), data, steps=60, lr=1e-2)
    task = CausalLMTask()
    factors = Influence(model, task, modules="mlp", device="cpu").fit(data, FitConfig())
    return model, data, task, factors


def _mean_change(model, edited, task, data):
    return float((sequence_losses(edited, task, data) - sequence_losses(model, task, data)).mean())


def test_zero_rounds_change_nothing(lm):
    model, data, task, factors = lm
    config = UnlearnConfig(method="iterative", rounds=0)
    res = unlearn(model, task, data, FORGET, factors=factors, config=config)
    for p, q in zip(model.parameters(), res.model.parameters()):
        assert torch.equal(p, q)
    assert res.report.rounds == [] and res.report.method == "iterative"
    assert res.report.forget_loss_after == pytest.approx(res.report.forget_loss_before)


def test_one_round_is_the_newton_step(lm):
    """rounds=1, no retain term, no bound, no refit: exactly the one-step Newton edit."""
    model, data, task, factors = lm
    newton = unlearn(model, task, data, FORGET, factors=factors, config=UnlearnConfig(scale=0.5))
    config = UnlearnConfig(method="iterative", rounds=1, refit_every=0, scale=0.5)
    it = unlearn(model, task, data, FORGET, factors=factors, config=config)
    assert it.report.stop_reason == "rounds" and len(it.report.rounds) == 1
    for p, q in zip(newton.model.parameters(), it.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for name, delta in newton.step.items():
        torch.testing.assert_close(it.step[name], delta, rtol=1e-8, atol=1e-10)


def test_iterative_forgets_more_at_the_same_retain_budget(lm):
    """Floor: at the retain-loss change the one-step Newton edit costs, the iterative method
    (forget gradient and curvature recomputed each round) raises the forget loss further."""
    model, data, task, factors = lm
    forget, retain = data.subset(FORGET), data.subset(range(3, len(data)))
    one = unlearn(model, task, data, FORGET, factors=factors, config=UnlearnConfig(scale=1.0))
    one_forget = _mean_change(model, one.model, task, forget)
    budget = max(_mean_change(model, one.model, task, retain), 1e-3)
    config = UnlearnConfig(
        method="iterative", rounds=4, scale=1.0, retain_weight=1.0, max_retain_increase=budget
    )
    it = unlearn(model, task, data, FORGET, factors=factors, config=config)
    it_forget = _mean_change(model, it.model, task, forget)
    it_retain = _mean_change(model, it.model, task, retain)
    assert it_retain <= budget + 1e-9
    assert it_forget > 1.5 * one_forget > 0, (it_forget, one_forget, it.report.rounds)
    assert len(it.report.rounds) >= 2
    # The report's losses are the measured ones.
    assert it.report.retain_loss_after - it.report.retain_loss_before == pytest.approx(it_retain)


def test_stops_at_the_forget_target(lm):
    model, data, task, factors = lm
    config = UnlearnConfig(method="iterative", rounds=6, scale=1.0, forget_target=0.5)
    res = unlearn(model, task, data, FORGET, factors=factors, config=config)
    assert res.report.stop_reason == "forget target"
    gain = res.report.rounds[-1]["forget_loss"] - res.report.forget_loss_before / len(FORGET)
    assert gain >= 0.5
    assert all(
        r["forget_loss"] - res.report.forget_loss_before / 3 < 0.5 for r in res.report.rounds[:-1]
    )


def test_forget_target_waits_for_the_retain_repair(lm):
    """With stop_retain_increase the run stops at the first round that meets *both* rules."""
    model, data, task, factors = lm
    base = dict(method="iterative", rounds=8, scale=1.0, retain_weight=1.0, forget_target=0.5)
    plain = unlearn(model, task, data, FORGET, factors=factors, config=UnlearnConfig(**base))
    r0 = plain.report.retain_loss_before
    first = plain.report.rounds[-1]
    bound = 0.9 * (first["retain_loss"] - r0)  # the plain stop's retain change fails this bound
    assert bound > 0
    config = UnlearnConfig(**base, stop_retain_increase=bound)
    both = unlearn(model, task, data, FORGET, factors=factors, config=config)
    rounds = both.report.rounds
    assert len(rounds) > len(plain.report.rounds)
    f0 = both.report.forget_loss_before / len(FORGET)
    assert both.report.stop_reason == "forget target"
    assert rounds[-1]["forget_loss"] - f0 >= 0.5 and rounds[-1]["retain_loss"] - r0 <= bound
    for r in rounds[:-1]:
        assert r["forget_loss"] - f0 < 0.5 or r["retain_loss"] - r0 > bound
    with pytest.raises(ConfigError, match="forget_target is None"):
        UnlearnConfig(method="iterative", stop_retain_increase=1.0)


def test_auto_layer_count_rule():
    shares = {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.1}
    assert auto_layer_count(shares, 0.8) == 2  # b + c
    assert auto_layer_count(shares, 0.5) == 1
    assert auto_layer_count(shares, 0.85) == 3
    assert auto_layer_count(shares, 1.0) == 4


def test_top_layers_auto_edits_the_covering_layers(lm):
    model, data, task, factors = lm
    config = UnlearnConfig(top_layers="auto", coverage=0.6)
    res = unlearn(model, task, data, FORGET, factors=factors, config=config)
    shares = res.report.layer_shares
    ranked = sorted(shares, key=shares.get, reverse=True)
    k = auto_layer_count(shares, 0.6)
    assert sorted(res.report.edited_layers) == sorted(ranked[:k])
    assert sum(shares[n] for n in res.report.edited_layers) >= 0.6
    assert sum(shares[n] for n in ranked[: k - 1]) < 0.6
    edited = dict(res.model.named_modules())
    for name, module in model.named_modules():
        if name in shares and name not in res.report.edited_layers:
            assert torch.equal(edited[name].weight, module.weight)


def test_bad_input(lm):
    model, data, task, factors = lm
    with pytest.raises(ConfigError, match="Unknown unlearning method 'sgd'"):
        UnlearnConfig(method="sgd")
    with pytest.raises(ConfigError, match="integer ≥ 1 or 'auto'"):
        UnlearnConfig(top_layers="most")
    with pytest.raises(ConfigError, match="integer ≥ 1 or 'auto'"):
        UnlearnConfig(top_layers=0)
    with pytest.raises(ConfigError, match="rounds must be ≥ 0"):
        UnlearnConfig(method="iterative", rounds=-1)
    with pytest.raises(ConfigError, match="refit_every must be ≥ 0"):
        UnlearnConfig(refit_every=-2)
    with pytest.raises(ConfigError, match="coverage must be in"):
        UnlearnConfig(top_layers="auto", coverage=1.5)
    with pytest.raises(ConfigError, match="max_retain_increase must be None or a number > 0"):
        UnlearnConfig(max_retain_increase=0.0)
    config = UnlearnConfig(method="iterative", retain_weight=1.0)
    with pytest.raises(DataError, match="needs a retain set"):
        unlearn(model, task, data, data.subset([0]), factors=factors, config=config)
    with pytest.raises(DataError, match="Retain indices"):
        unlearn(model, task, data, [0], factors=factors, config=config, retain=[99])
    toy = make_classification(n=32, seed=0)
    mlp, train = train_mlp(toy.x, toy.y, steps=50), toy.train()
    toy_task = VectorClassificationTask()
    layers = select_layers(mlp, ["l3"])
    op = DenseBlockOperator(layers, exact_gauss_newton(mlp, toy_task, layers, train), 1e-3)
    with pytest.raises(ConfigError, match="not a fittable curvature"):
        unlearn(
            mlp,
            toy_task,
            train,
            [0],
            factors=op,
            modules=["l3"],
            config=UnlearnConfig(method="iterative", rounds=2),
        )


def test_cli_iterative(tmp_path):
    from transformers import AutoModelForCausalLM

    from influscope.cli import main

    model_dir, train = saved_lm_corpus(tmp_path)
    out = tmp_path / "edited"
    argv = [
        "unlearn", str(model_dir), "--train", str(train), "--forget", "0,2", "--out", str(out),
        "--method", "iterative", "--rounds", "2", "--top-layers", "auto", "--retain-weight", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "unlearn.json").read_text())
    assert report["method"] == "iterative" and 1 <= len(report["rounds"]) <= 2
    assert report["forget_loss_after"] > report["forget_loss_before"]
    assert report["retain_loss_before"] is not None
    shares = report["layer_shares"]
    assert sum(shares[n] for n in report["edited_layers"]) >= 0.8
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    edited = AutoModelForCausalLM.from_pretrained(out)
    changed = {
        n
        for (n, p), q in zip(original.named_parameters(), edited.parameters())
        if not torch.equal(p, q)
    }
    assert changed and all(any(n.startswith(e) for e in report["edited_layers"]) for n in changed)
    with pytest.raises(SystemExit, match="2"):
        main([*argv[:8], "--top-layers", "most"])
