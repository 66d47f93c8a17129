"""Identity curvature: ``G = I`` — influence is the gradient dot product (TracIn at one
checkpoint). No statistics are fitted and damping is not applied."""

from __future__ import annotations

import torch

from influscope.curvature.base import CurvatureOperator
from influscope.curvature.spec import CurvatureSpec, no_fit_estimate


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


def fit_identity(passes, layers, config) -> IdentityOperator:
    """Nothing to fit: zero damping on every layer."""
    return IdentityOperator({layer.name: 0.0 for layer in layers})


SPEC = CurvatureSpec(
    "identity",
    IdentityOperator,
    fit_identity,
    estimate=no_fit_estimate,
)
