"""Sharded, resumable statistics passes.

A statistics pass (covariances, eigenvalue refit, diagonal) is a sum over training sequences
(:func:`reduce_shards`); DataInf's per-example gradients are rows, one per sequence
(:func:`gather_shards`).
:class:`ShardedPasses` splits the batches into fixed *shards* of consecutive batches; each shard's
partial sums are computed by one rank (shard ``k`` on rank ``k mod world``) and, when a
:class:`PartialSums` store is attached, written atomically to disk as soon as the shard is done.
A rerun after a crash (even ``SIGKILL``) loads the shards that exist and computes only the rest.

The total is always ``Σ_k part_k`` summed in shard order, whether a part was computed now or
loaded, so an interrupted-and-resumed run gives bit-identical statistics to an uninterrupted one.

**Replay cache.** EK-FAC needs two statistics passes over the same data (covariances, then the
eigenvalue refit in their eigenbasis); both differentiate the very same objective (the data
labels, or labels sampled with the same per-example seeds). With ``cache_bytes > 0`` the
captured ``LayerBatch`` tensors of the first pass are kept, batch by batch, while they fit in
that budget, and the second pass replays them instead of running the model again: the fit
then costs one forward + backward over the data instead of two, with bit-identical statistics.
Batches that do not fit (the rest of the shard where the cache filled up, later shards, and
shards loaded from a previous run) are recomputed as before, in the same batches. A
``gate`` (the memory budget, :mod:`influscope.budget`) can refuse a batch on measured memory.
Across ranks the per-rank totals are all-reduced, which equals a single process to float
tolerance (only the summation order differs).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from influscope.engine.distributed import all_reduce_, barrier, rank_and_world
from influscope.errors import DataError
from influscope.modules.capture import LayerBatch
from influscope.progress import tmp_bytes, track, watch
from influscope.storage.atomic import (
    atomic_write_json,
    atomic_write_tensors,
    read_json,
    read_tensors,
)

logger = logging.getLogger(__name__)

Batch = tuple[list[int], dict[str, LayerBatch], torch.Tensor]
#: ``make(desc, positions)`` runs one pass over the examples at ``positions``.
PassFactory = Callable[[str, Sequence[int]], Iterator[Batch]]


class PartialSums:
    """Per-shard partial sums of statistics passes, stored under one directory.

    Layout: ``DIR/meta.json`` (what the partial sums were computed from) and
    ``DIR/<phase>/shard-<k>.safetensors``. A directory whose ``meta.json`` differs from
    ``expected`` is stale and is cleared (partial sums are a cache, not a result).

    Args:
        directory: Where partial sums live.
        expected: JSON-able description (config, model and data fingerprints, shard layout).
    """

    def __init__(self, directory: str | Path, expected: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.loaded = 0
        self.computed = 0
        self.expected = _jsonable(expected)
        meta = self.directory / "meta.json"
        # only rank 0 touches the directory; the others wait at the barrier
        if rank_and_world()[0] == 0 and meta.is_file() and read_json(meta) != self.expected:
            logger.info("discarding stale partial sums in %s", self.directory)
            shutil.rmtree(self.directory, ignore_errors=True)
        barrier()

    def path(self, phase: str, shard: int) -> Path:
        return self.directory / phase / f"shard-{shard:05d}.safetensors"

    def get(self, phase: str, shard: int) -> dict[str, torch.Tensor] | None:
        """The stored partial sums of a shard, or ``None``."""
        p = self.path(phase, shard)
        if not p.is_file():
            return None
        self.loaded += 1
        return read_tensors(p)

    def put(self, phase: str, shard: int, sums: dict[str, torch.Tensor]) -> None:
        """Store a shard's partial sums atomically."""
        self.computed += 1
        meta = self.directory / "meta.json"
        if not meta.is_file():  # created lazily: a fit failing in its first shard leaves nothing
            atomic_write_json(meta, self.expected)
        path = self.path(phase, shard)
        size = sum(t.numel() * t.element_size() for t in sums.values())
        with watch(
            f"saving {phase} shard {shard + 1}", size, lambda: tmp_bytes(path.parent, path.name)
        ):
            atomic_write_tensors(path, sums)

    def clear(self) -> None:
        """Delete every partial sum (after the stage has been saved; rank 0 only)."""
        barrier()
        if rank_and_world()[0] == 0:
            shutil.rmtree(self.directory, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass
class ShardedPasses:
    """Passes over the training data split into shards of consecutive batches.

    Calling the object (``passes(desc)``) iterates over all batches of this rank, like a plain
    pass; :func:`reduce_shards` uses the shards instead.

    Attributes:
        make: Runs one pass over the given example positions.
        n_examples: Number of training examples.
        batch_size: Examples per batch.
        shard_size: Examples per shard (rounded up to whole batches).
        store: Where partial sums are kept, or ``None`` (in memory only).
    """

    make: PassFactory
    n_examples: int
    batch_size: int
    shard_size: int
    store: PartialSums | None = None
    counts: dict[str, int] = field(default_factory=dict)
    cache_bytes: int = 0
    #: ``gate(size) -> bool``: whether a captured batch of ``size`` bytes may join the replay
    #: cache now (the memory budget's measured check, :class:`influscope.budget.CacheGate`);
    #: ``None`` admits whatever fits in ``cache_bytes``.
    gate: Callable[[int], bool] | None = None
    _cache: dict[int, list[Batch]] = field(default_factory=dict, repr=False)
    _cached_bytes: int = field(default=0, repr=False)
    _cache_full: bool = field(default=False, repr=False)
    _complete: set[int] = field(default_factory=set, repr=False)

    @property
    def cached_shards(self) -> int:
        """Number of shards whose captured batches are held for replay."""
        return len(self._cache)

    def shard_batches(self, desc: str, k: int, positions: Sequence[int]) -> Iterator[Batch]:
        """The batches of shard ``k``: replayed when cached, else computed (and cached if room)."""
        if k in self._cache:
            self.counts["replayed"] = self.counts.get("replayed", 0) + 1
            cached = self._cache[k]
            self.counts["replayed_batches"] = self.counts.get("replayed_batches", 0) + len(cached)
            yield from track(cached, f"{desc} (replayed from memory)", total=len(cached))
            done = sum(len(batch[0]) for batch in cached)
            if k not in self._complete and done < len(positions):
                # the cache filled up inside this shard: the remaining batches (the same
                # batches, since the cached ones start the shard) are computed again
                yield from self.make(desc, positions[done:])
            return
        keep: list[Batch] | None = [] if self.cache_bytes > 0 and not self._cache_full else None
        for batch in self.make(desc, positions):
            if keep is not None:
                size = batch_bytes(batch)
                over = self._cached_bytes + size > self.cache_bytes
                if over or (self.gate is not None and not self.gate(size)):
                    self._cache_full = True  # over budget: keep what is cached, stop here
                    if keep:
                        self._cache[k] = keep
                    keep = None
                else:
                    keep.append(batch)
                    self._cached_bytes += size
            yield batch
        if keep is not None:
            self._cache[k] = keep
            self._complete.add(k)

    def clear_cache(self) -> None:
        """Drop the replay cache (frees the captured tensors and gives the freed heap back to
        the operating system, so later stages start from a smaller resident size)."""
        held = self._cached_bytes
        self._cache.clear()
        self._complete.clear()
        self._cached_bytes = 0
        if held:
            from influscope.budget import release_heap

            release_heap()

    def shards(self) -> list[list[int]]:
        """Example positions of each shard."""
        per = max(1, -(-self.shard_size // self.batch_size)) * self.batch_size
        return [
            list(range(s, min(s + per, self.n_examples))) for s in range(0, self.n_examples, per)
        ]

    def __call__(self, desc: str) -> Iterator[Batch]:
        rank, world = rank_and_world()
        for k, positions in enumerate(self.shards()):
            if k % world == rank:
                yield from self.shard_batches(desc, k, positions)


Compute = Callable[[Iterator[Batch]], dict[str, torch.Tensor]]


def reduce_shards(
    passes: ShardedPasses | Callable[[str], Iterator[Batch]],
    phase: str,
    compute: Compute,
    zeros: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``Σ_shards compute(shard)``, resumable and all-reduced over ranks.

    Args:
        passes: Sharded passes (or a plain ``desc → iterator`` callable: one shard, no store).
        phase: Name of the statistics (``"covariance"``, ``"eigenvalues"``, …).
        compute: Sums the statistics over the batches of one shard (keys fixed by ``zeros``).
        zeros: Zero tensors with every key and shape, for ranks without shards.

    Returns:
        The totals over all shards and ranks, same keys as ``zeros()``.
    """
    # The first shard computed here *is* the running total (0 + x = x exactly), so a fit with
    # one shard holds its sums once, not twice; later shards are added to it.
    total: dict[str, torch.Tensor] | None = None
    if not isinstance(passes, ShardedPasses):
        total = compute(passes(phase))
    else:
        for _, _, part, loaded in _own_shards(passes, phase, compute):
            if total is None and not loaded:
                total = part
            else:
                if total is None:  # read back from disk: moved to the device of zeros()
                    total = zeros()
                _add(total, part)
            del part
    if total is None:  # a rank without shards
        total = zeros()
    for v in total.values():
        all_reduce_(v)
    return total


def gather_shards(
    passes: ShardedPasses | Callable[[str], Iterator[Batch]],
    phase: str,
    compute: Compute,
    zeros: Callable[[int], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Per-example rows of every shard in example order, resumable and gathered over ranks.

    The row-wise counterpart of :func:`reduce_shards`, for statistics that keep one row per
    training example (DataInf's per-example gradients) instead of a sum. ``compute`` returns,
    for the batches of one shard, tensors whose first dimension runs over the shard's examples
    in order. Each rank writes the rows of its shards into zero tensors of ``n`` rows; every
    row is non-zero on exactly one rank, so the all-reduce (a sum) gathers them exactly.

    Args:
        passes: Sharded passes, or a plain ``desc → iterator`` callable (one process's complete
            pass, returned as ``compute`` gives it; no store, no all-reduce).
        phase: Name of the statistics (``"gradients"``).
        compute: The rows of one shard: ``{key: (m, ...)}``.
        zeros: ``zeros(m)`` gives zero tensors of ``m`` rows with every key.

    Returns:
        ``{key: (n, ...)}`` over all shards and ranks.
    """
    if not isinstance(passes, ShardedPasses):
        return compute(passes(phase))
    total = zeros(passes.n_examples)
    for k, positions, part, _ in _own_shards(passes, phase, compute):
        start, stop = positions[0], positions[-1] + 1
        for key, rows in part.items():
            if rows.shape[0] != stop - start:
                raise DataError(
                    f"Shard {k} of {phase!r} has {rows.shape[0]} rows of {key!r}, expected "
                    f"{stop - start}; delete the partial results under the run directory."
                )
            total[key][start:stop] = rows.to(total[key].device, total[key].dtype)
    for v in total.values():
        all_reduce_(v)
    return total


def _own_shards(
    passes: ShardedPasses, phase: str, compute: Compute
) -> Iterator[tuple[int, list[int], dict[str, torch.Tensor], bool]]:
    """``(k, positions, statistics, loaded)`` of every shard this rank owns
    (``k mod world = rank``): read back from the store when a previous run saved it
    (``loaded``), else computed and saved."""
    rank, world = rank_and_world()
    shards = passes.shards()
    for k, positions in enumerate(shards):
        if k % world != rank:
            continue
        part = passes.store.get(phase, k) if passes.store is not None else None
        loaded = part is not None
        if part is None:
            part = compute(passes.shard_batches(f"{phase} {k + 1}/{len(shards)}", k, positions))
            if passes.store is not None:
                passes.store.put(phase, k, part)
        yield k, positions, part, loaded


def batch_bytes(batch: Batch) -> int:
    """Bytes held by the captured tensors of one batch."""
    total = 0
    for lb in batch[1].values():
        for t in (lb.a, lb.s, lb.mask):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def _add(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> None:
    for key, value in part.items():
        total[key] += value.to(total[key].device, total[key].dtype)
