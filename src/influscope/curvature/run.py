"""The one place a curvature is fitted: passes over the data, shards, replay, resume.

Both :meth:`influscope.Influence.fit` (factors of the tracked layers) and the gradient index
(:mod:`influscope.index.build`, factors of the LoGra-projected layers) call
:func:`fit_curvature`; they differ only in what wraps the per-layer passes (a projector) and
where partial sums are stored.

Fitting statistics ``S = Σ_shards S_shard`` are accumulated shard by shard
(:class:`~influscope.engine.shards.ShardedPasses`); with a
:class:`~influscope.engine.shards.PartialSums` store each shard's sum is saved, so a killed
fit resumes from the shards it finished. A curvature whose spec says ``replays`` (EK-FAC's
eigenvalue correction) makes a second pass over the same objective, replayed from memory
while the memory budget allows (``FitConfig.memory_gb``, :mod:`influscope.budget`; at most
``cache_mb``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from influscope.budget import CacheGate, FitPlan, plan_fit
from influscope.config import FitConfig
from influscope.curvature.base import CurvatureOperator
from influscope.curvature.registry import CURVATURES
from influscope.engine.shards import PartialSums, ShardedPasses
from influscope.modules.expert_lists import damp_unrouted_experts
from influscope.modules.passes import layer_passes, model_device
from influscope.modules.tracked import TrackedModel
from influscope.tasks.data import EncodedDataset

__all__ = ["fit_curvature"]

logger = logging.getLogger(__name__)


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
    on_plan: Callable[[FitPlan], None] | None = None,
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
        on_plan: Called with the memory plan (budget, batch size, cache limit) before the
            first pass.

    Returns:
        ``(operator, counts)`` with ``counts = {"loaded", "computed", "replayed"}`` shards
        (a shard counts as replayed when some of its batches were).

    Raises:
        MemoryBudgetError: The budget ``config.memory_gb`` is below what one tracked layer
            needs (before any forward pass).
    """
    model, task, layers = tracked.model, tracked.task, list(tracked.layers)
    spec = CURVATURES[config.curvature]
    # the memory budget: refused before any forward pass when one layer does not fit; the
    # batch size and the replay cache are sized to it (influscope.budget)
    plan = plan_fit(tracked, train, config, fit_layers)
    batch_size = plan.batch_size
    if on_plan is not None:
        on_plan(plan)
    if batch_size < config.batch_size:
        logger.info(
            "memory budget %.2f GiB: batch size %d instead of %d",
            plan.budget / 2**30,
            batch_size,
            config.batch_size,
        )

    def make(desc: str, positions):
        return layer_passes(
            model,
            task,
            layers,
            train.subset(positions),
            batch_size=batch_size,
            objective="loss",
            sample_seed=config.seed if config.fisher == "true" else None,
            amp_dtype=amp_dtype,
            desc=f"{desc_prefix}{desc}",
        )

    passes = ShardedPasses(
        wrap(make) if wrap is not None else make,
        len(train),
        batch_size,
        config.shard_size,
        store,
        cache_bytes=plan.cache_bytes,
        gate=CacheGate(plan, model_device(model)) if plan.cache_bytes > 0 else None,
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
