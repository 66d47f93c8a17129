"""The proximal Bregman response function (PBRF) — what influence functions actually estimate.

Bae et al. (2022, "If Influence Functions are the Answer, Then What is the Question?") and
Grosse et al. (2023, §2.1 and App. C): for a trained (not necessarily converged) network θ_s,
the PBRF of training point ``z_m`` is the minimiser of

.. math::
    Φ_ε(θ) = \\frac1N \\sum_{n=1}^N D_{L_n}\\big(h_n(θ), h_n(θ_s)\\big)
             + ε\\, L(z_m, θ) + \\frac12 (θ - θ_s)^⊤ Λ (θ - θ_s),

with ``h_n`` the network's outputs on ``z_n``, ``D_L(h, h') = L(h) - L(h') - ∇L(h')^⊤(h - h')``
the Bregman divergence of the output-space loss and ``Λ`` the (per-layer) damping. Its
linearisation at ``ε = 0`` is exactly the damped Gauss-Newton influence:
``dθ*/dε = -(G + Λ)^{-1} ∇L(z_m)``. The PBRF influence on a query is the finite difference

.. math:: \\frac{f(θ^*_{+ε}) - f(θ^*_{-ε})}{2ε}

in influscope's sign convention (``df/dε``, positive = up-weighting ``z_m`` increases ``f``).

Solver: Newton-CG with a backtracking (Armijo) line search on ``Φ_ε``: each step solves
``∇²Φ_ε d = -∇Φ_ε`` by conjugate gradients on exact Hessian-vector products (``torch.func``),
preconditioned by ``G + Λ`` (``G`` is the Bregman term's Hessian at ``θ_s``, where its output
gradient vanishes, so the preconditioner is nearly exact), until ``‖∇Φ_ε‖ < tol``. Only for
small networks: ``G`` is dense ``P × P`` and factored once for all training points.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from influscope.errors import NumericalError
from influscope.evaluation.config import PBRFConfig
from influscope.modules.experts import tracked_values
from influscope.modules.selection import TrackedLayer
from influscope.reference import damping_vector, exact_gauss_newton, functional_outputs
from influscope.tasks.base import Task
from influscope.tasks.data import EncodedDataset

logger = logging.getLogger(__name__)


@dataclass
class PBRFResult:
    """PBRF influence of chosen training points.

    Attributes:
        indices: Positions of the training points in the training set.
        influence: ``(Q, K)`` finite-difference ``df_q/dε``.
        residual: ``(K,)`` largest final ``‖∇Φ_ε‖`` of the two solves of each point.
        steps: ``(K,)`` most Newton steps taken by the two solves.
    """

    indices: list[int]
    influence: torch.Tensor
    residual: torch.Tensor
    steps: torch.Tensor


def _batch(task: Task, data: EncodedDataset, positions: Sequence[int], device):
    return {k: v.to(device) for k, v in task.collate([data.examples[i] for i in positions]).items()}


def _assign(layers: Sequence[TrackedLayer], flat: torch.Tensor) -> None:
    """Write a flat tracked-parameter vector into the model (in place)."""
    sizes = [layer.numel for layer in layers]
    chunks = [c.view(t.out_dim, t.in_dim) for c, t in zip(flat.split(sizes), layers)]
    with torch.no_grad():
        for param, value in tracked_values(layers, chunks):
            param.copy_(value.to(param.dtype))


def _newton_direction(
    hvp, g: torch.Tensor, chol: torch.Tensor, iters: int = 50, rtol: float = 1e-6
) -> torch.Tensor:
    """Solve ``H d = -g`` by conjugate gradients preconditioned with ``(G + Λ)^{-1}``.

    Stops at negative curvature (Steihaug) and returns the iterate so far, or the
    preconditioned gradient step when the first direction already has negative curvature.
    """
    d = torch.zeros_like(g)
    r = -g  # residual of H d = -g at d = 0
    z = torch.cholesky_solve(r[:, None], chol)[:, 0]
    p = z.clone()
    rz = float(r @ z)
    target = rtol * float(g.norm())
    for _ in range(iters):
        hp = hvp(p)
        curvature = float(p @ hp)
        if curvature <= 0:
            return d if d.abs().sum() > 0 else z
        alpha = rz / curvature
        d = d + alpha * p
        r = r - alpha * hp
        if float(r.norm()) < target:
            break
        z = torch.cholesky_solve(r[:, None], chol)[:, 0]
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return d


def _solve(
    objective, theta_s: torch.Tensor, chol: torch.Tensor, config: PBRFConfig
) -> tuple[torch.Tensor, int, float]:
    """Minimise ``objective`` from ``θ_s``: Newton steps with a backtracking line search.

    ``newton="exact"``: the step solves ``∇²Φ d = -∇Φ`` by conjugate gradients on exact
    Hessian-vector products, preconditioned by ``G + Λ``; ``"gauss_newton"``: the step is
    ``-(G + Λ)^{-1} ∇Φ`` (always a descent direction).

    Returns:
        ``(θ*, steps taken, final ‖∇Φ‖)``.
    """
    from torch.func import grad, jvp

    theta = theta_s.clone()
    grad_fn = grad(objective)
    norm = float("inf")
    step = 0
    for step in range(1, config.max_steps + 1):  # noqa: B007 - returned
        g = grad_fn(theta).detach()  # (P,)
        norm = float(g.norm())
        if norm < config.tol or not torch.isfinite(g).all():
            break
        if config.newton == "exact":

            def hvp(v: torch.Tensor, at: torch.Tensor = theta) -> torch.Tensor:
                return jvp(grad_fn, (at,), (v,))[1].detach()

            direction = _newton_direction(hvp, g, chol)
        else:
            direction = -torch.cholesky_solve(g[:, None], chol)[:, 0]
        with torch.no_grad():
            value = float(objective(theta))
            slope = float(g @ direction)  # < 0 for a descent direction
            t = 1.0
            while t > 1e-8 and float(objective(theta + t * direction)) > value + 1e-4 * t * slope:
                t *= 0.5
        theta = (theta + t * direction).detach()
    return theta, step, norm


def pbrf_influence(
    model: nn.Module,
    task: Task,
    layers: Sequence[TrackedLayer],
    train: EncodedDataset,
    queries: EncodedDataset,
    points: Sequence[int],
    config: PBRFConfig | None = None,
    *,
    damping: float | dict[str, float] | None = None,
    epsilon: float | None = None,
    gauss_newton: torch.Tensor | None = None,
) -> PBRFResult:
    """PBRF influence of training points ``points`` on every query (float64, small models).

    Args:
        model: The trained model θ_s (its tracked weights are restored on return).
        task: Must implement :meth:`~influscope.tasks.Task.outputs` and
            :meth:`~influscope.tasks.Task.loss_from_outputs`.
        layers: Tracked layers (the parameters the PBRF moves; others stay fixed).
        train: The training set (all ``N`` examples enter the Bregman term).
        queries: Queries whose measurement ``f`` is differentiated.
        points: Positions in ``train`` of the points to up-weight.
        config: Solver settings.
        damping: ``Λ`` — a float or ``{layer: λ_ℓ}`` (e.g. an operator's ``damping`` to compare
            with its scores); defaults to ``config.damping``.
        epsilon: Up-weighting ``ε``; defaults to ``config.epsilon``.
        gauss_newton: A precomputed ``(P, P)`` Gauss-Newton matrix (else computed).

    Returns:
        A :class:`PBRFResult`.

    Raises:
        NumericalError: If ``G + Λ`` is not positive definite or a solve produces NaN/Inf.
    """
    config = config or PBRFConfig()
    eps = float(epsilon if epsilon is not None else config.epsilon)
    lam = damping if damping is not None else config.damping
    device = next(model.parameters()).device
    g = gauss_newton if gauss_newton is not None else exact_gauss_newton(model, task, layers, train)
    reg = damping_vector(layers, lam).to(device)  # (P,)
    chol, info = torch.linalg.cholesky_ex(g.double() + torch.diag(reg))
    if int(info) != 0:
        raise NumericalError(
            "G + Λ is not positive definite, so the PBRF Newton steps are undefined. Increase "
            f"the damping (received {lam})."
        )
    n = len(train)
    batch_all = _batch(task, train, range(n), device)
    fn_all, theta_s = functional_outputs(model, task, layers, batch_all)
    theta_s = theta_s.detach().double()
    with torch.no_grad():
        h_s = fn_all(theta_s).detach()  # outputs at θ_s
    h_req = h_s.clone().requires_grad_(True)
    grad_h_s = torch.autograd.grad(task.loss_from_outputs(h_req, batch_all).sum(), h_req)[0]
    loss_s = task.loss_from_outputs(h_s, batch_all).sum().detach()
    batch_q = _batch(task, queries, range(len(queries)), device)

    def measure(theta: torch.Tensor) -> torch.Tensor:
        _assign(layers, theta)
        with torch.no_grad():
            return task.measurement(model, batch_q).double()  # (Q,)

    influence = torch.zeros(len(queries), len(points), dtype=torch.float64)
    residual = torch.zeros(len(points), dtype=torch.float64)
    steps = torch.zeros(len(points), dtype=torch.long)
    try:
        for k, m in enumerate(points):
            batch_m = _batch(task, train, [m], device)
            fn_m, _ = functional_outputs(model, task, layers, batch_m)

            values = []
            for sign in (1.0, -1.0):

                def objective(
                    theta: torch.Tensor,
                    e: float = sign * eps,
                    fn_m=fn_m,
                    batch_m=batch_m,
                ) -> torch.Tensor:
                    h = fn_all(theta)
                    bregman = (
                        task.loss_from_outputs(h, batch_all).sum()
                        - loss_s
                        - (grad_h_s * (h - h_s)).sum()
                    ) / n
                    d = theta - theta_s
                    up = e * task.loss_from_outputs(fn_m(theta), batch_m).sum()
                    return bregman + up + 0.5 * (reg * d * d).sum()

                theta, step, norm = _solve(objective, theta_s, chol, config)
                residual[k] = max(float(residual[k]), norm)
                steps[k] = max(int(steps[k]), step)
                if not torch.isfinite(theta).all():
                    raise NumericalError(
                        f"The PBRF solve of training point {m} produced NaN/Inf; lower epsilon "
                        "or raise the damping."
                    )
                values.append(measure(theta))
            influence[:, k] = (values[0] - values[1]).cpu() / (2 * eps)
    finally:
        _assign(layers, theta_s)
    if float(residual.max()) > 1e3 * config.tol:
        logger.warning("PBRF solves stopped with ‖∇Φ‖ up to %.2e", float(residual.max()))
    return PBRFResult([int(i) for i in points], influence, residual, steps)
