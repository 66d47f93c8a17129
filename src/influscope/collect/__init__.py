"""Training-time collection: checkpoints and projected per-example gradients while a model trains.

* :class:`InfluenceCallback` — a ``transformers.TrainerCallback``;
* :class:`GradientCollector` — the same for a plain PyTorch loop (``begin`` / ``backward`` /
  ``end`` around each optimizer step);
* :class:`CollectedGradients` — read what was collected;
* :func:`collected_index`, :func:`collected_tracin` — a gradient index and TracIn built from
  the collected rows without another pass over the training data; :func:`recompute_rows`
  recomputes the rows afterwards from a checkpoint.

Rows collected in optimizer step ``s + 1`` are gradients at ``θ_s`` (the parameters *before*
that step), stored under parameter step ``s`` next to checkpoint ``checkpoint-s``.
"""

from influscope.collect.build import (
    collected_index,
    collected_tracin,
    load_checkpoint,
    recompute_rows,
)
from influscope.collect.callback import InfluenceCallback, unsupported_settings
from influscope.collect.config import CollectConfig
from influscope.collect.hook import GradientCollector
from influscope.collect.store import CollectedGradients, checkpoint_dir

__all__ = [
    "CollectConfig",
    "CollectedGradients",
    "GradientCollector",
    "InfluenceCallback",
    "checkpoint_dir",
    "collected_index",
    "collected_tracin",
    "load_checkpoint",
    "recompute_rows",
    "unsupported_settings",
]
