"""MAGIC against finite differences of retraining, and its REPLAY / batching / resume invariances.

Everything in float64 on a tiny MLP (and a tiny GPT-2): the metagradient ``d f_q / d w_i`` must
equal the central difference ``(f(w + h e_i) - f(w - h e_i)) / 2h`` of two full retrainings
of the same recipe, to relative error < 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from influscope.engine.shards import PartialSums
from influscope.errors import ConfigError
from influscope.metagrad import Finetune, FinetuneConfig, MagicConfig, magic, magic_scores
from influscope.modules.tracked import TrackedModel
from influscope.tasks import CausalLMTask
from influscope.toy import (
    MLP,
    VectorClassificationTask,
    make_classification,
    random_lm_data,
    tiny_gpt2,
)


def _problem(n=10):
    data = make_classification(n=n, n_queries=3, seed=1)
    torch.manual_seed(0)
    return MLP(4, 6, 4).double().eval(), VectorClassificationTask(), data.train(), data.queries()


def _finite_difference(model, task, train, queries, recipe, i, h):
    run = Finetune(model, task, train, recipe)

    def f(w):
        theta, _ = run.run(w)
        with torch.no_grad():
            return torch.cat([run.measurement(theta, queries, [q]) for q in range(len(queries))])

    w = torch.ones(len(train), dtype=torch.float64)
    w[i] += h
    plus = f(w)
    w[i] -= 2 * h
    return (plus - f(w)) / (2 * h)  # (Q,)


RECIPES = {
    "sgd": FinetuneConfig(epochs=2, lr=0.1, batch_size=3, optimizer="sgd"),
    "sgd-momentum": FinetuneConfig(
        epochs=2, lr=0.05, batch_size=4, optimizer="sgd", momentum=0.9, weight_decay=0.1
    ),
    "adamw": FinetuneConfig(epochs=2, lr=0.01, batch_size=3, weight_decay=0.1, schedule="linear"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_metagradient_equals_finite_differences_of_retraining(name):
    model, task, train, queries = _problem()
    recipe = RECIPES[name]
    scores = magic_scores(
        TrackedModel.select(model, task, "all"), train, queries, MagicConfig(recipe=recipe)
    )
    assert scores.pairwise.shape == (3, 10) and scores.pairwise.dtype == torch.float64
    for i in (0, 4, 9):
        fd = _finite_difference(model, task, train, queries, recipe, i, 1e-5)
        err = (scores.pairwise[:, i] - fd).abs().max() / fd.abs().max()
        assert fd.abs().max() > 1e-3  # a real effect, not 0 ≈ 0
        assert err < 1e-5, (name, i, float(err))
    # the measurements are the trained model's
    theta, _ = Finetune(model, task, train, recipe).run()
    expected = torch.cat(
        [
            task.measurement(Finetune(model, task, train, recipe).bound(theta), task.collate([e]))
            for e in queries.examples
        ]
    )
    torch.testing.assert_close(scores.measurements, expected)


def test_causal_lm_adamw_with_unseen_tokens_and_tied_embeddings():
    """GPT-2 (tied embeddings): AdamW's v = 0 on unseen token rows must not give NaN."""
    model = tiny_gpt2(n_embd=8, n_layer=1, vocab=24, n_positions=16)
    train = random_lm_data(5, vocab=12, min_len=3, max_len=6, seed=1)  # tokens < 12 only
    queries = random_lm_data(2, vocab=12, min_len=3, max_len=6, seed=2, prompt_len=1)
    recipe = FinetuneConfig(epochs=1, lr=0.01, batch_size=2, weight_decay=0.1)
    task = CausalLMTask()
    scores = magic_scores(
        TrackedModel.select(model, task, "all"), train, queries, MagicConfig(recipe=recipe)
    )
    assert torch.isfinite(scores.pairwise).all()
    # Hugging Face's default fused attention has no double backward: the recipe runs the math
    # kernel, the same function as eager attention
    model.config._attn_implementation = "sdpa"
    sdpa = magic_scores(
        TrackedModel.select(model, task, "all"), train, queries, MagicConfig(recipe=recipe)
    )
    torch.testing.assert_close(sdpa.pairwise, scores.pairwise, rtol=1e-9, atol=1e-12)
    model.config._attn_implementation = "eager"
    for i in (1, 3):
        fd = _finite_difference(model, task, train, queries, recipe, i, 1e-5)
        err = (scores.pairwise[:, i] - fd).abs().max() / fd.abs().max()
        assert err < 1e-5, (i, float(err))


def test_replay_interval_does_not_change_the_scores():
    model, task, train, queries = _problem()
    recipe = RECIPES["adamw"]  # T = 2 · ⌈10/3⌉ = 8 steps
    steps = recipe.steps(len(train))
    runs = [
        magic_scores(
            TrackedModel.select(model, task, "all"),
            train,
            queries,
            MagicConfig(recipe=recipe, replay_every=k),
        )
        for k in (1, math.ceil(math.sqrt(steps)), steps, None)
    ]
    for other in runs[1:]:
        assert torch.equal(other.pairwise, runs[0].pairwise)


