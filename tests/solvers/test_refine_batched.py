"""Batched (vmapped) Gauss-Newton products, ASTRA, the automatic step, streamed blocks (float64)."""

from __future__ import annotations

import logging

import pytest
import scipy.linalg
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.errors import ConfigError
from influscope.reference import damping_vector, exact_gauss_newton, flatten, per_example_gradients
from influscope.scoring.queries import refine_block_size
from influscope.solvers import GaussNewtonProduct, refine_queries
from influscope.solvers.cost import STATE_VECTORS
from influscope.solvers.gnh import PRODUCT_TOKENS, product_batch_size
from influscope.solvers.refine import power_alpha
from influscope.tasks import CausalLMTask
from influscope.toy import VectorClassificationTask, mlp_problem

TASK = CausalLMTask()


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(cfg).double()  # rotary embeddings, grouped-query sdpa attention


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_product_equals_per_query_loop(arch):
    model = tiny_gpt2(n_embd=8, n_layer=1, vocab=16, n_positions=16) if arch == "gpt2" else None
    model = model if model is not None else _tiny_llama()
    train = random_lm_data(6, vocab=16, min_len=3, max_len=6, seed=1)
    inf = Influence(model, TASK, modules="all" if arch == "gpt2" else "mlp")
    factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4))
    n_params = sum(layer.numel for layer in inf.layers)
    v = torch.randn(5, n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def product(**kw):
        return GaussNewtonProduct(model, TASK, inf.layers, factors.damping, **kw)

    loop = product(batch_size=4, vectorize=False).gauss_newton(v, train)
    assert float(loop.norm()) > 0
    outs = {
        "one vmapped block": product(batch_size=4).gauss_newton(v, train),
        "blocks of 1": product(batch_size=4, memory_budget=1).gauss_newton(v, train),
        "mini-batches of 1": product(batch_size=1).gauss_newton(v, train),
        "one mini-batch": product(batch_size=6).gauss_newton(v, train),
    }
    for name, got in outs.items():
        assert float((got - loop).norm() / loop.norm()) < 1e-12, name
    # one vector takes the fused path (one forward with dual parameters, then the backward)
    for q in (0, 3):
        one = product(batch_size=4).gauss_newton(v[q : q + 1], train)
        assert float((one - loop[q : q + 1]).norm() / loop[q].norm()) < 1e-12, q
    if arch == "gpt2":  # and both equal the dense reference
        dense = v @ exact_gauss_newton(model, TASK, inf.layers, train)
        assert float((loop - dense).norm() / dense.norm()) < 1e-12


def test_product_batch_grows_for_short_sequences():
    short = random_lm_data(40, vocab=16, min_len=3, max_len=8, seed=1)
    long = random_lm_data(40, vocab=16, min_len=300, max_len=512, seed=1)
    assert product_batch_size(8, short, 16) == 16  # 16 × 8 tokens ≤ PRODUCT_TOKENS
    assert product_batch_size(8, short, None) == 40
    assert product_batch_size(8, long, None) == 8  # never below the configured batch
    assert product_batch_size(8, short, 3) == 3  # never more than the products' examples
    assert PRODUCT_TOKENS // 8 >= 16


def test_query_block_follows_the_memory_budget():
    model = tiny_gpt2(n_embd=8, n_layer=1, vocab=16, n_positions=16)
    inf = Influence(model, TASK, modules="all")
    n_params = sum(layer.numel for layer in inf.layers)
    outputs = torch.zeros(4, 6, 16, dtype=torch.float64)  # (B, T, V)
    per = 8 * (6 * outputs.numel() + 2 * n_params)  # bytes per vector, float64
    for budget, want in ((1, 1), (per, 1), (3 * per + 1, 3), (100 * per, 7)):
        product = GaussNewtonProduct(model, TASK, inf.layers, {}, memory_budget=budget)
        assert product.query_block(outputs, 7, torch.float64) == want
    # the solver's blocks: half of refine_memory_gb over STATE_VECTORS vectors of P numbers,
    # ≤ batch_size
    gib, n = 2**30, STATE_VECTORS
    cfg = ScoreConfig(refine_steps=1, batch_size=8, refine_memory_gb=3 * n * 8 * 1000 * 2 / gib)
    assert refine_block_size(cfg, 1000, torch.float64, 100) == 3
    assert refine_block_size(cfg, 10**9, torch.float64, 100) == 1
    assert refine_block_size(ScoreConfig(refine_steps=1, batch_size=8), 10, torch.float64, 5) == 5


@pytest.fixture(scope="module")
def mlp():
    """The tanh MLP (P = 148, 64 examples), damping 10 × mean eigenvalue: cond(P⁻¹A) ≈ 5."""
    task = VectorClassificationTask()
    model, train, queries = mlp_problem(n=64, d=4, h=8, n_queries=3, steps=200)
    inf = Influence(model, task, modules="all")
    factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=64, damping_factor=10.0))
    gnh = exact_gauss_newton(model, task, inf.layers, train, chunk=len(train))
    a = gnh + torch.diag(damping_vector(inf.layers, factors.damping))  # (P, P)
    b = per_example_gradients(model, task, inf.layers, queries, "measurement")
    exact = torch.linalg.solve(a, flatten(b, inf.layers).t()).t()  # (Q, P)
    blocks = scipy.linalg.block_diag(*[factors.dense(n).numpy() for n in inf.layer_names])
    spectrum = torch.from_numpy(scipy.linalg.eigh(a.numpy(), blocks, eigvals_only=True))
    product = GaussNewtonProduct(model, task, inf.layers, factors.damping, batch_size=16)
    start = {n: factors.precondition(n, g) for n, g in b.items()}
    return inf, train, queries, factors, product, b, start, exact, spectrum


