"""Truncated SVDs of batches of matrices: exact, or seeded randomized.

Randomized (Halko, Martinsson & Tropp 2011, Alg. 4.4): a seeded Gaussian sketch ``Ω (n × k)``,
``k = r + OVERSAMPLE``, the range ``Q`` of ``(p p^⊤)^q p Ω`` found by ``q = POWER_ITERATIONS``
QR-stabilised power iterations, then the exact SVD of the small ``Q^⊤ p (k × n)``. Cost
``O(m·n·k)`` per ``(m × n)`` matrix instead of ``O(m·n·min(m, n))`` — an order of magnitude on
LLM-sized layers; with ``k ≥ min(m, n)`` it is the exact truncated SVD. ``"auto"`` picks it when
the sketch is at most a quarter of the smaller side, ``4 k ≤ min(m, n)``.
"""

from __future__ import annotations

import torch

#: Extra sketch columns and power iterations of the randomized SVD.
OVERSAMPLE, POWER_ITERATIONS = 8, 4


def randomized_svd(
    p: torch.Tensor, rank: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded randomized truncated SVD of a batch ``p (Q, m, n)`` (see the module docstring).

    Returns:
        ``u (Q, m, k)``, ``s (Q, k)``, ``vh (Q, k, n)`` with ``k = min(rank + OVERSAMPLE, m, n)``,
        singular values in descending order.
    """
    m, n = p.shape[-2:]
    k = min(rank + OVERSAMPLE, m, n)
    gen = torch.Generator(device=p.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, device=p.device, dtype=p.dtype)  # (n, k)
    q, _ = torch.linalg.qr(p @ omega)  # (Q, m, k)
    for _ in range(POWER_ITERATIONS):
        z, _ = torch.linalg.qr(p.transpose(-2, -1) @ q)  # (Q, n, k)
        q, _ = torch.linalg.qr(p @ z)  # (Q, m, k)
    ub, s, vh = torch.linalg.svd(
        q.transpose(-2, -1) @ p, full_matrices=False
    )  # (Q,k,k),(Q,k),(Q,k,n)
    return q @ ub, s, vh


def low_rank(
    p: torch.Tensor, rank: int, method: str = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``p ≈ U V`` with singular values folded into ``U``.

    Args:
        p: ``(Q, out, in)``.
        rank: ``r``.
        method: ``"exact"`` (``torch.linalg.svd``), ``"randomized"`` (:func:`randomized_svd`) or
            ``"auto"`` (randomized when ``4 (rank + OVERSAMPLE) ≤ min(out, in)``).

    Returns:
        ``U (Q, r, out)``, ``V (Q, r, in)``.
    """
    x = p.double() if p.dtype == torch.float64 else p.float()
    if method == "auto":
        method = "randomized" if 4 * (rank + OVERSAMPLE) <= min(p.shape[-2:]) else "exact"
    if method == "randomized":
        u, s, vh = randomized_svd(x, rank)  # (Q, out, k), (Q, k), (Q, k, in)
    else:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)  # (Q, out, k), (Q, k), (Q, k, in)
    r = min(rank, s.shape[-1])
    uu = (u[..., :r] * s[:, None, :r]).transpose(1, 2)  # (Q, r, out)
    return uu.to(p.dtype).contiguous(), vh[:, :r, :].to(p.dtype).contiguous()
