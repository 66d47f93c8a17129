"""Hooked per-example gradients against an autograd loop (float64)."""

from __future__ import annotations

import pytest
import torch

from conftest import hooked, random_lm_data, tiny_gpt2
from influscope.modules import select_layers
from influscope.modules.passes import layer_passes
from influscope.reference import per_example_gradients
from influscope.tasks import CausalLMTask


@pytest.mark.parametrize("objective,seed", [("loss", None), ("loss", 3), ("measurement", None)])
def test_per_example_gradients_match_autograd(objective, seed):
    model = tiny_gpt2()
    task = CausalLMTask()
    layers = select_layers(model, "all")
    data = random_lm_data(7, prompt_len=2)
    fast = hooked(model, task, layers, data, objective, seed)
    ref = per_example_gradients(model, task, layers, data, objective, seed)
    for name in fast:
        err = (fast[name] - ref[name]).norm() / ref[name].norm()
        assert err < 1e-6, (name, float(err))


def test_gradients_do_not_depend_on_batch_size():
    model = tiny_gpt2()
    task = CausalLMTask()
    layers = select_layers(model, "mlp")
    data = random_lm_data(9)
    g1 = hooked(model, task, layers, data, "loss", 5, batch_size=1)
    g4 = hooked(model, task, layers, data, "loss", 5, batch_size=4)
    for name in g1:
        torch.testing.assert_close(g1[name], g4[name], rtol=1e-9, atol=1e-11)


def test_no_parameter_grad_is_touched():
    model = tiny_gpt2()
    layers = select_layers(model, "mlp")
    list(hooked(model, CausalLMTask(), layers, random_lm_data(3)).values())
    assert all(p.grad is None for p in model.parameters())


def test_passes_run_in_eval_mode_and_restore_the_mode():
    """Dropout is off during a pass (eval mode) and the caller's mode comes back, also when the
    pass is abandoned early."""
    from influscope.modules.passes import eval_mode

    model = tiny_gpt2(n_embd=16).train()
    layers = select_layers(model, "mlp")
    passes = layer_passes(model, CausalLMTask(), layers, random_lm_data(4, seed=1), batch_size=2)
    next(passes)
    assert not model.training
    passes.close()
    assert model.training
    with eval_mode(model.eval()):
        pass
    assert not model.training
