"""A toy curvature written the way docs/design.md ("How to add a curvature") says: one file.

``G = s·I``: preconditioning divides by ``s + λ``. Its one option, ``scale`` (``s``), is a
settings dataclass; registering it is one line: ``CURVATURES["scaled"] = SPEC``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from influscope.config import Settings, require
from influscope.curvature import CurvatureOperator, CurvatureSpec
from influscope.curvature.spec import no_fit_estimate


@dataclass(frozen=True)
class ScaledOptions(Settings):
    """Attributes: scale: ``s`` in ``G = s·I`` (> 0)."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        require(self.scale > 0, f"scale must be > 0, received {self.scale}.")


class ScaledIdentityOperator(CurvatureOperator):
    """``precondition(g) = g / (s + λ)``."""

    name = "scaled"

    def __init__(self, scale: torch.Tensor, damping: dict[str, float]) -> None:
        super().__init__(damping)
        self.scale = scale  # () float64

    def precondition(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        return g / (float(self.scale) + self.damping[layer])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale}

    @classmethod
    def from_tensors(cls, tensors, damping) -> ScaledIdentityOperator:
        return cls(tensors["scale"], damping)


def fit_scaled(passes, layers, config) -> ScaledIdentityOperator:
    options = SPEC.options_of(config)
    damping = {layer.name: config.damping or 0.0 for layer in layers}
    return ScaledIdentityOperator(torch.tensor(options.scale, dtype=torch.float64), damping)


SPEC = CurvatureSpec(
    "scaled",
    ScaledIdentityOperator,
    fit_scaled,
    estimate=no_fit_estimate,
    options=ScaledOptions,
)
