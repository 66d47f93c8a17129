"""Preconditioned query gradients, optionally as rank-r factorisations.

For query ``q`` and layer ℓ the stored quantity is ``q̃_ℓ = (G_ℓ + λ_ℓ I)^{-1} ∇_{W_ℓ} f_q``,
an ``(out, in)`` matrix. With ``rank = r`` it is kept as its truncated SVD
``q̃_ℓ ≈ Σ_{k<r} σ_k u_k v_k^⊤`` (σ folded into ``u``): ``U (Q, r, out)``, ``V (Q, r, in)``.
Many queries then share one pass over the training data (Grosse et al. 2023, §3.2).

The truncated SVD is exact or randomized (:mod:`influscope.linalg`, ``ScoreConfig.query_svd``,
default ``"auto"``); K-FAC/EK-FAC take it in their eigenbasis
(:meth:`~influscope.curvature.base.CurvatureOperator.precondition_low_rank`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from influscope.config import ScoreConfig, resolve_dtype
from influscope.curvature.base import CurvatureOperator
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
        source: Fingerprint of the encoded queries these gradients came from
            (:meth:`EncodedDataset.fingerprint`), so that a stored scores stage can be checked
            against them; ``None`` when unknown (built by hand).
    """

    layer_names: list[str]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    measurements: torch.Tensor | None = None
    source: str | None = None

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
            None if self.source is None else _digest(f"{self.source}{list(queries)}"),
        )


def _digest(text: str) -> str:
    """A 16-hex-digit SHA-256 of ``text`` (the length of :meth:`EncodedDataset.fingerprint`)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
                u, v = operator.precondition_low_rank(name, g, config.query_rank, config.query_svd)
                us.setdefault(name, []).append(u)
                vs.setdefault(name, []).append(v)
    names = [layer.name for layer in layers]
    pq = PreconditionedQueries(
        names,
        {k: torch.cat(v) for k, v in dense.items()},
        {k: (torch.cat(us[k]), torch.cat(vs[k])) for k in us},
        torch.cat(values),
        queries.fingerprint(),
    )
    # Reconstruct low-rank layers densely when it fits: the dense contraction is cheaper per
    # training token than the factored one (out·in vs Q·r·(out+in)), and scores are identical.
    total = sum(pq.n_queries * layer.numel for layer in layers)
    if total <= dense_budget:
        for name in list(pq.factors):
            pq.dense[name] = pq.matrix(name)
            del pq.factors[name]
    return pq
