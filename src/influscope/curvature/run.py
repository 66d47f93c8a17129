"""The one place a curvature is fitted: passes over the data, shards, replay, resume.

Both :meth:`influscope.Influence.fit` (factors of the tracked layers) and the gradient index
(:mod:`influscope.index.build`, factors of the LoGra-projected layers) call
:func:`fit_curvature`; they differ only in what wraps the per-layer passes (a projector) and
where partial sums are stored.

Fitting statistics ``S = Σ_shards S_shard`` are accumulated shard by shard
(:class:`~influscope.engine.shards.ShardedPasses`); with a
:class:`~influscope.engine.shards.PartialSums` store each shard's sum is saved, so a killed
fit resumes from the shards it finished. A curvature whose spec says ``replays`` (EK-FAC's
eigenvalue correction) makes a second pass over the same objective, replayed from memory up
to ``cache_mb``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from influscope.config import FitConfig
from influscope.curvature.base import CurvatureOperator
from influscope.curvature.registry import CURVATURES
from influscope.engine.shards import PartialSums, ShardedPasses
from influscope.modules.expert_lists import damp_unrouted_experts
from influscope.modules.passes import layer_passes
from influscope.modules.tracked import TrackedModel
from influscope.tasks.data import EncodedDataset

__all__ = ["fit_curvature"]


def fit_curvature(
    tracked: TrackedModel,
    train: EncodedDataset,
    config: FitConfig,
    *,
    store: PartialSums | None = None,
    wrap: Callable | None = None,
    fit_layers: Sequence | None = None,
    amp_dtype: torch.dtype | None = None,
    desc_prefix: str = "",
) -> tuple[CurvatureOperator, dict[str, int]]:
    """Fit ``config.curvature`` on ``train``.

    Args:
        tracked: The model, its task and the tracked layers.
        train: The ``N`` sequences the curvature is fitted on.
        config: Fit settings (curvature, Fisher, batch and shard size, cache, label seed).
        store: Per-shard partial sums (resume), or ``None`` to keep nothing on disk.
        wrap: ``wrap(make) -> make`` around the pass factory (e.g. a projector's).
        fit_layers: Layers the fitter sees (default ``layers``; a projector's layers).
        amp_dtype: Autocast dtype of the forward passes, or ``None``.
        desc_prefix: Prefix of the progress-bar descriptions.

    Returns:
        ``(operator, counts)`` with ``counts = {"loaded", "computed", "replayed"}`` shards.
    """
    model, task, layers = tracked.model, tracked.task, list(tracked.layers)
    spec = CURVATURES[config.curvature]

    def make(desc: str, positions):
        return layer_passes(
            model,
            task,
            layers,
            train.subset(positions),
            batch_size=config.batch_size,
            objective="loss",
            sample_seed=config.seed if config.fisher == "true" else None,
            amp_dtype=amp_dtype,
            desc=f"{desc_prefix}{desc}",
        )

    cache = int(config.cache_mb * 2**20) if spec.replays else 0
    passes = ShardedPasses(
        wrap(make) if wrap is not None else make,
        len(train),
        config.batch_size,
        config.shard_size,
        store,
        cache_bytes=cache,
    )
    operator = spec.fit(
        passes, list(fit_layers) if fit_layers is not None else list(layers), config
    )
    if hasattr(operator, "damping"):  # MoE experts no fitting token reached: λ = 1, not 0
        damp_unrouted_experts(operator, layers, config.damping)
    counts = {
        "loaded": store.loaded if store else 0,
        "computed": store.computed if store else 0,
        "replayed": passes.counts.get("replayed", 0),
    }
    passes.clear_cache()
    return operator, counts
