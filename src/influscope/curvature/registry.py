"""The curvature registry: name → :class:`~influscope.curvature.spec.CurvatureSpec`.

Adding an approximation is one file (its operator, fitter and ``SPEC``; see
``docs/design.md``, "How to add a curvature") and one line here. The CLI's ``--curvature``
choices, ``FitConfig`` validation, the fit runner and ``--dry-run`` estimates all read this dict.
"""

from __future__ import annotations

from influscope.curvature import datainf, diagonal, ekfac, identity, kfac
from influscope.curvature.spec import CurvatureSpec

#: Registry: curvature name → spec (operator class, fitter, replay, estimate, options, check).
CURVATURES: dict[str, CurvatureSpec] = {
    spec.name: spec for spec in (identity.SPEC, diagonal.SPEC, kfac.SPEC, ekfac.SPEC, datainf.SPEC)
}
