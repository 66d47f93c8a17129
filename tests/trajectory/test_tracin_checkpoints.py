"""Checkpoints of ``train_lm`` and TracIn over them (benchmark (a)'s TracIn row)."""

from __future__ import annotations

import math

import pytest
import torch

from influscope import ConfigError, Influence
from influscope.demo.facts import make_facts, make_training_records
from influscope.demo.train import make_gpt2_config, train_lm, train_tokenizer
from influscope.evaluation import tracin
from influscope.reference import flatten, per_example_gradients
from influscope.tasks import CausalLMTask

KW = {"lr": 1e-2, "weight_decay": 0.01, "batch_size": 8, "warmup_frac": 0.25}


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    records = make_training_records(make_facts(12, seed=0), langs=("en",), k=2)[:16]
    tokenizer = train_tokenizer([r["text"] for r in records], vocab_size=300)
    config = make_gpt2_config(tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=64)
    yield records, tokenizer, config
    torch.set_num_threads(threads)


def test_checkpoints_leave_training_unchanged(setup) -> None:
    records, tokenizer, config = setup
    plain = train_lm(records, tokenizer, config, epochs=3, seed=1, **KW)
    ckpt = train_lm(records, tokenizer, config, epochs=3, seed=1, checkpoint_every=2, **KW)
    assert plain.checkpoints == [] and plain.steps == ckpt.steps == 6
    for p, q in zip(plain.model.state_dict().values(), ckpt.model.state_dict().values()):
        assert torch.equal(p, q)
    assert [c.step for c in ckpt.checkpoints] == [2, 4, 6]
    # lr of the step that produced the checkpoint: warm-up over 1 step, then cosine to 0.1·lr
    for c in ckpt.checkpoints:
        progress = (c.step - 1 - 1) / (6 - 1)
        expected = KW["lr"] * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        assert c.lr == pytest.approx(expected)
    last = ckpt.checkpoints[-1].model(config)
    for p, q in zip(last.state_dict().values(), ckpt.model.state_dict().values()):
        assert torch.equal(p, q)
    first = ckpt.checkpoints[0].state_dict["transformer.h.0.mlp.c_fc.weight"]
    assert not torch.equal(first, ckpt.model.transformer.h[0].mlp.c_fc.weight)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        train_lm(records, tokenizer, config, epochs=1, seed=0, checkpoint_every=0, **KW)


def test_tracin_over_two_checkpoints_is_the_lr_weighted_sum(setup) -> None:
    records, tokenizer, config = setup
    run = train_lm(records, tokenizer, config, epochs=2, seed=0, checkpoint_every=2, **KW)
    assert len(run.checkpoints) == 2
    task = CausalLMTask(add_bos=False)
    train = task.encode(records[:6], tokenizer, 64)
    queries = task.encode(
        [{"prompt": r["text"][:12], "completion": r["text"][12:24]} for r in records[6:9]],
        tokenizer,
        64,
    )
    modules = ["transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_proj"]
    models = [c.model(config).double() for c in run.checkpoints]
    expected, dots = 0.0, []
    for model, c in zip(models, run.checkpoints):
        inf = Influence(model, task, modules=modules)
        g = flatten(per_example_gradients(model, task, inf.layers, train), inf.layers)  # (N, P)
        q = flatten(
            per_example_gradients(model, task, inf.layers, queries, "measurement"), inf.layers
        )  # (Q, P)
        dots.append(-(q @ g.T))  # (Q, N)
        expected = expected + c.lr * dots[-1]
    got = tracin(
        [(m, c.lr) for m, c in zip(models, run.checkpoints)],
        lambda m: Influence(m, task, modules=modules),
        queries,
        train,
        batch_size=4,
    ).pairwise
    torch.testing.assert_close(got, expected)
    # the checkpoints differ, so the sum is not a multiple of one checkpoint's dot products
    lr_sum = sum(c.lr for c in run.checkpoints)
    assert (got - lr_sum * dots[-1]).abs().max() > 0.05 * got.abs().max()
