"""Metagradients: exact derivatives of a fine-tune's outcome with respect to its training data.

* :mod:`.recipe` — the deterministic fine-tune (fixed data order, per-example weights, a pure
  optimizer step) that counterfactual retraining and MAGIC share.
"""

from influscope.metagrad.recipe import (
    Finetune,
    FinetuneConfig,
    batch_schedule,
    finetune,
    measure,
    select_parameters,
)

__all__ = [
    "Finetune",
    "FinetuneConfig",
    "batch_schedule",
    "finetune",
    "measure",
    "select_parameters",
]
