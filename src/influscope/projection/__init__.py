"""Gradient projection. Implementations: :class:`LograProjector` (LoGra, Kronecker-structured:
``P_out ∇W P_in^⊤`` formed from projected activations and output gradients) and
:class:`EigenSelection` (the EK-FAC eigen-coordinates with the most preconditioned mass)."""

from __future__ import annotations

import torch

from influscope.projection.eigen import EigenSelection
from influscope.projection.projector import INITS, LograProjector, ProjectedLayer


def projector_from_tensors(init: str, tensors: dict[str, torch.Tensor]):
    """Rebuild a stored projection: :class:`EigenSelection` for ``init="eigen"``, else LoGra."""
    if init == "eigen":
        return EigenSelection.from_tensors(tensors)
    return LograProjector.from_tensors(tensors)


__all__ = ["INITS", "EigenSelection", "LograProjector", "ProjectedLayer", "projector_from_tensors"]
