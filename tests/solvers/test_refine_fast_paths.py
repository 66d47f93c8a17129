"""The refinement's cheaper paths against their slow references (float64, issue 23).

* the block's query gradients and ``P^{-1}∇f`` written flat, ``P^{-1}∇f`` from the token rows
  (``precondition_batch``), against per-layer gradients preconditioned densely;
* the in-place, row-by-row CG (from ``P^{-1}b``, no preconditioning after its last step)
  against a textbook dense preconditioned CG;
* flat tensors taken over by the solver against the same solve given dicts;
* ``Λ V`` added in place against ``G V + Λ V``;
* Neumann's first step reusing the first power-iteration product, against Neumann with the
  same step given explicitly (one more product).
"""

from __future__ import annotations

import pytest
import scipy.linalg
import torch

from influscope import FitConfig, Influence, ScoreConfig
from influscope.reference import damping_vector, exact_gauss_newton, flatten, per_example_gradients
from influscope.scoring.queries import _block_gradients
from influscope.solvers import GaussNewtonProduct, refine_queries
from influscope.solvers.refine import power_alpha
from influscope.toy import VectorClassificationTask, mlp_problem


@pytest.fixture(scope="module")
def mlp():
    """The tanh MLP (P = 148, 64 examples), damping 10 × mean eigenvalue."""
    task = VectorClassificationTask()
    model, train, queries = mlp_problem(n=64, d=4, h=8, n_queries=3, steps=200)
    inf = Influence(model, task, modules="all")
    factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=64, damping_factor=10.0))
    product = GaussNewtonProduct(model, task, inf.layers, factors.damping, batch_size=16)
    b = per_example_gradients(model, task, inf.layers, queries, "measurement")
    start = {n: factors.precondition(n, g) for n, g in b.items()}
    return inf, train, queries, factors, product, b, start


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_flat_block_gradients_equal_dense_preconditioning(mlp):
    inf, _, queries, factors, product, b, start = mlp
    grads, pre, values, _ = _block_gradients(
        inf.model, inf.task, inf.layers, factors, queries, ScoreConfig(batch_size=2)
    )  # two mini-batches of the 3 queries: rows written at their offsets
    assert grads.shape == pre.shape == (len(queries), sum(layer.numel for layer in inf.layers))
    assert values.shape == (len(queries),)
    assert _rel(grads, product.flatten(b)) < 1e-12
    assert _rel(pre, product.flatten(start)) < 1e-12


def test_inplace_cg_equals_textbook_pcg_from_ekfac(mlp):
    inf, train, _, factors, product, b, start = mlp
    gnh = exact_gauss_newton(inf.model, inf.task, inf.layers, train, chunk=len(train))
    a = gnh + torch.diag(damping_vector(inf.layers, factors.damping))  # (P, P)
    blocks = scipy.linalg.block_diag(*[factors.dense(n).numpy() for n in inf.layer_names])
    pinv = torch.linalg.inv(torch.from_numpy(blocks))  # (P, P)
    rhs = flatten(b, inf.layers)  # (Q, P)
    x = rhs @ pinv
    r = rhs - x @ a
    z = r @ pinv
    p = z.clone()
    for _ in range(3):
        ap = p @ a
        step = (r * z).sum(1) / (p * ap).sum(1)
        x, r_new = x + step[:, None] * p, r - step[:, None] * ap
        z_new = r_new @ pinv
        p = z_new + ((r_new * z_new).sum(1) / (r * z).sum(1))[:, None] * p
        r, z = r_new, z_new
    calls = []
    real = factors.precondition

    def counted(name, g):
        calls.append(g.shape[0])
        return real(name, g)

    factors.precondition = counted
    try:
        refined, history = refine_queries(product, factors, b, start, train, steps=3)
    finally:
        del factors.precondition
    got = flatten(refined, inf.layers)
    assert float(((got - x).norm(dim=1) / x.norm(dim=1)).max()) < 1e-9
    torch.testing.assert_close(history[:, -1], r.norm(dim=1) / rhs.norm(dim=1), rtol=1e-7, atol=0)
    # P⁻¹r: once for all rows at the start, then once per query after steps 1 and 2 (none
    # after the last), each a call per layer
    n_layers, q = len(inf.layers), rhs.shape[0]
    assert calls == [q] * n_layers + [1] * (2 * q * n_layers)


def test_flat_tensors_are_taken_over_with_the_same_result(mlp):
    inf, train, _, factors, product, b, start = mlp
    want, hist = refine_queries(product, factors, b, start, train, steps=2, scale_start=True)
    flat_b, flat_x = product.flatten(b), product.flatten(start)
    got, hist2 = refine_queries(product, factors, flat_b, flat_x, train, steps=2, scale_start=True)
    for n in want:
        assert torch.equal(got[n], want[n])
    assert torch.equal(hist, hist2)
    # the refined vector is the start's own memory (no copy), the gradient its residual
    assert got[inf.layer_names[0]].data_ptr() == flat_x.data_ptr()


def test_damped_in_place_equals_product_plus_damping(mlp):
    inf, train, _, factors, product, _, _ = mlp
    n_params = sum(layer.numel for layer in inf.layers)
    v = torch.randn(3, n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lam = damping_vector(inf.layers, factors.damping)  # (P,)
    want = product.gauss_newton(v, train) + lam * v
    assert _rel(product.damped(v, train), want) < 1e-14


def test_neumann_reuses_its_first_power_product(mlp):
    _, train, _, factors, product, b, start = mlp
    counts = {"auto": 0, "given": 0}
    real = product.damped
    mode = "auto"

    def damped(flat, data, **kw):
        counts[mode] += 1
        return real(flat, data, **kw)

    product.damped = damped
    try:
        auto, hist_auto = refine_queries(
            product, factors, b, start, train, steps=3, method="neumann"
        )
        n_auto = counts["auto"]
        # the step the automatic run used, from the same power iteration
        x0 = product.flatten(start)
        r0 = product.flatten(b) - real(x0, train)

        def apply_p(r):
            return product.flatten(
                {n: factors.precondition(n, v) for n, v in product.unflatten(r).items()}
            )

        alpha = power_alpha(product, apply_p, r0, train, 4)
        mode = "given"
        counts["given"] = 0
        # per-query steps: run each query alone with its own α
        for q in range(len(alpha)):
            one_b = {n: g[q : q + 1] for n, g in b.items()}
            one_x = {n: g[q : q + 1] for n, g in start.items()}
            given, hist = refine_queries(
                product, factors, one_b, one_x, train, steps=3, method="neumann",
                alpha=float(alpha[q]),
            )  # fmt: skip
            for n in given:
                torch.testing.assert_close(given[n][0], auto[n][q], rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(hist[0], hist_auto[q], rtol=1e-10, atol=0)
    finally:
        del product.damped
    # 1 starting residual + 4 power products + 3 steps, the first step's product reused
    assert n_auto == 1 + 4 + 3 - 1
    assert counts["given"] == len(alpha) * (1 + 3)  # no power iteration with a given step
