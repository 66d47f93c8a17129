"""EK-FAC-preconditioned refinement of ``(G + Λ)^{-1} ∇f`` (ASTRA, Wang et al. 2025).

Block-diagonal EK-FAC ``P`` ignores the cross-layer blocks of the Gauss-Newton matrix. Here
the true system ``A v = b`` with ``A = G + Λ`` and ``b = ∇f_q`` (all tracked layers jointly,
``Λ`` the per-layer damping of the factors) is solved iteratively with ``P^{-1}`` as
preconditioner, every method starting from ``v_0 = P^{-1} b`` (so zero steps are plain EK-FAC;
``scale_start`` starts from its ``A``-norm-optimal multiple instead, see :func:`refine_queries`):

* ``"cg"``: preconditioned conjugate gradient (default);
* ``"neumann"``: preconditioned Richardson ``v_{k+1} = v_k + α P^{-1}(b − A v_k)``
  (a truncated Neumann series of ``(αP^{-1}A)^{-1}``), the residual updated recursively;
* ``"astra"``: ASTRA's stochastic preconditioned Neumann iteration (Wang, Nguyen, Yang, Bae,
  McIlraith, Grosse 2025, "Better Training Data Attribution via Better Inverse
  Hessian-Vector Products"): the same update, but each step's residual ``b − A_{B_k} v_k`` is
  computed afresh on its own seeded random mini-batch ``B_k`` of ``examples`` training
  sequences — stochastic gradient descent on ``½ vᵀ A v − bᵀ v`` preconditioned by ``P``.

With ``examples`` (``ScoreConfig.refine_examples``) CG and Neumann solve the sub-sampled system
``A_S = G_S + Λ`` over one seeded random subset ``S`` kept for all their steps (a consistent
linear system, so CG keeps its conjugacy); ASTRA draws a new subset every step and so
averages over the whole training set, at the price of a noise floor (it does not converge
exactly unless ``examples`` covers all the data).

**Step size** ``α`` (Neumann, ASTRA): given, or automatic (``alpha=None``): ``α = 1/μ̂`` with
``μ̂`` the largest eigenvalue of ``P^{-1}A`` estimated per query by ``power_steps`` power
iterations started from the query's own ``P^{-1} r_0`` (which is dominated by the large-μ
directions, since ``r_0 = (I − A P^{-1}) b``). The Rayleigh quotient never exceeds
``μ_max``, and the iteration converges for ``α μ_max < 2``, so ``α = 1/μ̂`` is safe once the
estimate is above ``μ_max / 2``. It is not ``2/(μ_min + μ_max)`` (the optimal step): ``μ_min``
needs many more iterations than ``μ_max``. Each power iteration costs one Gauss-Newton product.

Each step costs one Gauss-Newton product; each query stops once its relative residual
``‖b − A v‖/‖b‖`` reaches ``tol``. Before the first iteration the estimated time (from the
first mini-batch) and memory are reported (:mod:`influscope.solvers.cost`), and a progress
bar shows the largest residual.
"""

from __future__ import annotations

import torch

from influscope.errors import ConfigError, NumericalError
from influscope.solvers.cost import RefineMeter
from influscope.solvers.gnh import GaussNewtonProduct
from influscope.tasks.data import EncodedDataset

#: Refinement methods (``ScoreConfig.refine``, CLI ``--refine-method``).
METHODS = ("cg", "neumann", "astra")

#: Power iterations for the automatic step of Neumann and ASTRA.
POWER_STEPS = 4

#: ``score --refine-examples auto`` (the CLI default): products over ``min(N, 16)``
#: sequences, two mini-batches of the default ``batch_size`` 8, so that a refinement's cost
#: does not grow with the training set (docs/benchmarks.md, SmolLM2 first hour). The library
#: default, ``ScoreConfig.refine_examples=None``, stays "all sequences".
AUTO_EXAMPLES = 16


def subset(data: EncodedDataset, examples: int | None, seed: int, step: int) -> EncodedDataset:
    """The seeded random subset of ``examples`` sequences for ``step`` (all when ``None``)."""
    if examples is None or examples >= len(data):
        return data
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    pick = torch.randperm(len(data), generator=g)[:examples].sort().values.tolist()
    return data.subset(pick)


