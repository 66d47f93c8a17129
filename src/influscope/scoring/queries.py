"""Preconditioned query gradients, optionally as rank-r factorisations.

For query ``q`` and layer ℓ the stored quantity is ``q̃_ℓ = (G_ℓ + λ_ℓ I)^{-1} ∇_{W_ℓ} f_q``,
an ``(out, in)`` matrix. With ``rank = r`` it is kept as its truncated SVD
``q̃_ℓ ≈ Σ_{k<r} σ_k u_k v_k^⊤`` (σ folded into ``u``): ``U (Q, r, out)``, ``V (Q, r, in)``.
Many queries then share one pass over the training data (Grosse et al. 2023, §3.2).

The truncated SVD is exact (``torch.linalg.svd``) or randomized (Halko, Martinsson & Tropp
2011, Alg. 4.4; ``ScoreConfig.query_svd``, default ``"auto"``: randomized when the sketch is at
most a quarter of the smaller side, ``4 (r + oversample) ≤ min(out, in)``, else exact): a seeded
Gaussian sketch ``Ω (in × k)``, ``k = r + oversample``, the range ``Q`` of ``(q̃ q̃^⊤)^p q̃ Ω``
found by ``p`` QR-stabilised power iterations, then the exact SVD of the small ``Q^⊤ q̃
(k × in)``. Cost ``O(out·in·k)`` per matrix instead of ``O(out·in·min(out, in))`` — an order of
magnitude on LLM-sized layers; with ``k ≥ min(out, in)`` it is the exact truncated SVD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from influscope.config import ScoreConfig, resolve_dtype
from influscope.curvature.base import CurvatureOperator
from influscope.curvature.eigen import KroneckerEigenOperator
from influscope.modules.passes import layer_passes
from influscope.modules.selection import TrackedLayer
from influscope.tasks.base import Task
from influscope.tasks.data import EncodedDataset

#: Above this many stored elements (all queries, all layers) low-rank queries stay factored.
DENSE_BUDGET = 2**27


@dataclass
class PreconditionedQueries:
    """Per-layer preconditioned query gradients.

    Attributes:
        dense: ``{layer: (Q, out, in)}`` for layers kept (or reconstructed) dense.
        factors: ``{layer: (U (Q, r, out), V (Q, r, in))}`` for low-rank layers.
        measurements: ``(Q,)`` the measurement ``f`` of each query at θ.
    """

    layer_names: list[str]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    measurements: torch.Tensor | None = None

    @property
    def n_queries(self) -> int:
        name = self.layer_names[0]
        return int(
            self.dense[name].shape[0] if name in self.dense else self.factors[name][0].shape[0]
        )

    def matrix(self, layer: str) -> torch.Tensor:
        """The ``(Q, out, in)`` matrix of a layer (reconstructed from factors if needed)."""
        if layer in self.dense:
            return self.dense[layer]
        u, v = self.factors[layer]
        return torch.einsum("qro,qri->qoi", u, v)

    def select(self, queries: list[int]) -> PreconditionedQueries:
        """A view restricted to some queries."""
        return PreconditionedQueries(
            self.layer_names,
            {k: v[queries] for k, v in self.dense.items()},
            {k: (u[queries], v[queries]) for k, (u, v) in self.factors.items()},
            None if self.measurements is None else self.measurements[queries],
        )


#: Extra sketch columns and power iterations of the randomized SVD.
OVERSAMPLE, POWER_ITERATIONS = 8, 4


def randomized_svd(
    p: torch.Tensor, rank: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded randomized truncated SVD of a batch ``p (Q, m, n)`` (see the module docstring).

    Returns:
        ``u (Q, m, k)``, ``s (Q, k)``, ``vh (Q, k, n)`` with ``k = min(rank + OVERSAMPLE, m, n)``,
        singular values in descending order.
    """
    m, n = p.shape[-2:]
    k = min(rank + OVERSAMPLE, m, n)
    gen = torch.Generator(device=p.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, device=p.device, dtype=p.dtype)  # (n, k)
    q, _ = torch.linalg.qr(p @ omega)  # (Q, m, k)
    for _ in range(POWER_ITERATIONS):
        z, _ = torch.linalg.qr(p.transpose(-2, -1) @ q)  # (Q, n, k)
        q, _ = torch.linalg.qr(p @ z)  # (Q, m, k)
    ub, s, vh = torch.linalg.svd(
        q.transpose(-2, -1) @ p, full_matrices=False
    )  # (Q,k,k),(Q,k),(Q,k,n)
    return q @ ub, s, vh