def _rel_err(refined, exact, inf):
    got = flatten(refined, inf.layers)
    return float(((got - exact).norm(dim=1) / exact.norm(dim=1)).max())


def test_power_iteration_step_against_dense_spectrum(mlp):
    _, train, _, factors, product, b, start, _, spectrum = mlp
    mu_max = float(spectrum.max())
    x0 = product.flatten(start)
    r0 = product.flatten(b) - product.damped(x0, train)

    def apply_p(r):
        return product.flatten(
            {n: factors.precondition(n, v) for n, v in product.unflatten(r).items()}
        )

    estimates = {k: 1 / power_alpha(product, apply_p, r0, train, k) for k in (1, 4, 30)}
    for k, mu in estimates.items():
        # a Rayleigh quotient: never above μ_max; above μ_max / 2 (so α = 1/μ̂ converges)
        assert bool((mu <= mu_max * (1 + 1e-10)).all()), k
        assert bool((mu > mu_max / 2).all()), k
    assert bool((estimates[30] >= estimates[1] - 1e-12).all())
    assert bool((estimates[30] > 0.99 * mu_max).all())


@pytest.mark.parametrize("method", ["neumann", "astra"])
def test_automatic_step_converges_to_dense_solve(mlp, method):
    # α = 1 diverges here (μ_max ≈ 2.4 > 2); the automatic step needs no spectrum. ASTRA with
    # all examples per step is deterministic and converges like Neumann.
    inf, train, _, factors, product, b, start, exact, _ = mlp
    refined, history = refine_queries(
        product, factors, b, start, train, steps=300, method=method, tol=1e-11
    )
    assert _rel_err(refined, exact, inf) < 1e-6
    assert history.shape[1] - 1 < 300 and bool((history[:, -1] <= 1e-11).all())
    assert bool((history[:, 1:] <= history[:, :-1] * (1 + 1e-9)).all())


def test_astra_is_seeded_and_reproducible(mlp):
    inf, train, _, factors, product, b, start, exact, _ = mlp

    def run(seed):
        return refine_queries(
            product, factors, b, start, train, steps=40, method="astra", examples=16, seed=seed
        )

    (v1, h1), (v2, h2), (v3, _) = run(3), run(3), run(4)
    for n in v1:
        assert torch.equal(v1[n], v2[n])
    assert torch.equal(h1, h2)
    assert any(not torch.allclose(v1[n], v3[n]) for n in v1)
    # stochastic (16 of 64 examples per step): it still improves on EK-FAC's start, up to its
    # noise floor
    assert _rel_err(v1, exact, inf) < 0.5 * _rel_err(start, exact, inf)


