"""Diagonal curvature: ``G ≈ diag(E_z[(∇L(z))²])``, the diagonal of the per-sequence Fisher.

``precondition(g) = g / (d + λ)`` with ``d_ij = mean_z (∇_{W_ij} L(z))²`` and
``λ = damping_factor × mean(d)`` per layer by default.
"""

from __future__ import annotations

import torch

from influscope.curvature.base import CurvatureOperator, relative_damping, split_keys
from influscope.curvature.spec import CurvatureSpec, one_pass_estimate, stats_dtype
from influscope.curvature.statistics import diagonal_statistics


class DiagonalOperator(CurvatureOperator):
    """Elementwise inverse of the damped diagonal Fisher."""

    name = "diagonal"

    def __init__(self, diag: dict[str, torch.Tensor], damping: dict[str, float]) -> None:
        super().__init__(damping)
        self.diag = diag  # {layer: (out, in)}

    def precondition(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        d = self.diag[layer].to(g.device, g.dtype)
        return g / (d + self.damping[layer])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}::diag": d for name, d in self.diag.items()}

    @classmethod
    def from_tensors(cls, tensors, damping) -> DiagonalOperator:
        return cls({k: v["diag"] for k, v in split_keys(tensors).items()}, damping)

    def dense(self, layer: str) -> torch.Tensor:
        return torch.diag(self.diag[layer].reshape(-1).double() + self.damping[layer])


def fit_diagonal(passes, layers, config) -> DiagonalOperator:
    """One pass: ``d = mean_z (∇L(z))^{⊙2}``; damping ``factor × mean(d_ℓ)`` per layer."""
    sums, n = diagonal_statistics(passes, stats_dtype(config), layers)
    diag = {k: v / n for k, v in sums.items()}  # {layer: (out, in)}
    damping = {
        k: relative_damping(d, config.damping_factor, config.damping) for k, d in diag.items()
    }
    return DiagonalOperator(diag, damping)


SPEC = CurvatureSpec(
    "diagonal",
    DiagonalOperator,
    fit_diagonal,
    estimate=one_pass_estimate,
)
