"""LoGra: Kronecker-structured projection of per-example gradients (Choe et al. 2024,
"What is Your Data Worth to GPT? LLM-Scale Data Valuation with Influence Functions",
arXiv 2405.13954).

For a linear layer with per-token activations ``ā_t`` (in) and output gradients ``s_t`` (out),
the per-example gradient is ``DW = Σ_t s_t ā_t^⊤`` (out × in). With projections
``P_in`` (k_in × in) and ``P_out`` (k_out × out),

.. math:: P_{out}\\, DW\\, P_{in}^⊤ = \\sum_t (P_{out} s_t)(P_{in} ā_t)^⊤,

so the activations and output gradients are projected *before* the per-example gradient is
formed: the cost per token is ``k_in·in + k_out·out`` instead of ``in·out``, and the projected
gradient (``k_out × k_in``, default 64 × 64) is what a persistent index stores.

Initialisations (registry :data:`INITS`):

* ``orthogonal`` (default) — the Gaussian matrix below with its rows orthonormalised (QR),
  i.e. a uniformly random ``k``-dimensional subspace. Why it matters: with projected
  gradients ``g̃ = P g`` and projected curvature ``F̃ = P F P^⊤``, the projected score is
  ``g_q^⊤ P^⊤ (P F P^⊤ + λ̃ I)^{-1} P g``. When ``P P^⊤ = I`` the damping stays isotropic inside
  the kept subspace, and at full width (``P`` square) the score is exactly the unprojected one
  — an orthogonal change of basis. With a Gaussian ``P`` the same expression equals
  ``g_q^⊤ (F + λ̃ (P^⊤P)^{-1})^{-1} g`` at full width: the damping is scaled by the spread
  (Marchenko–Pastur) spectrum of ``P^⊤P``, which distorts the ranking even without any loss of
  dimension. The overall scale of ``P`` cancels (relative damping), so no rescaling is needed.
* ``gaussian`` — i.i.d. ``N(0, 1/k)`` entries, seeded per layer (Johnson-Lindenstrauss:
  inner products are preserved in expectation);
* ``pca`` — the top-``k`` eigenvectors of the K-FAC factors ``A`` and ``S`` (needs a fitted
  K-FAC/EK-FAC operator), which keeps the directions where the curvature has most mass.
* ``eigen`` — not a Kronecker product of two projections but a selection of single EK-FAC
  eigen-coordinates (:class:`influscope.projection.eigen.EigenSelection`), with the same
  storage budget ``Σ_ℓ k_out k_in``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from influscope.errors import ConfigError
from influscope.modules.capture import LayerBatch
from influscope.modules.selection import TrackedLayer

#: Known initialisations of the projection matrices (``eigen``: :mod:`influscope.projection.eigen`).
INITS = ("orthogonal", "gaussian", "pca", "eigen")


def _layer_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _orthonormal_rows(p: torch.Tensor) -> torch.Tensor:
    """Rows of ``p`` (k × d, k ≤ d) orthonormalised by QR of ``p^⊤``, signs fixed by ``R``'s diagonal."""
    q, r = torch.linalg.qr(p.double().t())  # (d, k), (k, k)
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    return (q * sign).t().contiguous().to(p.dtype)  # (k, d)


