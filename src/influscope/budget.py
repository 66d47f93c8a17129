"""The memory budget of a fit or a score (``FitConfig.memory_gb``, ``ScoreConfig.memory_gb``).

The budget ``B`` bounds the memory the process holds at its peak: the resident set size on
CPU, allocated device memory on CUDA — the figures ``--dry-run`` measures
(:mod:`influscope.costs`). By default (``memory_gb=None``) it is what the process holds when
the stage starts plus 90 % of the device's free memory (:func:`free_memory`: ``MemAvailable``
of ``/proc/meminfo`` on CPU, ``torch.cuda.mem_get_info`` on CUDA).

Before any forward pass, :func:`plan_fit` / :func:`plan_score` take the dry-run estimator's
per-stage memory (each curvature spec's ``estimate``, :mod:`influscope.resources`) with the
measured resident size ``R`` and the rule-of-thumb activations of a batch, and

1. refuse (:class:`~influscope.errors.MemoryBudgetError`) when ``B`` is below what the most
   demanding tracked layer needs alone at batch size 1, naming the layer and that minimum;
2. when ``B`` is below what all tracked layers need together at batch size 1, split them into
   the fewest contiguous *module partitions* that each fit (:func:`split_greedy`); each
   partition is fitted on its own passes over the data, written to disk and freed before the
   next (:mod:`influscope.curvature.run`), so memory is bounded by the largest partition at
   the cost of one more forward + backward pass over the data per partition (the gradient
   index's projected fit cannot be partitioned and is refused instead, naming the minimum);
3. lower the batch size (halving) until the estimate fits;
4. cap the replay cache at what the estimate leaves.

While the covariance pass runs, :class:`CacheGate` admits a captured batch into the replay
cache only when the *measured* memory now + the measured peak of one batch + what the later
stages add (``reserve``, from the same estimate) stays within ``B``. So the cache, the one
large optional allocation, is used only while it fits, and replaying never pushes the peak
above the budget even where the activation rule of thumb is off. The cache changes where the
second pass's inputs come from, not their values: factors are bit-identical with any budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from influscope.costs import peak_bytes, resident_bytes
from influscope.curvature.registry import CURVATURES
from influscope.curvature.spec import FitFootprint
from influscope.errors import ConfigError, MemoryBudgetError
from influscope.modules.passes import model_device
from influscope.resources import pass_activation_bytes

if TYPE_CHECKING:
    from influscope.config import FitConfig, ScoreConfig
    from influscope.modules.tracked import TrackedModel
    from influscope.tasks.data import EncodedDataset

__all__ = [
    "CacheGate",
    "FitPlan",
    "budget_bytes",
    "default_budget",
    "fix_mmap_threshold",
    "free_memory",
    "plan_fit",
    "plan_score",
    "release_heap",
]

#: Share of the free memory the default budget may use.
FREE_SHARE = 0.9
#: Share of the budget the replay cache leaves free for the heap's fragmentation (measured:
#: without it, a budget of 1.2 GiB on the `small` benchmark peaked 4 % above it).
SAFETY = 0.05


def host_available() -> int:
    """Bytes of host memory available to new allocations (``MemAvailable``)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ImportError):
        import psutil

        return int(psutil.virtual_memory().available)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_free(device: torch.device) -> int:
    """Free bytes of an accelerator (``torch.cuda.mem_get_info``)."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def free_memory(device: torch.device | str) -> int:
    """Free memory of the device the stage runs on: CUDA's free memory, else the host's."""
    device = torch.device(device)
    return device_free(device) if device.type == "cuda" else host_available()


def default_budget(device: torch.device | str) -> float:
    """The budget when none is given: held now + ``FREE_SHARE`` × free (bytes)."""
    device = torch.device(device)
    return resident_bytes(device) + FREE_SHARE * free_memory(device)


def budget_bytes(memory_gb: float | None, device: torch.device | str) -> float:
    """``memory_gb`` GiB in bytes, or :func:`default_budget` for ``None``."""
    return default_budget(device) if memory_gb is None else float(memory_gb) * 2**30


def release_heap() -> None:
    """Give freed heap memory back to the operating system (glibc ``malloc_trim``; a no-op
    elsewhere). Freed tensors of a few MiB live on the heap, which glibc does not shrink by
    itself, so without this the resident size stays at its peak after the replay cache is
    dropped."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


