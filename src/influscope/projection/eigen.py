"""Eigen-coordinate selection: index the ``K`` EK-FAC eigen-coordinates that carry the most
preconditioned mass, instead of a random LoGra subspace.

EK-FAC writes a layer's damped curvature as ``(Q_S ⊗ Q_A) diag(Λ + λ) (Q_S ⊗ Q_A)^⊤``, so the
influence of a training gradient ``G`` (out × in) on a query gradient ``G_q`` is a sum over
eigen-coordinates ``(i, j)``:

.. math:: g_q^⊤ (F + λI)^{-1} g = \\sum_ℓ \\sum_{ij} \\frac{q̃_{ij}\\, g̃_{ij}}{Λ_{ij} + λ_ℓ},
   \\qquad g̃ = Q_S^⊤ G Q_A = \\sum_t (Q_S^⊤ s_t)(Q_A^⊤ ā_t)^⊤.

Under the model that defines ``Λ`` (``E[g̃_ij²] = Λ_ij``, and a query drawn like the training
gradients), the term of coordinate ``(i, j)`` has second moment ``Λ_ij² / (Λ_ij + λ_ℓ)²``, which
is monotone in ``r_ij = Λ_ij / (Λ_ij + λ_ℓ)``. So, for a budget of ``K`` stored numbers per
sequence, the selection keeps the ``K`` coordinates with the largest ``r_ij`` over *all* layers
(``r`` is scale-free, so layers compete fairly). The rows of the projection are the orthonormal
vectors ``q_{S,i} ⊗ q_{A,j}``; in that subspace EK-FAC is diagonal, so the index preconditions a
query by dividing by ``Λ_ij + λ_ℓ`` — no projected curvature has to be fitted, and with the whole
budget (``K = D``) the scores are exactly the unprojected EK-FAC scores.

Cost per token: rotating ``ā`` and ``s`` onto the used eigenvectors (``r_in·in + r_out·out``,
``r`` = distinct rows/columns among the kept coordinates), then the ``(r_out × r_in)`` gradient,
from which the kept entries are gathered. That is more than a ``64 × 64`` LoGra projection (at most
a full weight gradient per sequence), and the selection needs a fitted K-FAC/EK-FAC operator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from influscope.curvature.diagonal import DiagonalOperator
from influscope.errors import ConfigError
from influscope.modules.capture import LayerBatch
from influscope.modules.selection import TrackedLayer


@dataclass
class EigenSelection:
    """Per layer: used eigenvectors and the kept coordinates of the rotated gradient.

    Attributes:
        p_in: ``{layer: (r_in, in)}``, rows = the used eigenvectors of ``A`` (``Q_A^⊤`` rows).
        p_out: ``{layer: (r_out, out)}``, rows = the used eigenvectors of ``S``.
        select: ``{layer: (K_ℓ,)}`` int64 positions in the flattened ``(r_out, r_in)`` gradient.
        coords: ``{layer: (K_ℓ,)}`` int64 kept coordinates ``i·in + j`` in the ``(out, in)``
            eigenvalue matrix (ascending, like ``select``).
        eigenvalues: ``{layer: (K_ℓ,)}`` EK-FAC eigenvalues ``Λ_ij`` of the kept coordinates.
        damping: ``{layer: λ_ℓ}`` of the operator the selection was made from (absolute).
    """

    p_in: dict[str, torch.Tensor]
    p_out: dict[str, torch.Tensor]
    select: dict[str, torch.Tensor]
    coords: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]
    damping: dict[str, float]

    @classmethod
    def from_operator(
        cls,
        operator,
        layers: Sequence[TrackedLayer],
        budget: int,
        dtype: torch.dtype = torch.float32,
    ) -> EigenSelection:
        """Keep the ``budget`` coordinates with the largest ``Λ_ij / (Λ_ij + λ_ℓ)`` over all layers.

        Every layer keeps at least its top coordinate (so ``K`` can exceed ``budget`` by at most
        the number of layers); a budget of at least ``D`` keeps every coordinate. The used
        eigenvectors are kept in ``dtype`` (the model's compute dtype: float32 halves the disk
        of a float64 operator's eigenvectors).

        Raises:
            ConfigError: If ``operator`` has no Kronecker eigenbasis (``kfac``/``ekfac``).
        """
        if not hasattr(operator, "q_a"):
            raise ConfigError(
                "The 'eigen' index selection needs a fitted 'kfac' or 'ekfac' operator, received "
                f"{getattr(operator, 'name', type(operator).__name__)!r}. Fit EK-FAC factors first "
                "(`influscope fit --curvature ekfac`), or use init='orthogonal'."
            )
        names = [layer.name for layer in layers]
        ratios = []
        for n in names:
            lam = operator.eigenvalues[n].double().clamp_min(0)  # (out, in)
            ratios.append((lam / (lam + operator.damping[n])).flatten())  # (out·in,)
        flat = torch.cat(ratios)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(min(budget, flat.numel())).indices] = True
        out = cls({}, {}, {}, {}, {}, {n: float(operator.damping[n]) for n in names})
        offset = 0
        for n, r in zip(names, ratios):
            mask = keep[offset : offset + r.numel()]
            offset += r.numel()
            if not mask.any():
                mask = torch.zeros_like(mask)
                mask[r.argmax()] = True
            out._add_layer(n, operator, mask.nonzero().squeeze(1), dtype)
        return out

    def _add_layer(self, name: str, operator, coords: torch.Tensor, dtype: torch.dtype) -> None:
        q_a, q_s = operator.q_a[name], operator.q_s[name]  # (in, in), (out, out)
        width = q_a.shape[0]
        rows, cols = coords // width, coords % width  # (K,), (K,)
        used_rows, used_cols = rows.unique(), cols.unique()  # sorted
        pos = torch.searchsorted(used_rows, rows) * len(used_cols)
        self.select[name] = pos + torch.searchsorted(used_cols, cols)  # (K,)
        self.coords[name] = coords.cpu()  # (K,)
        self.p_out[name] = q_s[:, used_rows].t().to("cpu", dtype).contiguous()  # (r_out, out)
        self.p_in[name] = q_a[:, used_cols].t().to("cpu", dtype).contiguous()  # (r_in, in)
        lam = operator.eigenvalues[name].reshape(-1)[coords]
        self.eigenvalues[name] = lam.double().clamp_min(0).cpu()  # (K,)

    @property
    def layer_names(self) -> list[str]:
        return list(self.select)

    def to(self, device: torch.device | str) -> EigenSelection:
        """Eigenvectors and gather positions on ``device`` (moved once, not in every batch)."""
        return EigenSelection(
            {n: p.to(device) for n, p in self.p_in.items()},
            {n: p.to(device) for n, p in self.p_out.items()},
            {n: s.to(device) for n, s in self.select.items()},
            self.coords,
            self.eigenvalues,
            self.damping,
        )

    def size(self, name: str) -> int:
        """Stored numbers per sequence for one layer (``K_ℓ``)."""
        return int(self.select[name].numel())

    def gradients(self, grads: dict[str, LayerBatch]) -> dict[str, torch.Tensor]:
        """Kept eigen-coordinates of each per-example gradient: ``{layer: (B, K_ℓ)}``."""
        out = {}
        for name, lb in grads.items():
            p_in = self.p_in[name].to(lb.a.device, lb.a.dtype)
            p_out = self.p_out[name].to(lb.s.device, lb.s.dtype)
            rotated = LayerBatch(
                a=lb.a @ p_in.t(), s=lb.s @ p_out.t(), mask=lb.mask, routed=lb.routed
            )
            g = rotated.gradient().flatten(1)  # (B, r_out·r_in)
            out[name] = g[:, self.select[name].to(g.device)]  # (B, K_ℓ)
        return out

    def operator(self) -> DiagonalOperator:
        """EK-FAC restricted to the kept coordinates: ``diag(Λ_ij + λ_ℓ)``."""
        return DiagonalOperator(dict(self.eigenvalues), dict(self.damping))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.select:
            out[f"{name}::p_in"] = self.p_in[name]
            out[f"{name}::p_out"] = self.p_out[name]
            out[f"{name}::select"] = self.select[name]
            out[f"{name}::coords"] = self.coords[name]
            out[f"{name}::eigenvalues"] = self.eigenvalues[name]
            out[f"{name}::damping"] = torch.tensor(self.damping[name], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> EigenSelection:
        out = cls({}, {}, {}, {}, {}, {})
        for key, t in tensors.items():
            layer, which = key.rsplit("::", 1)
            if which == "damping":
                out.damping[layer] = float(t)
            else:
                getattr(out, which)[layer] = t
        return out
