"""Curvature approximations, one per file, behind one interface (:class:`CurvatureOperator`).

Implementations: ``identity`` (gradient dot product), ``diagonal`` (diagonal Fisher),
``kfac`` and ``ekfac`` (Kronecker-factored, in :mod:`.eigen`). Fitting lives in :mod:`.fit`,
statistics gathering in :mod:`.statistics`.
"""

from influscope.curvature.base import CurvatureOperator
from influscope.curvature.diagonal import DiagonalOperator
from influscope.curvature.eigen import EKFACOperator, KFACOperator, KroneckerEigenOperator
from influscope.curvature.fit import CURVATURES
from influscope.curvature.identity import IdentityOperator

__all__ = [
    "CURVATURES",
    "CurvatureOperator",
    "DiagonalOperator",
    "EKFACOperator",
    "IdentityOperator",
    "KFACOperator",
    "KroneckerEigenOperator",
]