@dataclass
class LograProjector:
    """Per-layer projections ``P_in`` (k_in × in) and ``P_out`` (k_out × out).

    Attributes:
        p_in: ``{layer: (k_in, in)}``.
        p_out: ``{layer: (k_out, out)}``.
    """

    p_in: dict[str, torch.Tensor]
    p_out: dict[str, torch.Tensor]

    @classmethod
    def gaussian(
        cls, layers: Sequence[TrackedLayer], k_in: int, k_out: int, seed: int = 0
    ) -> LograProjector:
        """Seeded Gaussian projections with ``N(0, 1/k)`` entries (``k`` capped at the width)."""
        p_in, p_out = {}, {}
        for layer in layers:
            g = torch.Generator().manual_seed(_layer_seed(seed, layer.name))
            ki, ko = min(k_in, layer.in_dim), min(k_out, layer.out_dim)
            p_in[layer.name] = torch.randn(ki, layer.in_dim, generator=g) / ki**0.5
            p_out[layer.name] = torch.randn(ko, layer.out_dim, generator=g) / ko**0.5
        return cls(p_in, p_out)

    @classmethod
    def orthogonal(
        cls, layers: Sequence[TrackedLayer], k_in: int, k_out: int, seed: int = 0
    ) -> LograProjector:
        """The seeded Gaussian projections with orthonormal rows (``P P^⊤ = I_k``)."""
        base = cls.gaussian(layers, k_in, k_out, seed)
        return cls(
            {n: _orthonormal_rows(p) for n, p in base.p_in.items()},
            {n: _orthonormal_rows(p) for n, p in base.p_out.items()},
        )

    @classmethod
    def pca(cls, operator, layers: Sequence[TrackedLayer], k_in: int, k_out: int) -> LograProjector:
        """Top eigenvectors of the fitted Kronecker factors (``eigh`` sorts ascending).

        Raises:
            ConfigError: If ``operator`` has no Kronecker eigenbases (``kfac``/``ekfac``).
        """
        if not hasattr(operator, "q_a"):
            raise ConfigError(
                f"PCA initialisation needs a 'kfac' or 'ekfac' operator, received "
                f"{operator.name!r}. Fit one first, or use init='gaussian'."
            )
        p_in, p_out = {}, {}
        for layer in layers:
            q_a, q_s = operator.q_a[layer.name], operator.q_s[layer.name]
            p_in[layer.name] = q_a[:, -min(k_in, q_a.shape[1]) :].t().float().cpu()  # (k_in, in)
            p_out[layer.name] = q_s[:, -min(k_out, q_s.shape[1]) :].t().float().cpu()
        return cls(p_in, p_out)

    @property
    def layer_names(self) -> list[str]:
        return list(self.p_in)

    def to(self, device: torch.device | str) -> LograProjector:
        """The projections on ``device`` (moved once instead of in every batch)."""
        return LograProjector(
            {n: p.to(device) for n, p in self.p_in.items()},
            {n: p.to(device) for n, p in self.p_out.items()},
        )

    def shape(self, name: str) -> tuple[int, int]:
        """``(k_out, k_in)`` of a layer's projected gradient."""
        return self.p_out[name].shape[0], self.p_in[name].shape[0]

    def size(self, name: str) -> int:
        """Stored numbers per sequence for one layer (``k_out · k_in``)."""
        k_out, k_in = self.shape(name)
        return k_out * k_in

    def project(self, name: str, lb: LayerBatch) -> LayerBatch:
        """Project one layer's activations and output gradients: ``(B, T, k_in)``, ``(B, T, k_out)``."""
        p_in = self.p_in[name].to(lb.a.device, lb.a.dtype)
        p_out = self.p_out[name].to(lb.s.device, lb.s.dtype)
        return LayerBatch(a=lb.a @ p_in.t(), s=lb.s @ p_out.t(), mask=lb.mask, routed=lb.routed)

    def gradients(self, grads: dict[str, LayerBatch]) -> dict[str, torch.Tensor]:
        """Projected per-example gradients ``{layer: (B, k_out, k_in)}``."""
        return {name: self.project(name, lb).gradient() for name, lb in grads.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.p_in:
            out[f"{name}::p_in"] = self.p_in[name]
            out[f"{name}::p_out"] = self.p_out[name]
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> LograProjector:
        p_in, p_out = {}, {}
        for key, t in tensors.items():
            layer, which = key.rsplit("::", 1)
            (p_in if which == "p_in" else p_out)[layer] = t
        return cls(p_in, p_out)

    def layers(self, layers: Sequence[TrackedLayer]) -> list[ProjectedLayer]:
        """Stand-ins for ``layers`` with the projected widths (for the statistics passes)."""
        return [
            ProjectedLayer(layer.name, layer.module, *reversed(self.shape(layer.name)))
            for layer in layers
        ]

    def wrap(self, passes):
        """A pass factory whose batches carry projected activations and output gradients."""

        def make(desc: str, positions) -> Iterator:
            for pos, grads, values in passes(desc, positions):
                yield pos, {n: self.project(n, lb) for n, lb in grads.items()}, values

        return make


@dataclass(frozen=True)
class ProjectedLayer:
    """What the statistics passes need to know of a layer, in projected widths."""

    name: str
    module: torch.nn.Module
    in_dim: int
    out_dim: int
