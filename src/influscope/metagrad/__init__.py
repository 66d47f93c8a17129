"""Metagradients: exact derivatives of a fine-tune's outcome with respect to its training data.

* :mod:`.recipe` — the deterministic fine-tune (fixed data order, per-example weights, a pure
  optimizer step) that counterfactual retraining and MAGIC share.
* :mod:`.magic` — MAGIC (Ilyas & Engstrom 2025): exact ``d f_q(θ_T) / d w_i`` by reverse-mode
  differentiation through every step of that fine-tune, with REPLAY checkpointing.
"""

from influscope.metagrad.magic import MagicConfig, magic_scores, replay_memory
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
    "MagicConfig",
    "batch_schedule",
    "finetune",
    "magic_scores",
    "measure",
    "replay_memory",
    "select_parameters",
]
