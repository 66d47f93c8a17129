"""EK-FAC: the K-FAC eigenbases with eigenvalues refitted on per-sequence gradients.

After K-FAC's covariance pass (:func:`influscope.curvature.kfac.eigenbases`), a second pass
over the same objective refits (George et al. 2018)

.. math:: Λ_{ij} = E_z\\big[((Q_S^⊤ ∇_W L(z) Q_A)_{ij})^2\\big].

That pass sees the same captures as the first, so the fit runner replays them from memory
(``FitConfig.cache_mb``) instead of running the model again (``replays=True``). Default damping
``factor × mean(Λ_ℓ)`` per layer. Grosse et al. 2023, §2.2 and App. A.
"""

from __future__ import annotations

from influscope.curvature.base import relative_damping
from influscope.curvature.eigen import KroneckerEigenOperator
from influscope.curvature.kfac import eigenbases, kronecker_estimate
from influscope.curvature.spec import CurvatureSpec, stats_dtype
from influscope.curvature.statistics import eigenvalue_statistics


class EKFACOperator(KroneckerEigenOperator):
    """EK-FAC: eigenvalues refitted on per-sequence gradients (see ``ekfac``)."""

    name = "ekfac"


def fit_ekfac(passes, layers, config) -> EKFACOperator:
    """K-FAC's eigenbases, then ``Λ = E_z[(Q_Sᵀ ∇L(z) Q_A)^{⊙2}]`` from a second pass."""
    bases = eigenbases(passes, layers, config)
    q_a = {k: v[1] for k, v in bases.items()}  # {layer: (in, in)}
    q_s = {k: v[3] for k, v in bases.items()}  # {layer: (out, out)}
    sums, n = eigenvalue_statistics(passes, q_a, q_s, stats_dtype(config))
    lam = {k: v.double() / n for k, v in sums.items()}  # {layer: (out, in)}
    damping = {
        k: relative_damping(v, config.damping_factor, config.damping) for k, v in lam.items()
    }
    return EKFACOperator(q_a, q_s, lam, damping)


SPEC = CurvatureSpec(
    "ekfac",
    EKFACOperator,
    fit_ekfac,
    replays=True,
    estimate=kronecker_estimate,
)
