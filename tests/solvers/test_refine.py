"""EK-FAC-preconditioned refinement towards the joint damped Gauss-Newton influence (float64)."""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.errors import ConfigError, NumericalError
from influscope.reference import (
    damping_vector,
    exact_gauss_newton,
    exact_influence,
    flatten,
    per_example_gradients,
)
from influscope.solvers import GaussNewtonProduct, refine_queries
from influscope.tasks import CausalLMTask

TASK = CausalLMTask()


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2(n_embd=8, n_layer=1, vocab=16, n_positions=16)
    train = random_lm_data(6, vocab=16, min_len=3, max_len=6, seed=1)
    queries = random_lm_data(2, vocab=16, min_len=3, max_len=6, seed=2)
    inf = Influence(model, TASK, modules="all")
    factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4, damping_factor=0.1))
    gnh = exact_gauss_newton(model, TASK, inf.layers, train)
    return model, train, queries, inf, factors, gnh


def test_gnh_product_matches_dense(setup):
    model, train, _, inf, factors, gnh = setup
    assert any(layer.has_bias for layer in inf.layers)
    product = GaussNewtonProduct(model, TASK, inf.layers, factors.damping, batch_size=4)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3, gnh.shape[0], dtype=torch.float64, generator=gen)
    fast, dense = product.gauss_newton(v, train), v @ gnh
    # float64 logits keep float64 through the loss (tasks.base.loss_precision): the product
    # agrees with the dense reference to rounding (it was ~1e-7 while the loss was float32).
    assert float((fast - dense).norm() / dense.norm()) < 1e-12


def test_zero_steps_equal_plain_ekfac(setup):
    _, train, queries, inf, factors, _ = setup
    plain = inf.score(queries, train, factors, ScoreConfig(query_rank=None)).pairwise
    zero = inf.score(queries, train, factors, ScoreConfig(query_rank=None, refine_steps=0))
    torch.testing.assert_close(zero.pairwise, plain, rtol=0, atol=0)


def test_cg_moves_towards_exact(setup):
    # On this untrained model EK-FAC is a poor preconditioner: cond(P⁻¹(G+Λ)) ≈ 2e4 (its
    # generalised eigenvalues span 1.5e-3 … 28), so CG starts at a relative residual ~10 and
    # needs 443 steps (P = 840) for a residual of 1e-10 (benchmarks/refine_convergence.py);
    # 30 steps give ~0.07. Full convergence is tested on a smaller system below
    # (test_cg_converges_to_exact_damped_gnh_solve).
    model, train, queries, inf, factors, gnh = setup
    exact = exact_influence(model, TASK, inf.layers, train, queries, factors.damping, gnh)
    plain = inf.score(queries, train, factors, ScoreConfig(query_rank=None)).pairwise
    # from EK-FAC's own answer (the scaled default starts nearer: see the A-norm test below)
    cfg = ScoreConfig(query_rank=None, refine_steps=30, refine_tol=1e-12, refine_start="ekfac")
    pq = inf.precondition(queries, factors, cfg, train)
    est = inf.score(pq, train, factors, cfg).pairwise
    assert float((est - exact).norm()) < float((plain - exact).norm())
    assert pq.refine_residuals.shape == (len(queries), 31)
    assert bool((pq.refine_residuals[:, -1] < 0.1 * pq.refine_residuals[:, 0]).all())


def test_batch_size_invariance(setup):
    _, train, queries, inf, factors, _ = setup
    out = [
        inf.score(
            queries, train, factors, ScoreConfig(query_rank=None, refine_steps=3, batch_size=b)
        ).pairwise
        for b in (1, 4)
    ]
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-12)


def test_bad_input(setup):
    model, train, queries, inf, factors, _ = setup
    with pytest.raises(ConfigError, match="refine_steps must be ≥ 0"):
        ScoreConfig(refine_steps=-1)
    with pytest.raises(
        ConfigError, match="refine must be one of 'cg', 'neumann', 'astra', received 'lbfgs'"
    ):
        ScoreConfig(refine="lbfgs")
    with pytest.raises(ConfigError, match="needs the training data"):
        inf.precondition(queries, factors, ScoreConfig(refine_steps=2))
    with pytest.raises(ConfigError, match="needs fitted factors"):
        inf.precondition(queries, None, ScoreConfig(refine_steps=2), train)
    product = GaussNewtonProduct(model, TASK, inf.layers, factors.damping, batch_size=4)
    q = per_example_gradients(model, TASK, inf.layers, queries, "measurement")
    start = {n: factors.precondition(n, g) for n, g in q.items()}
    with pytest.raises(NumericalError, match=r"diverged for query .* layer"):
        refine_queries(product, factors, q, start, train, steps=20, method="neumann", alpha=50.0)
    assert flatten(q, inf.layers).shape[0] == len(queries)