def refine_queries(
    product: GaussNewtonProduct,
    operator,
    grads: dict[str, torch.Tensor] | torch.Tensor,
    start: dict[str, torch.Tensor] | torch.Tensor,
    train: EncodedDataset,
    *,
    steps: int,
    method: str = "cg",
    tol: float = 0.0,
    examples: int | None = None,
    seed: int = 0,
    alpha: float | None = None,
    power_steps: int = POWER_STEPS,
    scale_start: bool = False,
    meter: RefineMeter | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Refine ``P^{-1} b`` towards ``(G + Λ)^{-1} b`` for a block of ``Q`` queries.

    Args:
        product: The ``(G + Λ) V`` product.
        operator: The preconditioner ``P`` (any CurvatureOperator: ``precondition(name, g)``).
        grads: ``b = {layer: (Q, out, in)}`` query gradients, or already flat ``(Q, P)`` in
            the layout of :meth:`GaussNewtonProduct.flatten`. A flat tensor is taken over:
            the solver overwrites it (it becomes the residual), so no copy is held.
        start: ``P^{-1} b`` (the plain preconditioned queries), same layout; a flat tensor is
            taken over likewise (it becomes the refined ``v``).
        train: Training examples defining ``G``.
        steps, method, tol, examples, seed: See ``ScoreConfig.refine_*``.
        alpha: Neumann / ASTRA step size; ``None`` estimates ``1/μ_max`` per query by power
            iteration (ignored by CG).
        power_steps: Power iterations for that estimate.
        scale_start: Start from ``c_q P^{-1} b`` instead of ``P^{-1} b``, with
            ``c_q = bᵀP^{-1}b / (P^{-1}b)ᵀ A P^{-1}b`` the multiple that minimises the
            ``A``-norm error (free: ``A P^{-1} b`` is the starting residual's product). For CG
            this is exactly one CG step from ``v = 0`` and the next search direction is kept
            conjugate to ``P^{-1} b``, so ``k`` steps from the scaled start are ``k + 1``
            steps of CG from zero, at the cost of ``k`` from ``P^{-1} b``.
        meter: Reports the estimated cost before the first iteration and shows progress
            (a fresh one when ``None``).

    Returns:
        The refined ``{layer: (Q, out, in)}`` and the relative residuals ``(Q, k+1)``
        (``k ≤ steps`` iterations run; converged queries repeat their last value).

    Memory: CG holds four ``(Q, P)`` vectors (``v``, ``r``, the search direction ``p`` and its
    product), Neumann the same with ``P^{-1}r`` for ``p``, ASTRA one more (``b``); ``P^{-1}r``
    is formed one query at a time, and the updates are in place. Cost: ``steps + 1``
    products (the starting residual, then one per step; Neumann's automatic step reuses its
    first power-iteration product for its first step) and ``steps`` preconditionings
    ``P^{-1}r`` per query (the last step needs none).

    Raises:
        ConfigError: Unknown method or a step size that is not positive.
        NumericalError: A residual became NaN/Inf or grew over 10× its start (the message
            names the query, the step and the layer, and suggests more damping).
    """
    if method not in METHODS:
        raise ConfigError(f"refine must be one of {METHODS}, received {method!r}.")
    if alpha is not None and not alpha > 0:
        raise ConfigError(f"The refinement step alpha must be > 0 or None (auto), got {alpha}.")
    x = start if isinstance(start, torch.Tensor) else product.flatten(start)  # (Q, P)
    b = grads if isinstance(grads, torch.Tensor) else product.flatten(grads)  # (Q, P)
    b = b.to(x.dtype)
    bnorm = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)  # (Q,)
    auto = method != "cg" and alpha is None and steps > 0
    meter = meter or RefineMeter()
    # Neumann's first step reuses the first power-iteration product
    products = steps + 1 + (power_steps - (method == "neumann") if auto else 0)
    preconditionings = steps + (max(1, power_steps) - 1 if auto else 0)  # dense P⁻¹r per query
    meter.begin(method, x, product, len(train) if examples is None else min(examples, len(train)))

    def apply_p(r: torch.Tensor) -> torch.Tensor:
        """``P^{-1} r`` for ``(q, P)`` rows, layer by layer into one output."""
        out = torch.empty_like(r)
        dst = product.unflatten(out)
        for n, part in product.unflatten(r).items():
            dst[n].copy_(operator.precondition(n, part))
        return out

    fixed = subset(train, examples, seed, 0)  # CG / Neumann: one subset for every step
    w = product.damped(x, fixed, on_batch=meter.first_product(products, preconditionings))
    first = None  # CG's first direction P⁻¹b = x / c and bᵀP⁻¹b, when the start is its step
    if scale_start and steps > 0:  # zero steps stay plain EK-FAC
        bz = _dot(b, x)  # (Q,) bᵀP⁻¹b
        c = bz / _dot(x, w)  # (Q,) argmin_c ‖c P⁻¹b − A⁻¹b‖_A: CG's first step from 0
        c = torch.where(torch.isfinite(c) & (c > 0), c, torch.ones_like(c))
        first = (c, bz)
        x.mul_(c[:, None])
        w.mul_(c[:, None])
    # r = b − A v₀; ASTRA recomputes its residual from b at every step, the others reuse b
    r = b - w if method == "astra" else b.sub_(w)
    del w
    history = [r.norm(dim=1) / bnorm]
    _check(history[0], history[0], r, product, 0)  # a NaN/Inf start (preconditioner, data)
    active = history[0] > tol
    if steps == 0 or not bool(active.any()):
        return product.unflatten(x), torch.stack(history, 1)
    z = apply_p(r)
    az = None  # Neumann: A P⁻¹r₀, from the power iteration
    if auto:
        step_size, az = _power(product, apply_p, r, z, fixed, power_steps)  # (Q,)
        meter.note_alpha(step_size)
        if method != "neumann":
            az = None
    else:
        step_size = torch.full_like(bnorm, 1.0 if alpha is None else alpha)
    rz = _dot(r, z)
    if method == "cg":
        p = z  # the search direction, updated in place
        del z
        if first is not None:  # keep conjugacy with the first direction P⁻¹b = v₀ / c
            c, bz = first
            for q in range(p.shape[0]):
                p[q].add_(x[q], alpha=float(rz[q] / (bz[q] * c[q])))
    del first
    bar = meter.bar(steps)
    for k in range(steps):
        if not bool(active.any()):
            break
        rows = [q for q in range(x.shape[0]) if bool(active[q])]
        if method == "cg":
            ap = product.damped(p, fixed)
            step = rz / _dot(p, ap)
            for q in rows:
                x[q].add_(p[q], alpha=float(step[q]))
                r[q].sub_(ap[q], alpha=float(step[q]))
            del ap
        elif method == "neumann":
            if az is None:
                az = product.damped(z, fixed)
            for q in rows:
                x[q].add_(z[q], alpha=float(step_size[q]))
                r[q].sub_(az[q], alpha=float(step_size[q]))
            az = None
        else:  # astra: a fresh residual on a fresh mini-batch
            for q in rows:
                x[q].add_(z[q], alpha=float(step_size[q]))
            fresh = product.damped(x, subset(train, examples, seed, k + 1))
            for q in rows:
                torch.sub(b[q], fresh[q], out=r[q])
            del fresh
        res = torch.where(active, r.norm(dim=1) / bnorm, history[-1])
        history.append(res)
        _check(res, history[0], r, product, k + 1)
        active = active & (res > tol)
        if k + 1 < steps:  # the next direction (none after the last step)
            for q in range(x.shape[0]):
                if not bool(active[q]):
                    continue
                zq = apply_p(r[q : q + 1])[0]  # (P,) one query at a time
                if method == "cg":
                    rz_new = _dot(r[q : q + 1], zq[None])[0]
                    p[q].mul_(float(rz_new / rz[q])).add_(zq)
                    rz[q] = rz_new
                else:
                    z[q].copy_(zq)
                del zq
        meter.step(bar, res)
    meter.close(bar)
    return product.unflatten(x), torch.stack(history, 1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``aᵀb`` of ``(Q, P)`` tensors, ``(Q,)``, without a ``(Q, P)`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def power_alpha(product, apply_p, r0: torch.Tensor, data, iterations: int) -> torch.Tensor:
    """``1/μ̂`` per query, ``μ̂`` the power-iteration estimate of ``μ_max(P^{-1}A)``.

    Iterates ``u ← A P^{-1} u / ‖·‖`` from ``u_0 = r_0`` (the same spectrum as ``P^{-1}A``)
    and returns the inverse of the Rayleigh quotient ``yᵀ A y / yᵀ P y`` with ``y = P^{-1}u``
    (``P y = u``, so ``P`` itself is never applied). The quotient increases towards
    ``μ_max`` and never exceeds it.

    Args:
        product: The ``(G + Λ)`` product.
        apply_p: ``r ↦ P^{-1} r`` on ``(Q, P)``.
        r0: ``(Q, P)`` starting residuals.
        data: The examples of the product.
        iterations: Number of products (≥ 1).

    Returns:
        ``(Q,)`` step sizes.
    """
    return _power(product, apply_p, r0, apply_p(r0), data, iterations)[0]


def _power(product, apply_p, r0, z0, data, iterations):
    """:func:`power_alpha` given ``z_0 = P^{-1} r_0``; also returns ``A z_0`` (``(Q, P)``).

    The first iteration's ``y = P^{-1}(r_0/‖r_0‖)`` is ``z_0/‖r_0‖``, so its product times
    ``‖r_0‖`` is ``A z_0``, which a Neumann step needs next.
    """
    norm = r0.norm(dim=1, keepdim=True).clamp_min(torch.finfo(r0.dtype).tiny)  # (Q, 1)
    mu = torch.zeros(r0.shape[0], dtype=r0.dtype, device=r0.device)
    u, y, az0 = r0 / norm, z0 / norm, None
    for i in range(max(1, iterations)):
        if i:
            y = apply_p(u)
        w = product.damped(y, data)
        if i == 0:
            az0 = w * norm  # A z₀
        mu = torch.maximum(mu, _dot(y, w) / _dot(y, u))  # Rayleigh quotient ≤ μ_max
        u = w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        del w, y
    return 1.0 / mu.clamp_min(torch.finfo(mu.dtype).tiny), az0


def _check(res: torch.Tensor, first: torch.Tensor, r: torch.Tensor, product, step: int) -> None:
    """Stop on a residual that is NaN/Inf or over 10× its start, naming the query and layer.

    The layer named is the one holding a non-finite residual entry, else the largest share
    ``‖r_ℓ‖²`` of the residual. Nothing has been stored at this point (the preconditioned
    queries are returned, and a scores stage saved, only after the refinement finishes).
    """
    finite = torch.isfinite(res)
    bad = ~finite | (res > 10 * first)
    if not bool(bad.any()):
        return
    q = int(bad.nonzero()[0, 0])
    parts = product.unflatten(r[q : q + 1])
    broken = [n for n, v in parts.items() if not bool(torch.isfinite(v).all())]
    if broken:
        worst, where = broken[0], "the first layer with NaN/Inf residual entries"
    else:
        shares = {n: float(v.square().sum()) for n, v in parts.items()}
        worst, where = max(shares, key=shares.__getitem__), "the largest residual share"
    what = (
        "became NaN/Inf"
        if not bool(finite[q])
        else f"grew to {float(res[q]):.3g}, over 10× its start"
    )
    raise NumericalError(
        f"Refinement diverged for query {q} at step {step}: its relative residual ‖∇f − "
        f"(G+Λ)v‖/‖∇f‖ {what} (started at {float(first[q]):.3g}; expected it to shrink); "
        f"{where} is in layer {worst!r}. Nothing was stored. Increase the damping (score "
        "time: ScoreConfig(damping_factor=...), CLI --damping-factor; or refit with "
        "FitConfig.damping / damping_factor), use refine='cg' (CLI --refine-method cg), or, "
        "for Neumann / ASTRA, a smaller step alpha (default: automatic)."
    )
