"""Iterative solvers of the full damped Gauss-Newton system (see :mod:`.refine`)."""

from influscope.solvers.gnh import GaussNewtonProduct
from influscope.solvers.refine import refine_queries

__all__ = ["GaussNewtonProduct", "refine_queries"]
