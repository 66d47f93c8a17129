"""Gradient projection. Implementations: :class:`LograProjector` (LoGra, Kronecker-structured:
``P_out ∇W P_in^⊤`` formed from projected activations and output gradients)."""

from influscope.projection.projector import INITS, LograProjector, ProjectedLayer

__all__ = ["INITS", "LograProjector", "ProjectedLayer"]
