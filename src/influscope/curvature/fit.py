"""Fitting each curvature approximation from passes over the training data.

* ``identity``: nothing to fit.
* ``diagonal``: one pass, ``d = mean_z (∇L(z))^{⊙2}``.
* ``kfac``: one pass for ``A = E_tok[ā ā^⊤]``, ``S = E_tok[s s^⊤]``; eigendecompose both in
  float64; eigenvalues ``Λ = T̄ λ_S λ_A^⊤`` with ``T̄`` the mean number of tokens per sequence
  (the per-sequence loss sums over tokens, so its curvature is about ``T̄ · A ⊗ S``).
* ``ekfac``: the K-FAC eigenbases, then a second pass refitting
  ``Λ_ij = E_z[((Q_S^⊤ ∇_W L(z) Q_A)_ij)^2]`` on per-sequence gradients (George et al. 2018).
* ``datainf``: one pass storing every per-sequence gradient (Kwon et al. 2024; see
  :mod:`influscope.curvature.datainf`, which holds its fitter).

Default damping per layer: ``damping_factor × mean(Λ_ℓ)`` (or ``mean(d_ℓ)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from influscope.config import FitConfig
from influscope.curvature.base import CurvatureOperator, relative_damping
from influscope.curvature.datainf import DataInfOperator, fit_datainf
from influscope.curvature.diagonal import DiagonalOperator
from influscope.curvature.eigen import EKFACOperator, KFACOperator
from influscope.curvature.identity import IdentityOperator
from influscope.curvature.statistics import (
    Passes,
    covariances,
    diagonal_statistics,
    eigendecompose,
    eigenvalue_statistics,
)
from influscope.modules.selection import TrackedLayer

Fitter = Callable[[Passes, list[TrackedLayer], FitConfig], CurvatureOperator]


def _dtype(config: FitConfig) -> torch.dtype:
    return torch.float64 if config.stats_dtype == "float64" else torch.float32


def fit_identity(passes: Passes, layers: list[TrackedLayer], config: FitConfig):
    return IdentityOperator({layer.name: 0.0 for layer in layers})


def fit_diagonal(passes: Passes, layers: list[TrackedLayer], config: FitConfig):
    sums, n = diagonal_statistics(passes, _dtype(config), layers)
    diag = {k: v / n for k, v in sums.items()}
    damping = {
        k: relative_damping(d, config.damping_factor, config.damping) for k, d in diag.items()
    }
    return DiagonalOperator(diag, damping)


def _eigenbases(passes: Passes, layers: list[TrackedLayer], config: FitConfig):
    cov, n_seq = covariances(passes, layers, _dtype(config))
    bases = {}
    for name, c in cov.items():
        n_tok = max(c.n_tokens, 1.0)
        lam_a, q_a = eigendecompose(c.a / n_tok, name, "activation")
        lam_s, q_s = eigendecompose(c.s / n_tok, name, "output-gradient")
        bases[name] = (lam_a, q_a, lam_s, q_s, c.n_tokens / max(n_seq, 1))
    return bases


def fit_kfac(passes: Passes, layers: list[TrackedLayer], config: FitConfig):
    bases = _eigenbases(passes, layers, config)
    q_a, q_s, lam, damping = {}, {}, {}, {}
    for name, (lam_a, qa, lam_s, qs, t_bar) in bases.items():
        q_a[name], q_s[name] = qa, qs
        lam[name] = t_bar * torch.outer(lam_s, lam_a)  # (out, in)
        damping[name] = relative_damping(lam[name], config.damping_factor, config.damping)
    return KFACOperator(q_a, q_s, lam, damping)


def fit_ekfac(passes: Passes, layers: list[TrackedLayer], config: FitConfig):
    bases = _eigenbases(passes, layers, config)
    q_a = {k: v[1] for k, v in bases.items()}
    q_s = {k: v[3] for k, v in bases.items()}
    sums, n = eigenvalue_statistics(passes, q_a, q_s, _dtype(config))
    lam = {k: v.double() / n for k, v in sums.items()}
    damping = {
        k: relative_damping(v, config.damping_factor, config.damping) for k, v in lam.items()
    }
    return EKFACOperator(q_a, q_s, lam, damping)


#: Registry: curvature name → (operator class, fitter).
CURVATURES: dict[str, tuple[type[CurvatureOperator], Fitter]] = {
    "identity": (IdentityOperator, fit_identity),
    "diagonal": (DiagonalOperator, fit_diagonal),
    "kfac": (KFACOperator, fit_kfac),
    "ekfac": (EKFACOperator, fit_ekfac),
    "datainf": (DataInfOperator, fit_datainf),
}
