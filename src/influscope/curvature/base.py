"""The curvature interface: fit statistics → precondition a gradient.

A curvature operator approximates, per tracked layer ℓ, the damped Gauss-Newton Hessian
``G_ℓ + λ_ℓ I`` of the training objective (mean over sequences of the summed token loss)
and applies its inverse to a gradient given in the ``(out, in)`` layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from influscope.linalg import low_rank
from influscope.modules.capture import LayerBatch


class CurvatureOperator(ABC):
    """Block-diagonal (per layer) damped curvature with an inverse-vector product.

    Attributes:
        damping: ``{layer: λ_ℓ}`` in absolute units.
    """

    name: ClassVar[str]

    def __init__(self, damping: dict[str, float]) -> None:
        self.damping = dict(damping)

    @property
    def layer_names(self) -> list[str]:
        return list(self.damping)

    @abstractmethod
    def precondition(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        """``(G_ℓ + λ_ℓ I)^{-1} g`` for ``g`` of shape ``(..., out, in)``."""

    def precondition_low_rank(
        self, layer: str, g: torch.Tensor, rank: int, method: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-``r`` factors ``U (B, r, out)``, ``V (B, r, in)`` of ``(G_ℓ + λ_ℓ I)^{-1} g``
        (:func:`influscope.linalg.low_rank` of the preconditioned matrix)."""
        return low_rank(self.precondition(layer, g), rank, method)

    def precondition_batch(self, layer: str, batch: LayerBatch) -> torch.Tensor:
        """``(G_ℓ + λ_ℓ I)^{-1} ∇_W`` of each example of a captured batch: ``(B, out, in)``.

        The per-example gradient is ``Σ_t s_t ā_tᵀ``; an operator whose preconditioner can
        use that factored form (a Kronecker eigenbasis) overrides this.
        """
        return self.precondition(layer, batch.gradient())

    def precondition_low_rank_batch(
        self, layer: str, batch: LayerBatch, rank: int, method: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`precondition_low_rank` of the per-example gradients of a captured batch."""
        return self.precondition_low_rank(layer, batch.gradient(), rank, method)

    def quadratic(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        """``gᵀ (G_ℓ + λ_ℓ I)^{-1} g`` for ``g`` of shape ``(B, out, in)``: ``(B,)``."""
        return (g * self.precondition(layer, g)).sum(dim=(-2, -1))

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to store (``"{layer}::{key}"`` → tensor)."""

    @classmethod
    @abstractmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], damping: dict[str, float]
    ) -> CurvatureOperator:
        """Rebuild the operator from :meth:`tensors` and its damping."""

    def held_bytes(self) -> int:
        """Bytes of factors held in memory while the operator is used (all its tensors; a
        streamed operator holds one layer's)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> CurvatureOperator:
        """A copy with every tensor on ``device``."""
        return type(self).from_tensors(
            {k: v.to(device) for k, v in self.tensors().items()}, self.damping
        )

    def dense(self, layer: str) -> torch.Tensor:
        """The damped matrix ``G_ℓ + λ_ℓ I`` as a dense ``(out·in, out·in)`` tensor (tests)."""
        raise NotImplementedError


def split_keys(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"layer::key": t}`` → ``{layer: {key: t}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for full, t in tensors.items():
        layer, key = full.rsplit("::", 1)
        out.setdefault(layer, {})[key] = t
    return out


def relative_damping(values: torch.Tensor, factor: float, absolute: float | None) -> float:
    """``absolute`` when given, else ``factor × mean(values)``."""
    if absolute is not None:
        return float(absolute)
    return float(factor * values.double().mean())
