"""How fast the refined solve converges to the exact damped Gauss-Newton solve (float64).

For tiny float64 problems where ``G + Λ`` over all tracked parameters fits densely
(:mod:`influscope.reference`), this prints

* the relative error of the matrix-free product ``(G + Λ)v`` against the dense matrix;
* the condition number of the preconditioned system ``P⁻¹(G + Λ)`` (generalised eigenvalues,
  dense) for three preconditioners: EK-FAC (the one refinement uses), the exact
  block-diagonal ``G_ℓℓ + λ_ℓ I`` (what a perfect per-layer curvature would give: only the
  cross-layer blocks are missing) and damping alone (``λ_ℓ I``);
* CG, Neumann (step 1, the optimal ``2/(μ_min + μ_max)`` and the automatic ``1/μ̂`` from
  power iteration) and ASTRA (automatic step, all examples per step) with EK-FAC as preconditioner
  and the product over *all* training examples: steps to a relative residual of 1e-10 and the
  relative error ``‖v − (G+Λ)⁻¹∇f‖/‖(G+Λ)⁻¹∇f‖`` reached, and the time per step.

The problems are those of tests/solvers/test_refine.py: an untrained GPT-2 (width 8, one block, all
linear layers tracked, 6 sequences), the same with width 4 and the MLP layers only, and the
tanh MLP of influscope.toy (64 examples) at damping factors 0.1 and 10.

Run:  OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.refine_convergence [--steps 600] [--only MLP]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np
import scipy.linalg
import torch

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

from influscope import FitConfig, Influence
from influscope.errors import NumericalError
from influscope.reference import (
    damping_vector,
    exact_gauss_newton,
    flatten,
    per_example_gradients,
)
from influscope.solvers import GaussNewtonProduct, refine_queries
from influscope.tasks import CausalLMTask
from influscope.toy import VectorClassificationTask, mlp_problem, random_lm_data, tiny_gpt2

TOL = 1e-10


def problems():
    """``(label, model, task, modules, train, queries, damping_factor)``."""
    lm_train = random_lm_data(6, vocab=16, min_len=3, max_len=6, seed=1)
    lm_queries = random_lm_data(2, vocab=16, min_len=3, max_len=6, seed=2)
    wide = tiny_gpt2(n_embd=8, n_layer=1, vocab=16, n_positions=16)
    yield "GPT-2 w8, all layers", wide, CausalLMTask(), "all", lm_train, lm_queries, 0.1
    narrow = tiny_gpt2(n_embd=4, n_layer=1, vocab=16, n_positions=16)
    yield "GPT-2 w4, mlp", narrow, CausalLMTask(), "mlp", lm_train, lm_queries, 0.1
    model, train, queries = mlp_problem(n=64, d=4, h=8, n_queries=3, steps=200)
    for factor in (0.1, 10.0):
        yield (
            f"tanh MLP, λ={factor}×mean",
            model,
            VectorClassificationTask(),
            "all",
            train,
            (queries),
            factor,
        )


def _cond(a: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    mu = scipy.linalg.eigh(a, p, eigvals_only=True)
    return float(mu.max() / mu.min()), float(mu.min()), float(mu.max())


def run(steps: int, only: str | None = None) -> list[dict]:
    rows = []
    for label, model, task, modules, train, queries, factor in problems():
        if only is not None and only not in label:
            continue
        inf = Influence(model, task, modules=modules, device="cpu")
        factors = inf.fit(
            train, FitConfig(curvature="ekfac", batch_size=len(train), damping_factor=factor)
        )
        lam = damping_vector(inf.layers, factors.damping)
        a = exact_gauss_newton(model, task, inf.layers, train, chunk=len(train)) + torch.diag(lam)
        product = GaussNewtonProduct(model, task, inf.layers, factors.damping, len(train))
        v = torch.randn(
            2, a.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        )
        prod_err = float((product.damped(v, train) - v @ a).norm() / (v @ a).norm())
        a_np = a.numpy()
        sizes = np.cumsum([0] + [layer.numel for layer in inf.layers])
        blocks = scipy.linalg.block_diag(
            *[a_np[lo:hi, lo:hi] for lo, hi in itertools.pairwise(sizes)]
        )
        ekfac = scipy.linalg.block_diag(*[factors.dense(n).numpy() for n in inf.layer_names])
        cond = {
            "ekfac": _cond(a_np, ekfac),
            "blocks": _cond(a_np, blocks),
            "damping": _cond(a_np, np.diag(lam.numpy())),
        }
        q = per_example_gradients(model, task, inf.layers, queries, "measurement")
        b = flatten(q, inf.layers)
        exact = torch.linalg.solve(a, b.t()).t()  # (Q, P)
        start = {n: factors.precondition(n, g) for n, g in q.items()}
        err0 = float(((flatten(start, inf.layers) - exact).norm(dim=1) / exact.norm(dim=1)).max())
        _, mu_min, mu_max = cond["ekfac"]
        solves = {}
        for key, method, alpha in (
            ("cg", "cg", 1.0),
            ("neumann α=1", "neumann", 1.0),
            ("neumann α*", "neumann", 2.0 / (mu_min + mu_max)),
            ("neumann auto α", "neumann", None),
            ("astra auto α, all examples", "astra", None),
        ):
            t0 = time.perf_counter()
            try:
                x, hist = refine_queries(
                    product,
                    factors,
                    q,
                    start,
                    train,
                    steps=steps,
                    method=method,
                    tol=TOL,
                    alpha=alpha,
                )
            except NumericalError as err:
                solves[key] = ("diverged", str(err).split(":")[0].split(" at ")[-1])
                continue
            secs = time.perf_counter() - t0
            err = float(((flatten(x, inf.layers) - exact).norm(1) / exact.norm(dim=1)).max())
            done = hist.shape[1] - 1
            solves[key] = (
                done if bool((hist[:, -1] <= TOL).all()) else f">{steps}",
                err,
                secs / max(done, 1),
            )
        rows.append(
            {
                "label": label,
                "P": int(a.shape[0]),
                "N": len(train),
                "product_err": prod_err,
                "start_err": err0,
                "cond": cond,
                "solves": solves,
            }
        )
    return rows


def markdown(rows: list[dict], steps: int) -> str:
    out = [
        "| problem | P | N | ‖(G+Λ)v‖ rel. err | EK-FAC (0 steps) rel. err | cond P⁻¹(G+Λ) (μ range): EK-FAC | exact blocks | "
        "damping only |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["cond"]
        out.append(
            f"| {r['label']} | {r['P']} | {r['N']} | {r['product_err']:.1e} | {r['start_err']:.2g} | "
            + " | ".join(f"{c[k][0]:.3g} ({c[k][1]:.2g} … {c[k][2]:.3g})" for k in c)
            + " |"
        )
    out += [
        "",
        f"| problem | method | steps to residual ≤ {TOL:g} (budget {steps}) | rel. error vs dense "
        "solve | ms / step |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        for key, res in r["solves"].items():
            if res[0] == "diverged":
                out.append(f"| {r['label']} | {key} | diverged ({res[1]}) | – | – |")
            else:
                out.append(
                    f"| {r['label']} | {key} | {res[0]} | {res[1]:.1e} | {1e3 * res[2]:.0f} |"
                )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="Iteration budget per solve.")
    parser.add_argument("--only", default=None, help="Run the problems whose label has this.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(markdown(run(args.steps, args.only), args.steps))


if __name__ == "__main__":
    main()
