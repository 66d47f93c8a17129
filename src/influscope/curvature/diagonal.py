"""Diagonal curvature: ``G ≈ diag(E_z[(∇L(z))²])``, the diagonal of the per-sequence Fisher.

``precondition(g) = g / (d + λ)`` with ``d_ij = mean_z (∇_{W_ij} L(z))²`` and
``λ = damping_factor × mean(d)`` per layer by default.
"""

from __future__ import annotations

import torch

from influscope.curvature.base import CurvatureOperator, split_keys


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
