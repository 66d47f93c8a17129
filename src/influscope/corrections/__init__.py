"""Fitting-error corrections of influence scores (DDA, arXiv 2410.01285; RelatIF).

* :mod:`~influscope.corrections.dda` — the algebra: :func:`debias`, :func:`denoise`,
  :func:`dda`, :func:`relatif`, and the :data:`CORRECTIONS` registry of variants.
* :mod:`~influscope.corrections.run` — :func:`run_corrections`: score the base model, the
  fine-tuning checkpoints and the fine-tuned model (each with its own curvature) and combine.
* ``influscope dda`` (the command line) is :mod:`influscope.cli.dda`.
"""

from influscope.corrections.config import CorrectionConfig
from influscope.corrections.dda import (
    CORRECTIONS,
    REQUIREMENTS,
    CorrectionInputs,
    dda,
    debias,
    denoise,
    relatif,
    standardize,
)
from influscope.corrections.run import CorrectionResult, model_scores, run_corrections

__all__ = [
    "CORRECTIONS",
    "REQUIREMENTS",
    "CorrectionConfig",
    "CorrectionInputs",
    "CorrectionResult",
    "dda",
    "debias",
    "denoise",
    "model_scores",
    "relatif",
    "run_corrections",
    "standardize",
]
