"""Influence-based unlearning: float64 checks against dense solves, floors, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from benchmarks.unlearn_baselines import gradient_ascent, random_step
from conftest import random_lm_data, saved_lm_corpus, tiny_gpt2, train_lm
from influscope import ConfigError, DataError, FitConfig, Influence
from influscope.applications.unlearn import UnlearnConfig, sequence_losses, unlearn
from influscope.modules.selection import select_layers
from influscope.reference import DenseBlockOperator, exact_gauss_newton, per_example_gradients
from influscope.tasks import CausalLMTask
from influscope.toy import VectorClassificationTask, make_classification, train_mlp

TOY_LAYERS = ["l1", "l2", "l3"]


@pytest.fixture(scope="module")
def toy():
    data = make_classification(n=96, seed=0)
    return train_mlp(data.x, data.y, steps=150), data.train()


@pytest.fixture(scope="module")
def lm():
    data = random_lm_data(24, seed=1)
    model = train_lm(tiny_gpt2(), data, steps=40, lr=1e-2)
    return model, data


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_newton_step_equals_dense_block_solve(toy, curvature):
    """Each layer's step is (s/N)(G_ℓ + λ_ℓ I)⁻¹ Σ_f ∇L (float64), written into [W b]."""
    model, train = toy
    task = VectorClassificationTask()
    before = _params(model)
    factors = Influence(model, task, modules=TOY_LAYERS, device="cpu").fit(
        train, FitConfig(curvature=curvature)
    )
    forget = [1, 7, 30]
    res = unlearn(
        model,
        task,
        train,
        forget,
        factors=factors,
        modules=TOY_LAYERS,
        config=UnlearnConfig(scale=0.5),
    )
    layers = select_layers(model, TOY_LAYERS)
    grads = per_example_gradients(model, task, layers, train.subset(forget))  # {ℓ: (F, out, in)}
    edited = dict(res.model.named_modules())
    for layer in layers:
        g = grads[layer.name].sum(0).reshape(-1)  # (out·in,)
        expected = 0.5 / len(train) * torch.linalg.solve(factors.dense(layer.name), g)
        torch.testing.assert_close(
            res.step[layer.name].reshape(-1), expected, rtol=1e-9, atol=1e-12
        )
        moved = layer.adapter.weight_out_in(edited[layer.name]) - layer.adapter.weight_out_in(
            layer.module
        )
        torch.testing.assert_close(moved, res.step[layer.name], rtol=1e-9, atol=1e-12)
    for n, p in model.named_parameters():  # the input model is left unchanged
        assert torch.equal(p, before[n])
    assert res.report.edited_layers == TOY_LAYERS
    assert sum(res.report.layer_shares.values()) == pytest.approx(1.0)


def test_exact_newton_step_single_layer(toy):
    """One tracked layer + the exact damped Gauss-Newton: the step is the exact Newton step."""
    model, train = toy
    task = VectorClassificationTask()
    layers = select_layers(model, ["l2"])
    gn = exact_gauss_newton(model, task, layers, train)  # (P, P)
    damping = 1e-3
    op = DenseBlockOperator(layers, gn, damping)
    forget = [0, 2, 4, 6]
    res = unlearn(model, task, train, forget, factors=op, modules=["l2"])
    g = per_example_gradients(model, task, layers, train.subset(forget))["l2"].sum(0).reshape(-1)
    expected = torch.linalg.solve(gn + damping * torch.eye(gn.shape[0], dtype=gn.dtype), g)
    torch.testing.assert_close(
        res.step["l2"].reshape(-1), expected / len(train), rtol=1e-8, atol=1e-12
    )


def test_conv1d_step_and_floors(lm):
    """GPT-2 Conv1D: dense-solve agreement, transposed write-back, and the floors.

    Floors a broken step fails: the Newton step raises the forget loss (a flipped sign lowers
    it) far more than a random direction with the same per-layer norms, more per sequence than
    on the retained sequences, and by about its first-order prediction at a small scale.
    """
    model, data = lm
    task = CausalLMTask()
    factors = Influence(model, task, modules="mlp", device="cpu").fit(data, FitConfig())
    forget, retain = [0, 1, 2], list(range(3, len(data)))
    res = unlearn(model, task, data, forget, factors=factors, config=UnlearnConfig(scale=1.0))
    layers = select_layers(model, "mlp")
    grads = per_example_gradients(model, task, layers, data.subset(forget))
    edited = dict(res.model.named_modules())
    for layer in layers:
        g = grads[layer.name].sum(0).reshape(-1)
        expected = torch.linalg.solve(factors.dense(layer.name), g) / len(data)
        torch.testing.assert_close(res.step[layer.name].reshape(-1), expected)
        n_in = layer.in_dim - 1
        dw = edited[layer.name].weight - layer.module.weight  # Conv1D stores (in, out)
        torch.testing.assert_close(dw.detach(), res.step[layer.name][:, :n_in].t())

    # Floors at a small scale, where the first-order term dominates (on this barely trained
    # model the s = 1 step is so long that any direction of its length raises every loss).
    small = unlearn(model, task, data, forget, factors=factors, config=UnlearnConfig(scale=0.05))
    base = sequence_losses(model, task, data)
    after = sequence_losses(small.model, task, data)
    forget_up = float((after[forget] - base[forget]).sum())
    assert forget_up > 0
    for seed in range(3):
        rand, _ = random_step(model, small.step, seed)
        rand_up = float((sequence_losses(rand, task, data)[forget] - base[forget]).sum())
        assert forget_up > 5 * abs(rand_up), (forget_up, rand_up)
    per_forget = forget_up / len(forget)
    per_retain = float((after[retain] - base[retain]).mean())
    assert per_forget > 3 * per_retain, (per_forget, per_retain)
    measured = small.report.forget_loss_after - small.report.forget_loss_before
    assert measured == pytest.approx(small.report.predicted_loss_increase, rel=0.15)


