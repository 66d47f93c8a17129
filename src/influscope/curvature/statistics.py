"""Statistics gathered by passes over the training data (all-reduced across ranks).

* :func:`covariances` — ``A_ℓ = Σ_tokens ā ā^⊤``, ``S_ℓ = Σ_tokens s s^⊤`` and token counts
  (tokens where the task's token mask is set).
* :func:`eigenvalue_statistics` — ``Σ_z (Q_S^⊤ ∇_W L(z) Q_A)^{⊙2}`` (EK-FAC refit).
* :func:`diagonal_statistics` — ``Σ_z (∇_W L(z))^{⊙2}``.

Each returns sums plus the number of sequences; the caller divides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from influscope.errors import NumericalError
from influscope.modules.capture import LayerBatch
from influscope.modules.passes import all_reduce_
from influscope.modules.selection import TrackedLayer

Passes = Callable[[str], Iterator[tuple[list[int], dict[str, LayerBatch], torch.Tensor]]]


@dataclass
class Covariances:
    """Token covariance sums of one layer.

    Attributes:
        a: ``(in, in)`` sum of ``ā ā^⊤``.
        s: ``(out, out)`` sum of ``s s^⊤``.
        n_tokens: Number of tokens summed.
    """

    a: torch.Tensor
    s: torch.Tensor
    n_tokens: float


def covariances(
    passes: Passes, layers: list[TrackedLayer], dtype: torch.dtype
) -> tuple[dict[str, Covariances], int]:
    """Token-covariance sums per layer and the number of sequences."""
    stats: dict[str, Covariances] = {}
    n_seq = 0
    for pos, grads, _ in passes("covariance"):
        n_seq += len(pos)
        for name, lb in grads.items():
            a, s = lb.masked_tokens()  # (N_tok, in), (N_tok, out)
            if name not in stats:
                stats[name] = Covariances(
                    a.new_zeros(a.shape[1], a.shape[1], dtype=dtype),
                    s.new_zeros(s.shape[1], s.shape[1], dtype=dtype),
                    0.0,
                )
            stats[name].a += (a.t() @ a).to(dtype)
            stats[name].s += (s.t() @ s).to(dtype)
            stats[name].n_tokens += a.shape[0]
    n_seq_t = all_reduce_(torch.tensor(float(n_seq), dtype=torch.float64))
    for c in stats.values():
        all_reduce_(c.a)
        all_reduce_(c.s)
        c.n_tokens = float(all_reduce_(torch.tensor(c.n_tokens, dtype=torch.float64)))
    return stats, int(n_seq_t)


def eigendecompose(
    matrix: torch.Tensor, layer: str, which: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric matrix, in float64.

    Raises:
        NumericalError: If the matrix holds NaN/Inf; the message names the layer.
    """
    if not torch.isfinite(matrix).all():
        raise NumericalError(
            f"The {which} covariance of layer {layer!r} contains NaN/Inf, so it cannot be "
            "eigendecomposed. The model produced non-finite activations or gradients: check the "
            "weights, lower the learning rate of the run that produced them, or disable autocast."
        )
    m = matrix.double()
    evals, evecs = torch.linalg.eigh(0.5 * (m + m.t()))
    return evals.clamp_min(0.0), evecs


def eigenvalue_statistics(
    passes: Passes,
    q_a: dict[str, torch.Tensor],
    q_s: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], int]:
    """Sums of squared per-sequence gradients in the Kronecker eigenbasis: ``{layer: (out, in)}``."""
    sums: dict[str, torch.Tensor] = {}
    n_seq = 0
    for pos, grads, _ in passes("eigenvalues"):
        n_seq += len(pos)
        for name, lb in grads.items():
            g = lb.gradient()  # (B, out, in)
            qa, qs = q_a[name].to(g.dtype), q_s[name].to(g.dtype)
            rot = qs.t() @ g @ qa  # (B, out, in)
            acc = rot.square().sum(0).to(dtype)
            sums[name] = sums[name] + acc if name in sums else acc
    n = int(all_reduce_(torch.tensor(float(n_seq), dtype=torch.float64)))
    return {k: all_reduce_(v) for k, v in sums.items()}, n


def diagonal_statistics(passes: Passes, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
    """Sums of squared per-sequence gradients: ``{layer: (out, in)}``."""
    sums: dict[str, torch.Tensor] = {}
    n_seq = 0
    for pos, grads, _ in passes("diagonal"):
        n_seq += len(pos)
        for name, lb in grads.items():
            acc = lb.gradient().square().sum(0).to(dtype)  # (out, in)
            sums[name] = sums[name] + acc if name in sums else acc
    n = int(all_reduce_(torch.tensor(float(n_seq), dtype=torch.float64)))
    return {k: all_reduce_(v) for k, v in sums.items()}, n
