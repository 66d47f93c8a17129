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
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from influscope.budget import (
    CacheGate,
    FitPlan,
    fix_mmap_threshold,
    plan_fit,
    release_heap,
)
from influscope.config import FitConfig
from influscope.curvature.base import CurvatureOperator
from influscope.curvature.registry import CURVATURES
from influscope.curvature.streamed import StreamedOperator
from influscope.engine.distributed import barrier, is_writer
from influscope.engine.shards import PartialSums, ShardedPasses
from influscope.modules.expert_lists import damp_unrouted_experts
from influscope.modules.passes import layer_passes, model_device
from influscope.modules.tracked import TrackedModel
from influscope.storage.atomic import atomic_write_json, atomic_write_tensors, read_json
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
    # the memory budget: refused before any forward pass when one layer does not fit; the
    # layers are split into module partitions when they do not fit together; the batch size
    # and the replay cache are sized to it (influscope.budget)
    partitionable = fit_layers is None and wrap is None
    plan = plan_fit(tracked, train, config, fit_layers, partitionable=partitionable)
    if on_plan is not None:
        on_plan(plan)
    if plan.batch_size < config.batch_size:
        logger.info(
            "memory budget %.2f GiB: batch size %d instead of %d",
            plan.budget / 2**30,
            plan.batch_size,
            config.batch_size,
        )
    if plan.n_partitions > 1:
        logger.info(
            "memory budget %.2f GiB: %d tracked layers fitted in %d module partitions (each "
            "partition runs its own passes over the data: %d forward + backward passes instead "
            "of 1 or 2)",
            plan.budget / 2**30,
            len(tracked.layers),
            plan.n_partitions,
            plan.n_partitions * (2 if CURVATURES[config.curvature].replays else 1),
        )
        fix_mmap_threshold()  # freed blocks go back to the system (see its docstring)
        return _fit_partitions(tracked, train, config, plan, store, amp_dtype, desc_prefix)
    return _fit_group(
        tracked,
        train,
        config,
        plan,
        list(tracked.layers),
        fit_layers,
        store,
        wrap,
        amp_dtype,
        desc_prefix,
    )


def _fit_group(
    tracked: TrackedModel,
    train: EncodedDataset,
    config: FitConfig,
    plan: FitPlan,
    layers: list,
    fit_layers: Sequence | None,
    store: PartialSums | None,
    wrap: Callable | None,
    amp_dtype: torch.dtype | None,
    desc_prefix: str,
) -> tuple[CurvatureOperator, dict[str, int]]:
    """Fit ``layers`` together: their passes over the data and their statistics."""
    model, task = tracked.model, tracked.task
    spec = CURVATURES[config.curvature]
    batch_size = plan.batch_size

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


#: A finished partition's factors and what they hold (inside its partial-sums directory).
PARTITION_TENSORS = "factors.safetensors"
PARTITION_INFO = "factors.json"


def _fit_partitions(
    tracked: TrackedModel,
    train: EncodedDataset,
    config: FitConfig,
    plan: FitPlan,
    store: PartialSums | None,
    amp_dtype: torch.dtype | None,
    desc_prefix: str,
) -> tuple[StreamedOperator, dict[str, int]]:
    """Fit the module partitions of ``plan`` one after the other; a :class:`StreamedOperator`
    over the partitions' files.

    Each partition ``k`` keeps its shard sums and, once fitted, its factors in
    ``DIR/partition-<k>/`` (``DIR`` the stage's partial-sums directory, or a temporary one
    deleted with the operator when nothing is stored). A partition directory records what it
    was computed from (the stage's fingerprints, the partition's layers and the batch size):
    a rerun after a kill reuses the finished partitions and the finished shards of the
    unfinished one, and discards a partition computed from anything else (stale).
    """
    layers = list(tracked.layers)
    owned = None
    if store is not None:
        root, base = store.directory, store.expected
    else:  # nothing stored: a temporary directory, deleted with the operator (one process)
        root = owned = Path(tempfile.mkdtemp(prefix="influscope-partitions-"))
        base = {}
    files: dict[str, Path] = {}
    damping: dict[str, float] = {}
    counts = {"loaded": 0, "computed": 0, "replayed": 0, "partitions": plan.n_partitions}
    counts["partitions_loaded"] = 0
    total = plan.n_partitions
    for k, (lo, hi) in enumerate(plan.partitions):
        group = layers[lo:hi]
        names = [layer.name for layer in group]
        directory = root / f"partition-{k:03d}"
        expected = {
            **base,
            "partition": [k, total],
            "partition_layers": names,
            "batch_size": plan.batch_size,
        }
        sub = PartialSums(directory, expected) if store is not None else None
        tensors_path, info_path = directory / PARTITION_TENSORS, directory / PARTITION_INFO
        if sub is not None and info_path.is_file() and tensors_path.is_file():
            damping.update(read_json(info_path)["damping"])
            files.update(dict.fromkeys(names, tensors_path))
            counts["partitions_loaded"] += 1
            logger.info("module partition %d/%d: reusing its stored factors", k + 1, total)
            continue
        logger.info(
            "module partition %d/%d: %d layers (%s … %s)",
            k + 1,
            total,
            len(names),
            names[0],
            names[-1],
        )
        operator, part_counts = _fit_group(
            tracked,
            train,
            config,
            plan,
            group,
            None,
            sub,
            None,
            amp_dtype,
            f"{desc_prefix}partition {k + 1}/{total}: ",
        )
        for key in ("loaded", "computed", "replayed"):
            counts[key] += part_counts[key]
        if is_writer():  # rank 0 writes; the other ranks read the same files
            if sub is not None:
                atomic_write_json(directory / "meta.json", sub.expected)
            atomic_write_tensors(tensors_path, operator.tensors())
            atomic_write_json(info_path, {"damping": operator.damping, "layers": names})
            for phase in directory.iterdir():  # the shard sums: the factors are written
                if phase.is_dir():
                    shutil.rmtree(phase, ignore_errors=True)
        barrier()
        damping.update(operator.damping)
        files.update(dict.fromkeys(names, tensors_path))
        del operator
        release_heap()
    device = model_device(tracked.model)
    return StreamedOperator(config.curvature, files, damping, device, owned=owned), counts
