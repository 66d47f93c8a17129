"""EK-FAC-preconditioned refinement of ``(G + Λ)^{-1} ∇f`` (ASTRA, Wang et al. 2025).

Block-diagonal EK-FAC ``P`` ignores the cross-layer blocks of the Gauss-Newton matrix. Here
the true system ``(G + Λ) v = b`` with ``b = ∇f_q`` (all tracked layers jointly, ``Λ`` the
per-layer damping of the factors) is solved iteratively with ``P^{-1}`` as preconditioner:

* ``"cg"``: preconditioned conjugate gradient from ``x_0 = P^{-1} b``;
* ``"neumann"``: preconditioned Richardson ``v_{k+1} = v_k + α P^{-1}(b − (G + Λ) v_k)``
  from ``v_0 = P^{-1} b`` (step ``α``, default 1; converges when the spectral radius of
  ``I − α P^{-1}(G + Λ)`` is below 1).

Each step costs one Gauss-Newton product over the training examples (all of them, or a
seeded random subset of ``examples`` drawn afresh each iteration: stochastic, so CG then
only approximately keeps its conjugacy). Zero steps return ``P^{-1} b`` untouched. Each
query stops once its relative residual ``‖b − (G+Λ)v‖/‖b‖`` reaches ``tol``.
"""

from __future__ import annotations

import torch

from influscope.errors import ConfigError, NumericalError
from influscope.progress import track
from influscope.solvers.gnh import GaussNewtonProduct
from influscope.tasks.data import EncodedDataset

METHODS = ("cg", "neumann")


def _subset(data: EncodedDataset, examples: int | None, seed: int, step: int) -> EncodedDataset:
    if examples is None or examples >= len(data):
        return data
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    pick = torch.randperm(len(data), generator=g)[:examples].sort().values.tolist()
    return data.subset(pick)


def refine_queries(
    product: GaussNewtonProduct,
    operator,
    grads: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    train: EncodedDataset,
    *,
    steps: int,
    method: str = "cg",
    tol: float = 0.0,
    examples: int | None = None,
    seed: int = 0,
    alpha: float = 1.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Refine ``P^{-1} b`` towards ``(G + Λ)^{-1} b`` for a block of ``Q`` queries.

    Args:
        product: The ``(G + Λ) V`` product.
        operator: The preconditioner ``P`` (any CurvatureOperator: ``precondition(name, g)``).
        grads: ``b = {layer: (Q, out, in)}`` query gradients.
        start: ``P^{-1} b`` (the plain preconditioned queries), same layout.
        train: Training examples defining ``G``.
        steps, method, tol, examples, seed: See ``ScoreConfig.refine_*``.
        alpha: Neumann step size.

    Returns:
        The refined ``{layer: (Q, out, in)}`` and the relative residuals ``(Q, k+1)``
        (``k ≤ steps`` iterations run; converged queries repeat their last value).

    Raises:
        NumericalError: A residual became NaN/Inf or grew over 10× its start (the message
            names the query, the step and the layer, and suggests more damping).
    """
    if method not in METHODS:
        raise ConfigError(f"refine must be one of {METHODS}, received {method!r}.")
    names = [layer.name for layer in product.layers]
    b = product.flatten({n: grads[n] for n in names}).to(start[names[0]].dtype)
    x = product.flatten(start)
    bnorm = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)  # (Q,)

    def apply_p(r: torch.Tensor) -> torch.Tensor:
        parts = product.unflatten(r)
        return product.flatten({n: operator.precondition(n, parts[n]) for n in names})

    r = b - product.damped(x, _subset(train, examples, seed, 0))
    history = [r.norm(dim=1) / bnorm]
    _check(history[0], history[0], r, product, 0)  # a NaN/Inf start (preconditioner, data)
    active = history[0] > tol
    z = apply_p(r)
    p = z.clone()
    rz = (r * z).sum(1)
    for k in track(range(steps), desc=f"refine ({method})", total=steps, unit="step"):
        if not bool(active.any()):
            break
        data = _subset(train, examples, seed, k + 1)
        m = active[:, None]
        if method == "cg":
            ap = product.damped(p, data)
            step = rz / (p * ap).sum(1)
            step = torch.where(active, step, torch.zeros_like(step))
            x = x + step[:, None] * p
            r = torch.where(m, r - step[:, None] * ap, r)
            z = apply_p(r)
            rz_new = (r * z).sum(1)
            beta = rz_new / rz
            p = torch.where(m, z + beta[:, None] * p, p)
            rz = torch.where(active, rz_new, rz)
        else:
            az = product.damped(z, data)
            x = torch.where(m, x + alpha * z, x)
            r = torch.where(m, r - alpha * az, r)
            z = apply_p(r)
        res = r.norm(dim=1) / bnorm
        history.append(res)
        _check(res, history[0], r, product, k + 1)
        active = active & (res > tol)
    return product.unflatten(x), torch.stack(history, 1)


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
        "for Neumann, a smaller step alpha."
    )