def test_layer_restriction_and_errors(lm):
    model, data = lm
    task = CausalLMTask()
    factors = Influence(model, task, modules="mlp", device="cpu").fit(data, FitConfig())
    res = unlearn(model, task, data, [0, 1], factors=factors, config=UnlearnConfig(top_layers=1))
    shares = res.report.layer_shares
    assert res.report.edited_layers == [max(shares, key=shares.get)]
    edited = dict(res.model.named_modules())
    for name, module in model.named_modules():
        if name in shares and name not in res.report.edited_layers:
            assert torch.equal(edited[name].weight, module.weight)
    for (n, p), q in zip(model.named_parameters(), res.model.parameters()):
        if "mlp" not in n:  # untracked parameters are never edited
            assert torch.equal(p, q)
    name = "transformer.h.1.mlp.c_proj"
    only = unlearn(
        model, task, data, [0], factors=factors, config=UnlearnConfig(layers=(name,), scale=2)
    )
    assert only.report.edited_layers == [name]
    with pytest.raises(ConfigError, match="not tracked"):
        unlearn(model, task, data, [0], factors=factors, config=UnlearnConfig(layers=("nope",)))
    with pytest.raises(DataError, match="outside"):
        unlearn(model, task, data, [99], factors=factors)
    with pytest.raises(ConfigError, match="scale"):
        UnlearnConfig(scale=0)
    with pytest.raises(ConfigError, match="not both"):
        UnlearnConfig(layers=(name,), top_layers=1)


def test_gradient_ascent_budget(lm):
    model, data = lm
    task = CausalLMTask()
    names = [layer.name for layer in select_layers(model, "mlp")]
    ga = gradient_ascent(model, task, data.subset([0, 1]), names, step_norm=0.3, steps=1)
    dist = sum(
        float((p - q).detach().square().sum()) for p, q in zip(ga.parameters(), model.parameters())
    )
    assert dist**0.5 == pytest.approx(0.3, rel=1e-6)
    base = sequence_losses(model, task, data.subset([0, 1])).sum()
    assert sequence_losses(ga, task, data.subset([0, 1])).sum() > base
    with pytest.raises(ConfigError, match="exactly one"):
        gradient_ascent(model, task, data, names)


def test_cli_unlearn_saves_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from influscope.cli import main

    model_dir, train = saved_lm_corpus(tmp_path)
    out = tmp_path / "edited"
    argv = [
        "unlearn", str(model_dir), "--train", str(train), "--forget", "0,2-3", "--out", str(out),
        "--scale", "2", "--top-layers", "1", "--run", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(argv) == 0
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    edited = AutoModelForCausalLM.from_pretrained(out)
    report = json.loads((out / "unlearn.json").read_text())
    assert report["n_forget"] == 3 and report["scale"] == 2.0
    assert len(report["edited_layers"]) == 1
    assert report["forget_loss_after"] > report["forget_loss_before"]
    changed = {
        n
        for (n, p), q in zip(original.named_parameters(), edited.parameters())
        if not torch.equal(p, q)
    }
    assert changed and all(n.startswith(report["edited_layers"][0]) for n in changed)
    assert (out / "tokenizer.json").exists()
    assert main(argv) == 2  # refuses to overwrite without --overwrite
    assert main([*argv, "--overwrite"]) == 0
    assert main([*argv[:4], "--forget", "99", "--out", str(tmp_path / "x")]) == 2


def test_inplace_edit(toy):
    model, train = toy
    model = copy.deepcopy(model)
    task = VectorClassificationTask()
    factors = Influence(model, task, modules=["l3"], device="cpu").fit(train, FitConfig())
    res = unlearn(model, task, train, [3], factors=factors, modules=["l3"], inplace=True)
    assert res.model is model
