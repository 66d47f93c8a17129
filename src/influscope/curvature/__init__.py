"""Curvature approximations, one per file, behind one interface (:class:`CurvatureOperator`).

Each file holds an operator, its fitter and a :class:`~influscope.curvature.spec.CurvatureSpec`
(``SPEC``): ``identity`` (gradient dot product), ``diagonal`` (diagonal Fisher), ``kfac`` and
``ekfac`` (Kronecker-factored, sharing :mod:`.eigen`'s eigenbasis algebra), ``datainf`` (Kwon
et al. 2024's averaged Sherman–Morrison inverse over stored per-example gradients).
:mod:`.registry` lists the specs; :mod:`.run` is the one fit runner and :mod:`.statistics` the
passes that gather statistics.
"""

from influscope.curvature.base import CurvatureOperator
from influscope.curvature.datainf import DataInfOperator
from influscope.curvature.diagonal import DiagonalOperator
from influscope.curvature.eigen import KroneckerEigenOperator
from influscope.curvature.ekfac import EKFACOperator
from influscope.curvature.identity import IdentityOperator
from influscope.curvature.kfac import KFACOperator
from influscope.curvature.registry import CURVATURES
from influscope.curvature.spec import CurvatureSpec, FitFootprint

__all__ = [
    "CURVATURES",
    "CurvatureOperator",
    "CurvatureSpec",
    "DataInfOperator",
    "DiagonalOperator",
    "EKFACOperator",
    "FitFootprint",
    "IdentityOperator",
    "KFACOperator",
    "KroneckerEigenOperator",
]