# --- convergence to the exact damped Gauss-Newton solve (float64) --------------------------


def _exact_solve(model, task, inf, train, queries, damping):
    """``(G + Λ)⁻¹ ∇f`` densely, ``(Q, P)``, and the dense ``G + Λ``."""
    gnh = exact_gauss_newton(model, task, inf.layers, train, chunk=len(train))
    a = gnh + torch.diag(damping_vector(inf.layers, damping))  # (P, P)
    b = flatten(per_example_gradients(model, task, inf.layers, queries, "measurement"), inf.layers)
    return torch.linalg.solve(a, b.t()).t(), a  # (Q, P)


def test_scaled_start_default_is_never_further_in_the_a_norm():
    # Why refine_start="scaled" is the default: k CG steps from c·P⁻¹b are k + 1 CG steps
    # from zero, which minimise the (G+Λ)-norm error over a Krylov space that holds the k-step
    # iterate from P⁻¹b; so, in exact arithmetic, never further from (G+Λ)⁻¹∇f in that norm.
    # The tiny GPT-2 of test_cg_converges_to_exact_damped_gnh_solve (cond ≈ 5e3), all data.
    model = tiny_gpt2(n_embd=4, n_layer=1, vocab=16, n_positions=16)
    train = random_lm_data(6, vocab=16, min_len=3, max_len=6, seed=1)
    queries = random_lm_data(2, vocab=16, min_len=3, max_len=6, seed=2)
    inf = Influence(model, TASK, modules="mlp")
    factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=6, damping_factor=0.1))
    exact, a = _exact_solve(model, TASK, inf, train, queries, factors.damping)
    assert ScoreConfig().refine_start == "scaled"

    def a_err(start: str, k: int) -> torch.Tensor:
        cfg = ScoreConfig(query_rank=None, batch_size=6, refine_steps=k, refine_start=start)
        e = flatten(inf.precondition(queries, factors, cfg, train).dense, inf.layers) - exact
        return ((e @ a) * e).sum(1).sqrt()  # (Q,)

    for k in (1, 2, 3, 5):
        scaled, ekfac = a_err("scaled", k), a_err("ekfac", k)
        assert bool((scaled <= ekfac * (1 + 1e-9)).all()), k
    assert bool((a_err("scaled", 1) < 0.9 * a_err("ekfac", 1)).all())  # strictly, here


def _windows_decrease(history: torch.Tensor, width: int) -> bool:
    """Each window of ``width`` steps ends below the previous one's largest residual."""
    peaks = [history[:, k : k + width].max(1).values for k in range(0, history.shape[1], width)]
    return all(bool((later < earlier).all()) for earlier, later in itertools.pairwise(peaks))


