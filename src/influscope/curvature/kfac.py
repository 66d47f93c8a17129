"""K-FAC: Kronecker-factored curvature with eigenvalues from the factors' spectra.

One pass gathers ``A = E_tok[ā āᵀ]`` (in × in) and ``S = E_tok[s sᵀ]`` (out × out) per layer;
both are eigendecomposed in float64 and the eigenvalue matrix is

.. math:: Λ = T̄ \\, λ_S λ_A^⊤ \\qquad (out, in)

with ``T̄`` the mean number of tokens per sequence (the per-sequence loss sums over tokens, so
its curvature is about ``T̄ · A ⊗ S``). Default damping ``factor × mean(Λ_ℓ)`` per layer.
The operator's algebra is :class:`~influscope.curvature.eigen.KroneckerEigenOperator`'s.
"""

from __future__ import annotations

import torch

from influscope.curvature.base import relative_damping
from influscope.curvature.eigen import KroneckerEigenOperator
from influscope.curvature.spec import CurvatureSpec, EstimateRow, FitFootprint, stats_dtype
from influscope.curvature.statistics import covariances, eigendecompose
from influscope.progress import track


class KFACOperator(KroneckerEigenOperator):
    """K-FAC: eigenvalues ``T̄ · λ_S λ_Aᵀ`` (see :mod:`influscope.curvature.kfac`)."""

    name = "kfac"


def eigenbases(passes, layers, config) -> dict[str, tuple]:
    """``{layer: (λ_A, Q_A, λ_S, Q_S, T̄)}`` from one covariance pass (shared with EK-FAC)."""
    cov, n_seq = covariances(passes, layers, stats_dtype(config))
    bases = {}
    from influscope.budget import release_heap  # (budget imports the curvature registry)

    for name in track(list(cov), "eigendecomposition", unit="layer"):
        c = cov.pop(name)  # each layer's sums are freed once decomposed
        n_tok = max(c.n_tokens, 1.0)
        lam_a, q_a = eigendecompose(c.a / n_tok, name, "activation")  # (in,), (in, in)
        lam_s, q_s = eigendecompose(c.s / n_tok, name, "output-gradient")  # (out,), (out, out)
        bases[name] = (lam_a, q_a, lam_s, q_s, c.n_tokens / max(n_seq, 1))
        del c
        # the decomposition's temporaries of a few MiB land on glibc's heap, which keeps them
        # resident once freed: give them back so that the next layer's start from the same
        # resident size (the budget's estimate assumes so); microseconds per layer
        release_heap()
    return bases


def fit_kfac(passes, layers, config) -> KFACOperator:
    """The eigenbases, with eigenvalues ``T̄ λ_S λ_Aᵀ``."""
    q_a, q_s, lam, damping = {}, {}, {}, {}
    for name, (lam_a, qa, lam_s, qs, t_bar) in eigenbases(passes, layers, config).items():
        q_a[name], q_s[name] = qa, qs
        lam[name] = t_bar * torch.outer(lam_s, lam_a)  # (out, in)
        damping[name] = relative_damping(lam[name], config.damping_factor, config.damping)
    return KFACOperator(q_a, q_s, lam, damping)


def kronecker_estimate(f: FitFootprint) -> list[EstimateRow]:
    """Memory of each phase of a K-FAC / EK-FAC fit (bytes; ``K = Σ(in² + out²)``,
    ``P = Σ in·out``, float64 statistics):

    * covariance pass: a pass + ``8K`` sums (``2·8K`` with several shards: the running total
      and the shard's own sums are both held while a shard is added,
      :func:`~influscope.engine.shards.reduce_shards`; a single shard's sums are the total) +
      the replay cache it fills;
    * eigendecomposition, one layer at a time: ``8K`` (sums shrinking as bases grow) + one
      factor's float64 workspace ``≈ 5·8·d_max²`` (the scaled sums, their symmetrised copy,
      the eigenvectors and ``syevd``'s ``2 d²`` work array; measured ≈ 5.2 at ``d = 1536``)
      + the replay cache;
    * eigenvalue refit: ``8K`` bases + ``16P`` sums and eigenvalues (``24P`` with several
      shards) + the rotated gradients of a batch ``2·4·B·max in·out`` + the replay cache (and
      a pass for batches not cached).
    """
    cov = 8 * f.kronecker
    held = 1 if f.shards <= 1 else 2  # total only, or total + a shard's part
    resident = f.resident or f.pass_bytes  # without a measured resident size: a pass
    widest_grad = max((i * o for i, o in f.dims), default=0)
    return [
        ("fit: covariance", f.pass_bytes + held * cov + f.cache_bytes, 0, ""),
        (
            "fit: eigendecomposition",
            resident + cov + 5 * 8 * f.widest**2 + f.cache_bytes,
            0,
            "float64, one layer at a time",
        ),
        (
            "fit: eigenvalues",
            f.pass_bytes
            + cov
            + 8 * (1 + held) * f.params
            + 8 * f.batch_size * widest_grad
            + f.cache_bytes,
            8 * (f.kronecker + f.params),
            "factors on disk",
        ),
    ]


SPEC = CurvatureSpec(
    "kfac",
    KFACOperator,
    fit_kfac,
    estimate=kronecker_estimate,
)
