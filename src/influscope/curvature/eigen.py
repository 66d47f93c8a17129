"""Kronecker-factored curvature in an eigenbasis — shared by K-FAC and EK-FAC.

For one layer with activation covariance ``A = Q_A Λ_A Q_Aᵀ`` (in × in) and output-gradient
covariance ``S = Q_S Λ_S Q_Sᵀ`` (out × out), both approximations write the curvature as

.. math:: G_ℓ = (Q_S ⊗ Q_A)\\, \\mathrm{diag}(\\mathrm{vec}\\,Λ)\\, (Q_S ⊗ Q_A)^⊤

with an ``(out, in)`` eigenvalue matrix ``Λ``: K-FAC uses ``Λ = T̄ · λ_S λ_Aᵀ`` and EK-FAC
refits ``Λ_ij = E_z[((Q_Sᵀ ∇_W L(z) Q_A)_ij)²]`` (George et al. 2018). The damped inverse is

.. math:: (G_ℓ + λ I)^{-1} V = Q_S\\, [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)]\\, Q_Aᵀ .

Reference: Grosse et al. 2023, "Studying Large Language Model Generalization with Influence
Functions", §2.2 and App. A.
"""

from __future__ import annotations

import torch

from influscope.curvature.base import CurvatureOperator, split_keys
from influscope.linalg import low_rank
from influscope.modules.capture import LayerBatch


def factored_rotation_is_cheaper(tokens: int, out_dim: int, in_dim: int) -> bool:
    """Whether ``(s Q_S)ᵀ (ā Q_A)`` costs fewer flops than ``Q_Sᵀ (sᵀ ā) Q_A`` per example.

    Rotating the ``T`` token rows first costs ``T·(out² + in² + out·in)``; forming the
    ``(out, in)`` gradient and rotating it costs ``T·out·in + out·in·(out + in)``. Queries
    and training sequences are usually far shorter than a layer is wide, so the first wins
    by one to two orders of magnitude.
    """
    factored = tokens * (out_dim * out_dim + in_dim * in_dim + out_dim * in_dim)
    dense = tokens * out_dim * in_dim + out_dim * in_dim * (out_dim + in_dim)
    return factored < dense