def test_scaled_start_is_one_cg_step_from_zero(mlp):
    # textbook preconditioned CG from v = 0 with the dense A = G + Λ and block-diagonal P:
    # k + 1 of its steps equal k steps of ours from the scaled start c·P⁻¹b
    inf, train, _, factors, product, b, start, _, _ = mlp
    gnh = exact_gauss_newton(inf.model, inf.task, inf.layers, train, chunk=len(train))
    a = gnh + torch.diag(damping_vector(inf.layers, factors.damping))  # (P, P)
    blocks = scipy.linalg.block_diag(*[factors.dense(n).numpy() for n in inf.layer_names])
    pinv = torch.linalg.inv(torch.from_numpy(blocks))  # (P, P)
    rhs = flatten(b, inf.layers)  # (Q, P)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r @ pinv
    p = z.clone()
    for _ in range(4):
        ap = p @ a
        step = (r * z).sum(1) / (p * ap).sum(1)
        x, r_new = x + step[:, None] * p, r - step[:, None] * ap
        z_new = r_new @ pinv
        p = z_new + ((r_new * z_new).sum(1) / (r * z).sum(1))[:, None] * p
        r, z = r_new, z_new
    refined, history = refine_queries(
        product, factors, b, start, train, steps=3, method="cg", scale_start=True
    )
    got = flatten(refined, inf.layers)
    assert float(((got - x).norm(dim=1) / x.norm(dim=1)).max()) < 1e-9
    torch.testing.assert_close(history[:, -1], r.norm(dim=1) / rhs.norm(dim=1), rtol=1e-7, atol=0)
    # zero steps are plain EK-FAC with or without the scaling
    zero, _ = refine_queries(product, factors, b, start, train, steps=0, scale_start=True)
    for n in zero:
        assert torch.equal(zero[n], start[n])


def test_unknown_method_and_bad_step_refused(mlp):
    _, train, _, factors, product, b, start, _, _ = mlp
    with pytest.raises(ConfigError, match=r"refine must be one of .*received 'lbfgs'"):
        refine_queries(product, factors, b, start, train, steps=1, method="lbfgs")
    with pytest.raises(ConfigError, match="alpha must be > 0 or None"):
        refine_queries(product, factors, b, start, train, steps=1, method="neumann", alpha=-1.0)
    with pytest.raises(ConfigError, match=r"refine_alpha must be None .*received 0"):
        ScoreConfig(refine_alpha=0)
    with pytest.raises(ConfigError, match=r"refine_memory_gb must be .*received -1"):
        ScoreConfig(refine_memory_gb=-1)


@pytest.mark.parametrize("method", ["cg", "astra"])
def test_streamed_query_blocks_equal_one_block(method):
    # refine_memory_gb so small that every query is its own block: same result as one block,
    # and the low-rank truncation per block equals truncating all at once
    model = tiny_gpt2(n_embd=8, n_layer=1, vocab=16, n_positions=16)
    train = random_lm_data(6, vocab=16, min_len=3, max_len=6, seed=1)
    queries = random_lm_data(3, vocab=16, min_len=3, max_len=6, seed=2)
    inf = Influence(model, TASK, modules="all")
    factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4))
    out = []
    for gb in (1e-9, 1.0):
        cfg = ScoreConfig(
            query_rank=2, refine_steps=3, refine=method, refine_examples=4, refine_memory_gb=gb
        )
        pq = inf.precondition(queries, factors, cfg, train)
        out.append((pq, inf.score(pq, train, factors, cfg).pairwise))
    (p1, s1), (p2, s2) = out
    torch.testing.assert_close(s1, s2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(p1.refine_residuals, p2.refine_residuals, rtol=1e-9, atol=1e-12)
    for name in inf.layer_names:
        torch.testing.assert_close(p1.matrix(name), p2.matrix(name), rtol=1e-9, atol=1e-12)


def test_estimate_is_announced_before_the_first_iteration(mlp, caplog, capsys, monkeypatch):
    _, train, _, factors, product, b, start, _, _ = mlp
    monkeypatch.setenv("INFLUSCOPE_PROGRESS", "1")
    seen_before_step = []
    real = product.damped

    def damped(flat, data, **kw):  # the first product announces; the steps come after
        seen_before_step.append("estimated" in caplog.text)
        return real(flat, data, **kw)

    monkeypatch.setattr(product, "damped", damped)
    with caplog.at_level(logging.INFO, logger="influscope.solvers"):
        refine_queries(product, factors, b, start, train, steps=3, method="neumann")
    assert seen_before_step[0] is False and all(seen_before_step[1:])
    message = next(r.getMessage() for r in caplog.records if "estimated" in r.getMessage())
    assert "refine (neumann)" in message and "GiB" in message and "3 queries" in message
    assert "4 mini-batch(es)" in message  # 64 examples / batch_size 16
    assert "estimated" in capsys.readouterr().err  # shown on stderr while bars are on