#: ``mallopt`` parameter number of glibc's mmap threshold.
M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(nbytes: int = 4 * 2**20) -> bool:
    """Serve every allocation of at least ``nbytes`` with its own ``mmap`` (glibc ``mallopt``),
    so that freeing it returns it to the operating system at once; whether it could.

    glibc raises its threshold to the size of each large block freed (up to 32 MiB), after
    which blocks of a few MiB — a layer's covariance sums, eigendecomposition temporaries,
    captured batches — come from the heap and stay resident once freed: measured +70 MiB
    (+12 %) above the estimate on a width-384 GPT-2 fitted in two module partitions. A fit
    split into partitions because memory is tight sets the threshold for the process (glibc
    then stops adjusting it); larger blocks cost a page fault per page when reused.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def _gb_arg(x: float) -> str:
    """A ``--memory-gb`` value at least ``x`` bytes (rounded up, 3 significant digits)."""
    gb = x / 2**30
    digits = max(0, 2 - math.floor(math.log10(gb))) if gb > 0 else 0
    step = 10.0**-digits
    return f"{math.ceil(gb / step) * step:.{digits}f}"


def _refuse_below_one_layer(budget, given, layers, dims, needs, what: str, other_fix: str) -> int:
    """The index of the most demanding layer (``needs[j]``: bytes layer ``j`` needs alone,
    ``what`` says for what); raise :class:`MemoryBudgetError` when ``budget`` is below it."""
    worst = max(range(len(dims)), key=needs.__getitem__)
    if budget < needs[worst]:
        i, o = dims[worst]
        raise MemoryBudgetError(
            f"The memory budget ({given}: {_gib(budget)}) is below what one layer needs: "
            f"{layers[worst].name!r} ({o} × {i}) needs at least {_gib(needs[worst])} {what}. "
            f"Expected a budget ≥ {_gib(needs[worst])}; received {_gib(budget)}. Fix: raise "
            f"--memory-gb / memory_gb to at least {_gb_arg(needs[worst])}, {other_fix}."
        )
    return worst


@dataclass(frozen=True)
class FitPlan:
    """What a fit may hold under its budget (bytes).

    Attributes:
        budget: The budget ``B``.
        resident: Held when the fit starts (runtime, model, data).
        batch_size: Sequences per pass (``FitConfig.batch_size``, or less to fit).
        cache_bytes: Largest replay cache the estimate allows (0: none).
        reserve: What the stages after the covariance pass add over it (estimate).
        activations: Rule-of-thumb memory one batch adds during its forward + backward.
        partitions: ``(start, stop)`` ranges of the tracked layers fitted together, in order:
            one range (all layers) when their statistics fit the budget together; else the
            fewest contiguous module partitions that each fit, fitted one after the other
            (each with its own passes over the data).
        peak: The estimated peak of the fit (the largest stage of the largest partition).
    """

    budget: float
    resident: float
    batch_size: int
    cache_bytes: int
    reserve: float
    activations: float
    partitions: tuple[tuple[int, int], ...] = ()
    peak: float = 0.0

    @property
    def n_partitions(self) -> int:
        """Module partitions (1: every layer's statistics held together, as without a plan)."""
        return max(1, len(self.partitions))


def split_even(n_layers: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous ranges of ``n_layers`` layers, sizes differing by at most one."""
    bounds = [round(i * n_layers / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def split_greedy(needs_of, n_layers: int, budget: float) -> list[tuple[int, int]]:
    """The fewest contiguous ranges whose need ``needs_of(start, stop)`` fits ``budget``.

    Greedy from the first layer: a range grows while it still fits. A range's need never
    falls when a layer joins it, so no split into contiguous ranges has fewer. Every single
    layer is known to fit (checked before).
    """
    out, start = [], 0
    while start < n_layers:
        stop = start + 1
        while stop < n_layers and needs_of(start, stop + 1) <= budget:
            stop += 1
        out.append((start, stop))
        start = stop
    return out


def _shards(n: int, batch_size: int, shard_size: int) -> int:
    per = max(1, -(-shard_size // batch_size)) * batch_size
    return max(1, -(-n // per))


def _fit_rows(tracked, config, dims, n, t, resident, batch_size) -> list[float]:
    """Estimated memory of each fit stage (no replay cache)."""
    act = pass_activation_bytes(tracked.model, dims, batch_size, t)
    shards = _shards(n, batch_size, config.shard_size)
    footprint = FitFootprint(dims, n, batch_size, resident + act, resident, 0.0, shards)
    rows = [row[1] for row in CURVATURES[config.curvature].estimate(footprint)]
    return rows or [resident + act]


def plan_fit(
    tracked: TrackedModel,
    train: EncodedDataset,
    config: FitConfig,
    layers=None,
    partitionable: bool = True,
) -> FitPlan:
    """Check a fit against its budget, split it into module partitions when needed, and size
    its batch and replay cache (no forward pass).

    Args:
        tracked: The model, its task and the tracked layers.
        train: The sequences the curvature is fitted on.
        config: The fit settings (``memory_gb``, ``batch_size``, ``cache_mb``,
            ``partitions``, ...).
        layers: The layers whose statistics are fitted, when not the tracked ones (an index's
            projected stand-ins, with their own ``in_dim`` / ``out_dim``).
        partitionable: Whether the caller can fit the layers in module partitions (the
            gradient index's projected fit cannot: it refuses instead).

    Raises:
        MemoryBudgetError: ``B`` is below what one tracked layer needs (the message names the
            layer and the minimum); or below all tracked layers together at batch size 1 when
            the fit cannot be partitioned; or a forced ``config.partitions`` leaves a
            partition that does not fit.
        ConfigError: ``config.partitions`` exceeds the number of layers.
    """
    device = model_device(tracked.model)
    budget = budget_bytes(config.memory_gb, device)
    resident = float(resident_bytes(device))
    n, t = len(train), train.max_length()
    layers = list(tracked.layers if layers is None else layers)
    dims = [(layer.in_dim, layer.out_dim) for layer in layers]
    given = f"memory_gb={config.memory_gb}" if config.memory_gb is not None else "the default"
    forced = getattr(config, "partitions", None)
    if forced is not None and forced > len(dims):
        raise ConfigError(
            f"partitions={forced} asks for more module partitions than the {len(dims)} tracked "
            f"layers. Expected 1 ≤ partitions ≤ {len(dims)}; received {forced}. Fix: pass "
            f"--partitions {len(dims)} or fewer, or leave it unset (as the budget needs)."
        )
    if forced is not None and forced > 1 and not partitionable:
        raise ConfigError(
            f"partitions={forced}: this fit (a gradient index's projected curvature) cannot be "
            "split into module partitions. Fix: leave partitions unset."
        )

    def need(start: int, stop: int, batch: int = 1) -> float:
        return max(_fit_rows(tracked, config, dims[start:stop], n, t, resident, batch))

    # 1. the most demanding single layer, alone, at batch size 1
    needs = [need(j, j + 1) for j in range(len(dims))]
    worst = _refuse_below_one_layer(
        budget,
        given,
        layers,
        dims,
        needs,
        f"to fit {config.curvature} alone at batch size 1 (the process already holds "
        f"{_gib(resident)})",
        "or free memory",
    )
    # 2. all layers together, at batch size 1; else module partitions
    need_all = need(0, len(dims))
    if forced is not None:
        ranges = split_even(len(dims), forced)
        for a, b in ranges:
            if budget < need(a, b):
                raise MemoryBudgetError(
                    f"The memory budget ({given}: {_gib(budget)}) is below what module "
                    f"partition {layers[a].name!r} … {layers[b - 1].name!r} ({b - a} layers of "
                    f"partitions={forced}) needs: {_gib(need(a, b))} at batch size 1. Expected a "
                    f"budget ≥ {_gib(need(a, b))}; received {_gib(budget)}. Fix: leave "
                    f"--partitions unset (the fewest partitions that fit are chosen), pass more "
                    f"partitions, or raise --memory-gb / memory_gb to at least "
                    f"{_gb_arg(need(a, b))}."
                )
    elif budget >= need_all:
        ranges = [(0, len(dims))]
    elif not partitionable:
        raise MemoryBudgetError(
            f"The memory budget ({given}: {_gib(budget)}) is below what the {len(dims)} "
            f"tracked layers need together: {_gib(need_all)} at batch size 1 (their "
            f"{config.curvature} statistics are held at once; the largest, "
            f"{layers[worst].name!r}, needs {_gib(needs[worst])} alone). Expected a budget ≥ "
            f"{_gib(need_all)}; received {_gib(budget)}. Fix: raise --memory-gb / memory_gb "
            f"to at least {_gb_arg(need_all)}, or track fewer "
            "layers (--modules), or use stats_dtype='float32'."
        )
    else:  # within (1 − SAFETY)·B, as the replay cache: the estimate is a few % low when
        # the allocator's heap, not the statistics, sets the peak (small models)
        ranges = split_greedy(need, len(dims), (1 - SAFETY) * budget)
    # 3. the largest batch (halving) whose estimate fits, in every partition
    batch = config.batch_size

    def rows_at(b: int) -> list[list[float]]:
        return [_fit_rows(tracked, config, dims[lo:hi], n, t, resident, b) for lo, hi in ranges]

    rows = rows_at(batch)
    while batch > 1 and max(max(r) for r in rows) > budget:
        batch = max(1, batch // 2)
        rows = rows_at(batch)
    top = max(range(len(rows)), key=lambda i: max(rows[i]))
    peak = max(rows[top])
    # 4. the replay cache: what the estimate leaves (it adds to every stage)
    spec = CURVATURES[config.curvature]
    cache = 0
    if spec.replays:
        cache = max(0.0, budget - peak)
        if config.cache_mb is not None:
            cache = min(cache, config.cache_mb * 2**20)
    lo, hi = ranges[top]
    return FitPlan(
        budget=budget,
        resident=resident,
        batch_size=batch,
        cache_bytes=int(cache),
        reserve=max(0.0, peak - rows[top][0]),
        activations=pass_activation_bytes(tracked.model, dims[lo:hi], batch, t),
        partitions=tuple(ranges),
        peak=peak + int(cache),
    )


class CacheGate:
    """Admits a captured batch into the replay cache only while the measured memory allows.

    A batch of ``size`` bytes is admitted when
    ``max(held now + one batch's peak, peak so far + size) + reserve ≤ (1 − SAFETY) · budget``.
    "Held now" is read when the batch is offered (it includes that batch's captures and the
    cache so far); "peak so far" is the process's peak counter (``VmHWM`` / CUDA's peak
    allocation), which every later batch is expected to exceed by the cache's growth; one
    batch's peak is measured over the first batch as the rise of that counter above what was
    held before it — or, when an earlier peak (e.g. loading the model) hides the rise, twice
    the rule-of-thumb estimate.

    Args:
        plan: The fit's plan (budget, reserve, estimated activations).
        device: Where the fit runs.
    """

    def __init__(self, plan: FitPlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.before = float(resident_bytes(device))
        self.peak_before = float(peak_bytes(device))
        self.batch_peak: float | None = None

    def __call__(self, size: int) -> bool:
        now = float(resident_bytes(self.device))
        peak = float(peak_bytes(self.device))
        if self.batch_peak is None:
            if peak > self.peak_before:  # the first batch set a new peak: measured
                self.batch_peak = peak - self.before
            else:
                self.batch_peak = 2 * self.plan.activations
        # every later batch peaks about `size` higher than the batches so far (the cache
        # grows by it); SAFETY leaves room for the heap's fragmentation to grow
        expected = max(now + self.batch_peak, peak + size) + self.plan.reserve
        return expected <= (1 - SAFETY) * self.plan.budget


def plan_score(
    tracked: TrackedModel,
    train: EncodedDataset,
    n_queries: int,
    config: ScoreConfig,
    factor_bytes: float = 0.0,
    queries_held: bool = False,
) -> int:
    """Check a score pass against its budget; the batch size it can afford.

    The factors are already loaded (part of the resident size), or streamed from disk one
    layer at a time (``factor_bytes``: the largest layer's, held on top). A batch adds its
    activations and captures (rule of thumb, :func:`influscope.resources.pass_activation_bytes`);
    the stage holds the query gradients ``4·Q·P`` (already part of the resident size with
    ``queries_held``: :meth:`influscope.Influence.score` plans again, from the measured
    resident size, once the queries are preconditioned) and the per-layer scores ``4·Q·N·L``.
    The batch is halved until the estimate fits ``(1 − SAFETY)·B``, the margin the fit's plan
    leaves for the heap's fragmentation.

    Raises:
        MemoryBudgetError: ``B`` is below what one tracked layer needs at batch size 1 (the
            message names it and the minimum), or below all layers together.
    """
    device = model_device(tracked.model)
    budget = budget_bytes(config.memory_gb, device)
    resident = float(resident_bytes(device))
    n, t = len(train), train.max_length()
    layers = list(tracked.layers)
    dims = [(layer.in_dim, layer.out_dim) for layer in layers]
    given = f"memory_gb={config.memory_gb}" if config.memory_gb is not None else "the default"

    from influscope.scoring.queries import DENSE_BUDGET

    # rank-r queries above DENSE_BUDGET numbers stay factored (scoring/queries.py): their
    # factors, plus one layer's rotated gradients, scaled copy and SVD input
    factored = (
        config.query_rank is not None and n_queries * sum(i * o for i, o in dims) > DENSE_BUDGET
    )

    def need(ds, b: int) -> float:
        if factored:
            rank = config.query_rank
            grads = rank * sum(i + o for i, o in ds) + 3 * max(i * o for i, o in ds)
        else:
            grads = sum(i * o for i, o in ds)
        held = 4 * n_queries * (0 if queries_held else grads) + 4 * n_queries * n * len(ds)
        return resident + factor_bytes + pass_activation_bytes(tracked.model, ds, b, t) + held

    needs = [need([d], 1) for d in dims]
    _refuse_below_one_layer(
        budget,
        given,
        layers,
        dims,
        needs,
        f"to score {n_queries} queries at batch size 1 (the process already holds "
        f"{_gib(resident)}, factors included)",
        "or score fewer queries at once",
    )
    if budget < need(dims, 1):
        raise MemoryBudgetError(
            f"The memory budget ({given}: {_gib(budget)}) is below what the {len(dims)} "
            f"tracked layers need together to score {n_queries} queries: "
            f"{_gib(need(dims, 1))} at batch size 1. Expected a budget ≥ "
            f"{_gib(need(dims, 1))}; received {_gib(budget)}. Fix: raise --memory-gb / "
            f"memory_gb to at least {_gb_arg(need(dims, 1))}, score fewer queries at once, or "
            "keep low-rank queries (query_rank)."
        )
    batch = config.batch_size
    while batch > 1 and need(dims, batch) > (1 - SAFETY) * budget:
        batch = max(1, batch // 2)
    return batch