def test_cg_converges_to_exact_damped_gnh_solve():
    # A tiny float64 GPT-2 (P = 148 tracked parameters); the Gauss-Newton product runs over
    # all six training sequences (no sub-sampling), so CG is deterministic and, in exact
    # arithmetic, would finish in ≤ P steps. cond(P⁻¹(G+Λ)) ≈ 5e3 here: ~40 steps.
    model = tiny_gpt2(n_embd=4, n_layer=1, vocab=16, n_positions=16)
    train = random_lm_data(6, vocab=16, min_len=3, max_len=6, seed=1)
    queries = random_lm_data(2, vocab=16, min_len=3, max_len=6, seed=2)
    inf = Influence(model, TASK, modules="mlp")
    factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=6, damping_factor=0.1))
    exact, _ = _exact_solve(model, TASK, inf, train, queries, factors.damping)
    cfg = ScoreConfig(
        query_rank=None, batch_size=6, refine_steps=150, refine_tol=1e-11, refine_start="ekfac"
    )
    pq = inf.precondition(queries, factors, cfg, train)
    got = flatten(pq.dense, inf.layers)  # (Q, P)
    assert float(((got - exact).norm(dim=1) / exact.norm(dim=1)).max()) < 1e-6
    history = pq.refine_residuals  # (Q, k+1)
    assert history.shape[1] - 1 < 150  # stopped by the tolerance, not the step budget
    assert bool((history[:, -1] <= 1e-11).all()) and bool((history[:, 0] > 1).all())
    # CG's residual norm is not monotone step by step (its error's (G+Λ)-norm is; here the
    # residual rises on ~1 step in 4); over windows of ten steps it falls steadily.
    assert _windows_decrease(history, 10)
    # the refined scores equal the exact damped Gauss-Newton influence
    scores = inf.score(pq, train, factors, cfg).pairwise
    ref = exact_influence(model, TASK, inf.layers, train, queries, factors.damping)
    torch.testing.assert_close(scores, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_mlp_converges_to_exact_damped_gnh_solve(method):
    # The tanh MLP of influscope.toy (P = 148, 64 examples). With damping_factor=10 the
    # preconditioned spectrum μ of P⁻¹(G+Λ) is 0.44 … 2.38 (cond ≈ 5), inside Neumann's reach
    # with the step α = 2/(μ_min + μ_max); α = 1 diverges (μ_max > 2).
    import scipy.linalg

    from influscope.toy import VectorClassificationTask, mlp_problem

    task = VectorClassificationTask()
    model, train, queries = mlp_problem(n=64, d=4, h=8, n_queries=3, steps=200)
    inf = Influence(model, task, modules="all")
    factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=64, damping_factor=10.0))
    exact, a = _exact_solve(model, task, inf, train, queries, factors.damping)
    blocks = scipy.linalg.block_diag(*[factors.dense(n).numpy() for n in inf.layer_names])
    spectrum = scipy.linalg.eigh(a.numpy(), blocks, eigvals_only=True)  # of P⁻¹(G+Λ)
    assert 1.0 < spectrum.max() / spectrum.min() < 20.0
    product = GaussNewtonProduct(model, task, inf.layers, factors.damping, batch_size=16)
    q = per_example_gradients(model, task, inf.layers, queries, "measurement")
    start = {n: factors.precondition(n, g) for n, g in q.items()}
    alpha = float(2.0 / (spectrum.min() + spectrum.max()))
    refined, history = refine_queries(
        product, factors, q, start, train, steps=200, method=method, tol=1e-11, alpha=alpha
    )
    got = flatten(refined, inf.layers)
    assert float(((got - exact).norm(dim=1) / exact.norm(dim=1)).max()) < 1e-6
    assert history.shape[1] - 1 < 200 and bool((history[:, -1] <= 1e-11).all())
    # this well-conditioned system shrinks the residual at every step
    assert bool((history[:, 1:] <= history[:, :-1]).all())
    if method == "neumann":
        diverged = r"diverged for query \d.*layer .*Increase the damping"
        with pytest.raises(NumericalError, match=diverged):
            refine_queries(product, factors, q, start, train, steps=60, method=method, alpha=1.0)


def test_loss_precision_keeps_float64_and_float32_bit_identical():
    import torch.nn.functional as F

    from influscope.tasks.base import loss_precision

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)  # (B, T, V) float32
    batch = {"labels": torch.randint(0, 7, (2, 5), generator=gen)}
    for dtype in (torch.float32, torch.float64):
        x = logits.to(dtype)
        assert loss_precision(x) is x
        assert TASK.loss_from_outputs(x, batch).dtype == dtype
    for dtype in (torch.float16, torch.bfloat16):
        assert loss_precision(logits.to(dtype)).dtype == torch.float32
        assert TASK.loss_from_outputs(logits.to(dtype), batch).dtype == torch.float32
    # float32: exactly what the former ``.float()`` cast computed
    old = F.cross_entropy(
        logits[:, :-1].reshape(-1, 7).float(), batch["labels"][:, 1:].reshape(-1), reduction="none"
    )
    assert torch.equal(TASK.loss_from_outputs(logits, batch), old.view(2, 4).sum(1))


# --- bad input (issue 13): a specific error with the fix, and nothing half-written ---------


