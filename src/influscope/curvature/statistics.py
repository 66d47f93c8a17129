"""Statistics gathered by passes over the training data (all-reduced across ranks).

* :func:`covariances` — ``A_ℓ = Σ_tokens ā ā^⊤``, ``S_ℓ = Σ_tokens s s^⊤`` and token counts
  (tokens where the task's token mask is set).
* :func:`eigenvalue_statistics` — ``Σ_z (Q_S^⊤ ∇_W L(z) Q_A)^{⊙2}`` (EK-FAC refit).
* :func:`diagonal_statistics` — ``Σ_z (∇_W L(z))^{⊙2}``.

Each returns sums plus the number of sequences; the caller divides. Passes are split into
shards whose partial sums can be stored and resumed (:mod:`influscope.engine.shards`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from influscope.engine.shards import ShardedPasses, reduce_shards
from influscope.errors import NumericalError
from influscope.modules.capture import LayerBatch
from influscope.modules.selection import TrackedLayer

#: A sharded pass, or any ``desc → iterator of batches`` callable.
Passes = (
    ShardedPasses | Callable[[str], Iterator[tuple[list[int], dict[str, LayerBatch], torch.Tensor]]]
)


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


def _device(layers: list[TrackedLayer]) -> torch.device:
    return next(layers[0].module.parameters()).device


def covariances(
    passes: Passes, layers: list[TrackedLayer], dtype: torch.dtype
) -> tuple[dict[str, Covariances], int]:
    """Token-covariance sums per layer and the number of sequences."""
    dev = _device(layers)

    def zeros() -> dict[str, torch.Tensor]:
        out = {"n_seq": torch.zeros((), dtype=torch.float64, device=dev)}
        for layer in layers:
            out[f"{layer.name}::a"] = torch.zeros(
                layer.in_dim, layer.in_dim, dtype=dtype, device=dev
            )
            out[f"{layer.name}::s"] = torch.zeros(
                layer.out_dim, layer.out_dim, dtype=dtype, device=dev
            )
            out[f"{layer.name}::n_tokens"] = torch.zeros((), dtype=torch.float64, device=dev)
        return out

    def compute(batches) -> dict[str, torch.Tensor]:
        acc = zeros()
        for pos, grads, _ in batches:
            acc["n_seq"] += len(pos)
            for name, lb in grads.items():
                a, s = lb.masked_tokens()  # (N_tok, in), (N_tok, out)
                acc[f"{name}::a"] += (a.t() @ a).to(dtype)  # (in, in)
                acc[f"{name}::s"] += (s.t() @ s).to(dtype)  # (out, out)
                acc[f"{name}::n_tokens"] += a.shape[0]
        return acc

    total = reduce_shards(passes, "covariance", compute, zeros)
    stats = {
        layer.name: Covariances(
            total[f"{layer.name}::a"],
            total[f"{layer.name}::s"],
            float(total[f"{layer.name}::n_tokens"]),
        )
        for layer in layers
    }
    return stats, int(total["n_seq"])


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
    """Sums of squared per-sequence gradients in the Kronecker eigenbasis: ``{layer: (out, in)}``.

    The rotated gradient ``Q_S^⊤ (Σ_t s_t ā_t^⊤) Q_A = Σ_t (Q_S^⊤ s_t)(Q_A^⊤ ā_t)^⊤`` is formed
    from rotated activations and output gradients, so no unrotated ``(B, out, in)`` gradient is
    built.
    """
    dev = next(iter(q_a.values())).device

    def zeros() -> dict[str, torch.Tensor]:
        out = {"n_seq": torch.zeros((), dtype=torch.float64, device=dev)}
        for name in q_a:
            out[name] = torch.zeros(q_s[name].shape[0], q_a[name].shape[0], dtype=dtype, device=dev)
        return out

    def compute(batches) -> dict[str, torch.Tensor]:
        acc = zeros()
        for pos, grads, _ in batches:
            acc["n_seq"] += len(pos)
            for name, lb in grads.items():
                qa, qs = q_a[name].to(lb.a.dtype), q_s[name].to(lb.s.dtype)
                rot = torch.einsum("bto,bti->boi", lb.s @ qs, lb.a @ qa)  # (B, out, in)
                acc[name] += rot.square().sum(0).to(dtype)
        return acc

    total = reduce_shards(passes, "eigenvalues", compute, zeros)
    n = int(total.pop("n_seq"))
    return total, n


def diagonal_statistics(
    passes: Passes, dtype: torch.dtype, layers: list[TrackedLayer]
) -> tuple[dict[str, torch.Tensor], int]:
    """Sums of squared per-sequence gradients: ``{layer: (out, in)}``."""
    dev = _device(layers)

    def zeros() -> dict[str, torch.Tensor]:
        out = {"n_seq": torch.zeros((), dtype=torch.float64, device=dev)}
        for layer in layers:
            out[layer.name] = torch.zeros(layer.out_dim, layer.in_dim, dtype=dtype, device=dev)
        return out

    def compute(batches) -> dict[str, torch.Tensor]:
        acc = zeros()
        for pos, grads, _ in batches:
            acc["n_seq"] += len(pos)
            for name, lb in grads.items():
                acc[name] += lb.gradient().square().sum(0).to(dtype)  # (out, in)
        return acc

    total = reduce_shards(passes, "diagonal", compute, zeros)
    n = int(total.pop("n_seq"))
    return total, n