class KroneckerEigenOperator(CurvatureOperator):
    """Eigenbasis ``Q_S ⊗ Q_A`` with a full ``(out, in)`` eigenvalue matrix per layer."""

    name = "kronecker_eigen"

    def __init__(
        self,
        q_a: dict[str, torch.Tensor],
        q_s: dict[str, torch.Tensor],
        eigenvalues: dict[str, torch.Tensor],
        damping: dict[str, float],
    ) -> None:
        super().__init__(damping)
        self.q_a = q_a  # {layer: (in, in)}
        self.q_s = q_s  # {layer: (out, out)}
        self.eigenvalues = eigenvalues  # {layer: (out, in)}

    def rotate(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        """``Q_Sᵀ g Q_A`` for ``g`` of shape ``(..., out, in)``."""
        q_a = self.q_a[layer].to(g.device, g.dtype)
        q_s = self.q_s[layer].to(g.device, g.dtype)
        return q_s.t() @ g @ q_a  # (..., out, in)

    def rotate_batch(self, layer: str, batch: LayerBatch) -> torch.Tensor:
        """``Q_Sᵀ ∇_W Q_A`` of each example of a captured batch, ``(B, out, in)``.

        ``Q_Sᵀ (Σ_t s_t ā_tᵀ) Q_A = Σ_t (Q_Sᵀ s_t)(Q_Aᵀ ā_t)ᵀ``: the token rows are rotated
        before the gradient is formed when that is cheaper
        (:func:`factored_rotation_is_cheaper`); both orders give the same matrix.
        """
        a, s = batch.a, batch.s  # (B, T, in), (B, T, out)
        if not factored_rotation_is_cheaper(a.shape[1], s.shape[-1], a.shape[-1]):
            return self.rotate(layer, batch.gradient())
        q_a = self.q_a[layer].to(a.device, a.dtype)  # (in, in)
        q_s = self.q_s[layer].to(s.device, s.dtype)  # (out, out)
        return torch.einsum("bto,bti->boi", s @ q_s, a @ q_a)  # (B, out, in)

    def precondition(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        return self._from_rotated(layer, self.rotate(layer, g))

    def precondition_batch(self, layer: str, batch: LayerBatch) -> torch.Tensor:
        return self._from_rotated(layer, self.rotate_batch(layer, batch))

    def _from_rotated(self, layer: str, rot: torch.Tensor) -> torch.Tensor:
        """``Q_S [rot ⊘ (Λ + λ)] Q_Aᵀ`` for ``rot = Q_Sᵀ g Q_A`` of shape ``(..., out, in)``."""
        q_a = self.q_a[layer].to(rot.device, rot.dtype)
        q_s = self.q_s[layer].to(rot.device, rot.dtype)
        lam = self.eigenvalues[layer].to(rot.device, rot.dtype) + self.damping[layer]
        return q_s @ (rot / lam) @ q_a.t()  # (..., out, in)

    def precondition_low_rank(
        self, layer: str, g: torch.Tensor, rank: int, method: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors of ``Q_S X Q_A^⊤`` with ``X = (Q_S^⊤ g Q_A) ⊘ (Λ + λ)``.

        ``Q_S``, ``Q_A`` are orthogonal, so the SVD of the preconditioned matrix is that of ``X``
        with the singular vectors rotated: ``U = U_X Q_S^⊤``, ``V = V_X Q_A^⊤``. The SVD runs in
        the eigenbasis and only the ``r`` factor rows are rotated back (``r·(out² + in²)``
        instead of the full ``out·in·(out + in)`` back-rotation).
        """
        return self._low_rank_from_rotated(layer, self.rotate(layer, g), rank, method)

    def precondition_low_rank_batch(
        self, layer: str, batch: LayerBatch, rank: int, method: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`precondition_low_rank` with the rotation of :meth:`rotate_batch`."""
        return self._low_rank_from_rotated(layer, self.rotate_batch(layer, batch), rank, method)

    def _low_rank_from_rotated(
        self, layer: str, rot: torch.Tensor, rank: int, method: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.eigenvalues[layer].to(rot.device, rot.dtype) + self.damping[layer]
        u, v = low_rank(rot / lam, rank, method)  # (B, r, out), (B, r, in)
        q_s = self.q_s[layer].to(u.device, u.dtype)  # (out, out)
        q_a = self.q_a[layer].to(v.device, v.dtype)  # (in, in)
        return u @ q_s.t(), v @ q_a.t()

    def quadratic(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        lam = self.eigenvalues[layer].to(g.device, g.dtype) + self.damping[layer]
        return (self.rotate(layer, g).square() / lam).sum(dim=(-2, -1))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.q_a:
            out[f"{name}::q_a"] = self.q_a[name]
            out[f"{name}::q_s"] = self.q_s[name]
            out[f"{name}::eigenvalues"] = self.eigenvalues[name]
        return out

    @classmethod
    def from_tensors(cls, tensors, damping):
        parts = split_keys(tensors)
        return cls(
            {k: v["q_a"] for k, v in parts.items()},
            {k: v["q_s"] for k, v in parts.items()},
            {k: v["eigenvalues"] for k, v in parts.items()},
            damping,
        )

    def dense(self, layer: str) -> torch.Tensor:
        """``G_ℓ + λ I`` in row-major ``vec`` order of ``(out, in)`` matrices."""
        basis = torch.kron(self.q_s[layer].double(), self.q_a[layer].double())
        lam = self.eigenvalues[layer].double().reshape(-1) + self.damping[layer]
        return basis @ torch.diag(lam) @ basis.t()
