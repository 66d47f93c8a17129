"""Curvature approximations, one per file, behind one interface (:class:`CurvatureOperator`).

Implementations: ``identity`` (gradient dot product), ``diagonal`` (diagonal Fisher),
``kfac`` and ``ekfac`` (Kronecker-factored, in :mod:`.eigen`), ``datainf`` (Kwon et al. 2024's
averaged Sherman–Morrison inverse over stored per-example gradients, in :mod:`.datainf`). Fitting lives in :mod:`.fit`,
statistics gathering in :mod:`.statistics`.
"""

from influscope.curvature.base import CurvatureOperator
from influscope.curvature.datainf import DataInfOperator
from influscope.curvature.diagonal import DiagonalOperator
from influscope.curvature.eigen import EKFACOperator, KFACOperator, KroneckerEigenOperator
from influscope.curvature.fit import CURVATURES
from influscope.curvature.identity import IdentityOperator

__all__ = [
    "CURVATURES",
    "CurvatureOperator",
    "DataInfOperator",
    "DiagonalOperator",
    "EKFACOperator",
    "IdentityOperator",
    "KFACOperator",
    "KroneckerEigenOperator",
]