def test_query_batches_equal_one_query_at_a_time():
    model, task, train, queries = _problem()
    recipe = RECIPES["sgd-momentum"]
    together = magic_scores(
        TrackedModel.select(model, task, "all"), train, queries, MagicConfig(recipe=recipe)
    )
    chunked = magic_scores(
        TrackedModel.select(model, task, "all"),
        train,
        queries,
        MagicConfig(recipe=recipe, query_batch=2),
    )
    assert torch.equal(chunked.pairwise, together.pairwise)
    for q in range(len(queries)):
        alone = magic_scores(
            TrackedModel.select(model, task, "all"),
            train,
            queries.subset([q]),
            MagicConfig(recipe=recipe),
        )
        assert torch.equal(alone.pairwise[0], together.pairwise[q])
    assert together.top(0, 3)[0][1] == float(together.pairwise[0].max())


def test_memory_budget_is_refused_before_any_work(monkeypatch):
    model, task, train, queries = _problem()

    def no_work(*args, **kwargs):
        raise AssertionError("the fine-tune started before the memory check")

    monkeypatch.setattr(magic, "Finetune", no_work)
    config = MagicConfig(recipe=RECIPES["adamw"], memory_mb=1e-4)
    with pytest.raises(ConfigError, match=r"REPLAY would hold .* MiB .* memory_mb = 0\.0001"):
        magic_scores(TrackedModel.select(model, task, "all"), train, queries, config)
    # the estimate: (⌈T/k⌉ + k + Q + 1) states of (params · 3) float64 numbers, plus Q·N scores
    params = sum(p.numel() for p in model.parameters())
    need = magic.replay_memory(params * 8 * 3, 8, 3, 3, 10)
    assert need == (3 + 3 + 3 + 1) * params * 24 + 8 * 3 * 10


def test_killed_reverse_pass_resumes_from_the_last_segment(tmp_path, monkeypatch):
    model, task, train, queries = _problem()
    config = MagicConfig(recipe=RECIPES["adamw"], replay_every=2)  # 4 segments
    full = magic_scores(TrackedModel.select(model, task, "all"), train, queries, config)
    save = magic._save
    calls = []

    def killed(store, phase, seg, *rest):
        save(store, phase, seg, *rest)
        calls.append(seg)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(magic, "_save", killed)
    store = PartialSums(tmp_path / "partial", {"test": 1})
    with pytest.raises(KeyboardInterrupt, match="killed"):
        magic_scores(TrackedModel.select(model, task, "all"), train, queries, config, store=store)
    assert calls == [3, 2]
    monkeypatch.setattr(magic, "_save", save)
    store = PartialSums(tmp_path / "partial", {"test": 1})
    resumed = magic_scores(
        TrackedModel.select(model, task, "all"), train, queries, config, store=store
    )
    assert store.loaded == 1  # resumed from segment 2's boundary
    assert torch.equal(resumed.pairwise, full.pairwise)


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="replay_every must be"):
        MagicConfig(replay_every=0)
    config = MagicConfig(recipe=FinetuneConfig(lr=0.5), replay_every=3)
    assert MagicConfig.from_dict(config.to_dict()) == config
    assert "memory_mb" not in config.fingerprint_dict()


def test_at_convergence_n_times_magic_is_the_exact_influence():
    """Full-batch heavy-ball SGD with L2 run to its fixed point θ*: ``dθ*/dw_m = -H⁻¹∇L_m / N``
    (implicit function theorem), so ``N · magic[q, m] = -∇f_qᵀ H⁻¹ ∇L_m``, the influence
    function in the ``df/dε`` convention (``H`` the Hessian of ``(1/N) Σ L_i + λ/2 ‖θ‖²``)."""
    model, task, train, queries = _problem()
    n, lam = len(train), 0.1
    recipe = FinetuneConfig(
        epochs=200, lr=0.5, batch_size=n, optimizer="sgd", momentum=0.8, weight_decay=lam
    )
    scores = magic_scores(
        TrackedModel.select(model, task, "all"), train, queries, MagicConfig(recipe=recipe)
    )
    run = Finetune(model, task, train, recipe)
    theta, _ = run.run()
    sizes, shapes = [p.numel() for p in theta], [p.shape for p in theta]
    flat = torch.cat([p.reshape(-1) for p in theta])  # (P,)

    def bound(v):
        return run.bound([c.reshape(s) for c, s in zip(v.split(sizes), shapes)])

    batch = task.collate(train.examples)

    def objective(v):
        return task.training_loss(bound(v), batch, None).mean() + lam / 2 * (v * v).sum()

    jac = torch.autograd.functional.jacobian
    hessian = torch.autograd.functional.hessian(objective, flat)  # (P, P)
    assert jac(objective, flat).norm() < 1e-6  # converged
    assert torch.linalg.eigvalsh(hessian).min() > 0  # a minimum: the influence is defined
    grads = jac(lambda v: task.training_loss(bound(v), batch, None), flat)  # (N, P)
    qbatch = task.collate(queries.examples)
    fgrads = jac(lambda v: task.measurement(bound(v), qbatch), flat)  # (Q, P)
    influence = -fgrads @ torch.linalg.solve(hessian, grads.T)  # (Q, N)
    err = (n * scores.pairwise - influence).abs().max() / influence.abs().max()
    assert err < 1e-5, float(err)