def low_rank(
    p: torch.Tensor, rank: int, method: str = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``p ≈ U V`` with singular values folded into ``U``.

    Args:
        p: ``(Q, out, in)``.
        rank: ``r``.
        method: ``"exact"`` (``torch.linalg.svd``), ``"randomized"`` (:func:`randomized_svd`) or
            ``"auto"`` (randomized when ``4 (rank + OVERSAMPLE) ≤ min(out, in)``).

    Returns:
        ``U (Q, r, out)``, ``V (Q, r, in)``.
    """
    x = p.double() if p.dtype == torch.float64 else p.float()
    if method == "auto":
        method = "randomized" if 4 * (rank + OVERSAMPLE) <= min(p.shape[-2:]) else "exact"
    if method == "randomized":
        u, s, vh = randomized_svd(x, rank)  # (Q, out, k), (Q, k), (Q, k, in)
    else:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)  # (Q, out, k), (Q, k), (Q, k, in)
    r = min(rank, s.shape[-1])
    uu = (u[..., :r] * s[:, None, :r]).transpose(1, 2)  # (Q, r, out)
    return uu.to(p.dtype).contiguous(), vh[:, :r, :].to(p.dtype).contiguous()


def preconditioned_low_rank(
    operator: CurvatureOperator, name: str, g: torch.Tensor, rank: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` factors ``U (B, r, out)``, ``V (B, r, in)`` of ``(G + λI)^{-1} g``.

    For a Kronecker-eigenbasis operator (K-FAC, EK-FAC) the preconditioned matrix is
    ``Q_S X Q_A^⊤`` with ``X = (Q_S^⊤ g Q_A) ⊘ (Λ + λ)``; ``Q_S``, ``Q_A`` are orthogonal, so its
    SVD is that of ``X`` with the singular vectors rotated: ``U = U_X Q_S^⊤``, ``V = V_X Q_A^⊤``.
    The SVD therefore runs in the eigenbasis and only the ``r`` factor rows are rotated back
    (``r·(out² + in²)`` instead of the full ``out·in·(out + in)`` back-rotation).
    """
    if isinstance(operator, KroneckerEigenOperator):
        lam = operator.eigenvalues[name].to(g.device, g.dtype) + operator.damping[name]
        u, v = low_rank(operator.rotate(name, g) / lam, rank, method)  # (B, r, out), (B, r, in)
        q_s = operator.q_s[name].to(u.device, u.dtype)  # (out, out)
        q_a = operator.q_a[name].to(v.device, v.dtype)  # (in, in)
        return u @ q_s.t(), v @ q_a.t()
    return low_rank(operator.precondition(name, g), rank, method)


def precondition_queries(
    model: nn.Module,
    task: Task,
    layers: list[TrackedLayer],
    operator: CurvatureOperator,
    queries: EncodedDataset,
    config: ScoreConfig,
    dense_budget: int = DENSE_BUDGET,
) -> PreconditionedQueries:
    """Compute ``(G + λI)^{-1} ∇f`` for every query and layer (one pass over the queries)."""
    dense: dict[str, list[torch.Tensor]] = {}
    us: dict[str, list[torch.Tensor]] = {}
    vs: dict[str, list[torch.Tensor]] = {}
    values = []
    for _, grads, f in layer_passes(
        model,
        task,
        layers,
        queries,
        batch_size=config.batch_size,
        objective="measurement",
        amp_dtype=resolve_dtype(config.amp_dtype),
        desc="query gradients",
    ):
        values.append(f)
        for name, lb in grads.items():
            g = lb.gradient()  # (B, out, in)
            if config.query_rank is None or config.query_rank >= min(g.shape[-2:]):
                dense.setdefault(name, []).append(operator.precondition(name, g))
            else:
                u, v = preconditioned_low_rank(
                    operator, name, g, config.query_rank, config.query_svd
                )
                us.setdefault(name, []).append(u)
                vs.setdefault(name, []).append(v)
    names = [layer.name for layer in layers]
    pq = PreconditionedQueries(
        names,
        {k: torch.cat(v) for k, v in dense.items()},
        {k: (torch.cat(us[k]), torch.cat(vs[k])) for k in us},
        torch.cat(values),
    )
    # Reconstruct low-rank layers densely when it fits: the dense contraction is cheaper per
    # training token than the factored one (out·in vs Q·r·(out+in)), and scores are identical.
    total = sum(pq.n_queries * layer.numel for layer in layers)
    if total <= dense_budget:
        for name in list(pq.factors):
            pq.dense[name] = pq.matrix(name)
            del pq.factors[name]
    return pq
