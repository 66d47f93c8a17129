"""The deterministic fine-tune recipe against ordinary ``torch.optim`` runs (float64)."""

from __future__ import annotations

import copy

import pytest
import torch

from influscope.errors import ConfigError, DataError
from influscope.metagrad import Finetune, FinetuneConfig, batch_schedule, finetune, measure
from influscope.tasks import CausalLMTask
from influscope.toy import (
    MLP,
    VectorClassificationTask,
    make_classification,
    random_lm_data,
    tiny_gpt2,
)


def _mlp_problem(n=10):
    data = make_classification(n=n, n_queries=3, seed=1)
    torch.manual_seed(0)
    return MLP(4, 6, 4).double().eval(), VectorClassificationTask(), data.train(), data.queries()


def _torch_run(model, task, data, config, drop=()):
    """An ordinary training loop: torch.optim, loss.backward(), rows in ``drop`` left out."""
    model = copy.deepcopy(model).eval()
    params = [p for p in model.parameters()]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        opt = torch.optim.AdamW(
            params,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    schedule = batch_schedule(len(data), config)
    total = len(schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 1.0 if config.schedule == "constant" else 1.0 - t / total
    )
    for pos in schedule:
        kept = [i for i in pos if i not in drop]
        opt.zero_grad()
        if kept:
            batch = task.collate([data.examples[i] for i in kept])
            (task.training_loss(model, batch, None).sum() / len(pos)).backward()
        else:  # every row dropped: the step still happens, with gradient 0
            for p in params:
                p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    return model


def _close(a, b, tol=1e-11):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)


CONFIGS = [
    FinetuneConfig(epochs=2, lr=0.05, batch_size=3, optimizer="sgd"),
    FinetuneConfig(
        epochs=2,
        lr=0.05,
        batch_size=4,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=0.1,
        schedule="linear",
    ),
    FinetuneConfig(epochs=2, lr=0.01, batch_size=3, weight_decay=0.1, schedule="linear"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["sgd", "sgd-momentum", "adamw"])
def test_all_ones_equals_an_ordinary_run(config):
    model, task, train, _ = _mlp_problem()
    ours = finetune(model, task, train, config)
    _close(ours, _torch_run(model, task, train, config))
    # the caller's model is untouched and the result differs from it
    assert not torch.equal(ours.l1.weight, model.l1.weight)


@pytest.mark.parametrize("config", CONFIGS, ids=["sgd", "sgd-momentum", "adamw"])
def test_zero_weight_equals_dropping_the_row(config):
    model, task, train, _ = _mlp_problem()
    w = torch.ones(len(train))
    w[[2, 7]] = 0
    dropped = finetune(model, task, train, config, weights=w)
    _close(dropped, _torch_run(model, task, train, config, drop={2, 7}))
    # and the skipped forward rows change nothing against keeping them with weight 0
    run = Finetune(model, task, train, config)
    kept, _ = run.run(w, skip_dropped=False)
    for p, q in zip(kept, dict(dropped.named_parameters()).values()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    full = finetune(model, task, train, config)  # dropping rows is not a no-op
    assert (dropped.l1.weight - full.l1.weight).abs().max() > 1e-4


def test_causal_lm_tied_embeddings_and_padding():
    """A tiny GPT-2 (tied embeddings, padded batches): AdamW all-1 and a dropped row."""
    model, train = tiny_gpt2(n_layer=1, vocab=24), random_lm_data(6, vocab=24)
    config = FinetuneConfig(epochs=1, lr=0.01, batch_size=4, weight_decay=0.1)
    task = CausalLMTask()
    _close(finetune(model, task, train, config), _torch_run(model, task, train, config), 1e-10)
    w = torch.ones(6)
    w[4] = 0
    _close(
        finetune(model, task, train, config, weights=w),
        _torch_run(model, task, train, config, drop={4}),
        1e-10,
    )


def test_parameter_selection_and_measurement():
    model, task, train, queries = _mlp_problem()
    config = FinetuneConfig(lr=0.05, batch_size=5, optimizer="sgd", parameters=r"^l3\.")
    out = finetune(model, task, train, config)
    assert torch.equal(out.l1.weight, model.l1.weight)
    assert not torch.equal(out.l3.weight, model.l3.weight)
    assert out.l3.weight.requires_grad and not out.l1.weight.requires_grad
    values = measure(out, task, queries, batch_size=2)  # (Q,)
    assert values.shape == (3,)
    torch.testing.assert_close(values, task.measurement(out, task.collate(queries.examples)))


def test_schedule_visits_every_row_once_per_epoch():
    config = FinetuneConfig(epochs=3, batch_size=4, seed=5)
    schedule = batch_schedule(10, config)
    assert len(schedule) == config.steps(10) == 9
    for e in range(3):
        assert sorted(i for b in schedule[3 * e : 3 * e + 3] for i in b) == list(range(10))
    assert schedule == batch_schedule(10, config)
    assert schedule != batch_schedule(10, FinetuneConfig(epochs=3, batch_size=4, seed=6))


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="optimizer must be"):
        FinetuneConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="momentum is SGD's setting"):
        FinetuneConfig(momentum=0.9)
    with pytest.raises(ConfigError, match="does not compile"):
        FinetuneConfig(parameters="(")
    assert FinetuneConfig.from_dict(FinetuneConfig().to_dict()) == FinetuneConfig()
    model, task, train, _ = _mlp_problem()
    with pytest.raises(ConfigError, match="selects no parameter"):
        Finetune(model, task, train, FinetuneConfig(parameters="nothing_here"))
    with pytest.raises(DataError, match=r"finite \(N,\)"):
        finetune(model, task, train, FinetuneConfig(), weights=torch.ones(3))


def test_lora_fine_tune_trains_only_the_adapters():
    pytest.importorskip("peft")
    from conftest import lora

    model = lora(tiny_gpt2(n_layer=1, vocab=24))
    train = random_lm_data(4, vocab=24)
    config = FinetuneConfig(lr=0.01, batch_size=2, parameters="lora")
    run = Finetune(model, CausalLMTask(), train, config)
    assert run.names and all(".lora_A." in n or ".lora_B." in n for n in run.names)
    assert all(n.endswith(".weight") for n in run.names)
    out = finetune(model, CausalLMTask(), train, config)
    before, after = dict(model.named_parameters()), dict(out.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(run.names)
    # "trainable" picks the same tensors on a PEFT model (only adapters require grad)
    trainable = Finetune(model, CausalLMTask(), train, FinetuneConfig(parameters="trainable"))
    assert trainable.names == run.names