def test_nan_or_growing_residual_names_query_step_and_layer(setup):
    model, train, queries, inf, factors, _ = setup
    product = GaussNewtonProduct(model, TASK, inf.layers, factors.damping, batch_size=4)
    q = per_example_gradients(model, TASK, inf.layers, queries, "measurement")
    start = {n: factors.precondition(n, g) for n, g in q.items()}
    with pytest.raises(
        NumericalError, match=r"query \d at step \d+: .*grew to .*Increase the damping"
    ):
        refine_queries(product, factors, q, start, train, steps=20, method="neumann", alpha=50.0)
    # a NaN in one layer's block of the product (e.g. an overflowing forward) is caught at
    # once and that layer is named
    poisoned = inf.layers[2].name
    exact_product = product.gauss_newton

    def nan_product(flat, data, **kwargs):
        parts = product.unflatten(exact_product(flat, data, **kwargs))
        parts[poisoned] = torch.full_like(parts[poisoned], float("nan"))
        return product.flatten(parts)

    product.gauss_newton = nan_product
    with pytest.raises(
        NumericalError, match=r"query 0 at step 0: .*NaN/Inf.*" + re.escape(repr(poisoned))
    ):
        refine_queries(product, factors, q, start, train, steps=5, method="cg")


def test_diverging_refinement_stores_no_scores_stage(setup, tmp_path):
    model, train, queries, _, _, _ = setup
    inf = Influence(model, TASK, modules="all", run_dir=tmp_path / "run")
    factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4, damping_factor=0.1))
    # α = 1 diverges here (the automatic step would not)
    cfg = ScoreConfig(query_rank=None, refine="neumann", refine_steps=30, refine_alpha=1.0)
    with pytest.raises(NumericalError, match=r"Refinement diverged .*Nothing was stored"):
        inf.score(queries, train, factors, cfg, name="refined")
    assert not inf.run.exists("scores", "refined")
    assert not any((tmp_path / "run").glob("**/*refined*"))
    # CG, one of the message's fixes, succeeds and stores the stage
    ok = dataclasses.replace(cfg, refine="cg", refine_steps=3)
    assert inf.score(queries, train, factors, ok, name="refined").pairwise.isfinite().all()
    assert inf.run.exists("scores", "refined")


TEXTS = ["The capital of Velmora is Tarsk.", "Zorin Quell was born in Ostrava."]


def test_cli_refine_without_fitted_factors(workdir, capsys):
    from influscope.cli import main

    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    args += ["--run", str(workdir / "run"), "--queries", str(workdir / "queries.jsonl")]
    assert main(["score", *args, "--refine", "2"]) == 2
    err = capsys.readouterr().err
    assert "No factors named 'factors'" in err and "influscope fit" in err
    assert not (workdir / "run" / "scores").exists()
    assert not list((workdir / "run").glob("*.html"))


def test_cli_refine_astra_scaled_announces_cost(workdir, capsys, caplog):
    import logging

    from influscope.cli import main

    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    args += ["--run", str(workdir / "run-astra")]
    assert main(["fit", *args, "--curvature", "ekfac"]) == 0
    args += ["--queries", str(workdir / "queries.jsonl")]
    refine = ["--refine", "2", "--refine-method", "astra", "--refine-start", "scaled"]
    with caplog.at_level(logging.INFO, logger="influscope.solvers"):
        assert main(["score", *args, *refine, "--refine-examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "refinement (astra): final relative residual per query:" in out
    assert any(
        "refine (astra)" in r.getMessage() and "estimated" in r.getMessage() for r in caplog.records
    )
    # the estimate counts the dense P⁻¹r of each query: 2 steps + 3 power iterations but one
    assert any("+ 5 preconditioning(s) per query of" in r.getMessage() for r in caplog.records)


def test_cli_refine_examples_auto_all_or_a_number():
    import argparse

    from influscope.cli.score import refine_examples_arg, resolve_refine_examples
    from influscope.solvers.refine import AUTO_EXAMPLES

    assert resolve_refine_examples("auto", 10 * AUTO_EXAMPLES) == AUTO_EXAMPLES
    assert resolve_refine_examples("auto", AUTO_EXAMPLES) is None  # every sequence: exact
    assert resolve_refine_examples("all", 10 * AUTO_EXAMPLES) is None
    assert resolve_refine_examples(refine_examples_arg("3"), 40) == 3
    for bad in ("0", "-2", "some"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"'auto', 'all' or an integer ≥ 1"):
            refine_examples_arg(bad)
