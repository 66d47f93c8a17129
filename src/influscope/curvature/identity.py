"""Identity curvature: ``G = I`` — influence is the gradient dot product (TracIn at one
checkpoint). No statistics are fitted and damping is not applied."""

from __future__ import annotations

import torch

from influscope.curvature.base import CurvatureOperator


class IdentityOperator(CurvatureOperator):
    """``precondition(g) = g``."""

    name = "identity"

    def precondition(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        return g

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_tensors(cls, tensors, damping) -> IdentityOperator:
        return cls(damping)

    def dense(self, layer: str) -> torch.Tensor:
        raise NotImplementedError("identity has no stored shape; use torch.eye")
