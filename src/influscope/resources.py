"""Estimated memory, disk and time of each stage, before anything runs (``--dry-run``).

With a :class:`~influscope.costs.BatchCost` (what ``influscope fit --dry-run`` measures: the
memory the process holds with the model loaded, and one timed batch) the estimate is

* memory = ``resident`` (measured: runtime, the model's weights, tokenizer, data; no
  parameter gradients are ever formed) + the stage's own tensors below, where a pass adds the
  measured peak of one batch (activations kept for backward and the captured ``ā, s``);
* time = the measured batch scaled by padded tokens ``Σ_b B_b T_b / (B_0 T_0)`` per pass,
  plus the measured float64 eigendecompositions.

Without it (library use) a pass is ``4P`` parameters + ``≈ 4·B·T·(16·d·n_layer + 2V)``
activations (``d`` hidden width, ``V`` vocabulary; a transformer rule of thumb, within a factor
of ~2) + ``4·B·T·Σ_ℓ (in_ℓ + out_ℓ)`` captures, and no time is given.

Stage tensors, for ``L`` tracked layers of widths ``in_ℓ`` (bias column included) and
``out_ℓ``, ``K = Σ_ℓ (in_ℓ² + out_ℓ²)``, ``P = Σ_ℓ in_ℓ out_ℓ``, batch ``B``, ``N`` training
sequences and ``Q`` queries (4-byte floats unless stated):

* K-FAC / EK-FAC (:func:`~influscope.curvature.kfac.kronecker_estimate`): covariance
  ``8K`` float64 sums (``2·8K`` with several shards: the total and a shard's part); eigendecomposition one layer at a time (``8K`` + ``≈ 40·d_max²``
  workspace); eigenvalues ``8K`` bases + ``16P`` + ``8·B·max in·out``; EK-FAC also keeps the
  replay cache, ``4·Σ_b B_b T_b Σ_ℓ (in_ℓ + out_ℓ)`` capped at what the memory budget leaves
  (:mod:`influscope.budget`) and at ``FitConfig.cache_mb``;
  factors on disk ``8(K + P)``;
* ``curvature="datainf"`` keeps every per-example gradient, ``4·N·P`` in memory and on disk
  (``N`` capped by ``max_examples``), plus a batch of gradients; ``diagonal`` keeps ``8P``
  sums and a batch of gradients; ``identity`` fits nothing. Each curvature's rows come from
  its spec's ``estimate`` (:mod:`influscope.curvature.spec`);
* scores: the factors ``8(K + P)`` + ``4·Q·P`` query gradients + ``4·Q·N·L`` per-layer scores;
* index: ``N·D·bytes`` on disk with ``D = Σ_ℓ k_out,ℓ k_in,ℓ``, ``4·B·D`` per batch in memory;
  with ``init="eigen"`` also up to one full rotated gradient ``4·B·max_ℓ in_ℓ out_ℓ`` per batch
  and the used eigenvectors ``4·Σ_ℓ (in_ℓ² + out_ℓ²)`` (in memory and on disk).

Measured against peak RSS in docs/benchmarks.md ("dry-run estimates").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from influscope.costs import BatchCost
from influscope.curvature.registry import CURVATURES
from influscope.curvature.spec import FitFootprint
from influscope.tasks.data import EncodedDataset


@dataclass
class StageEstimate:
    """Estimated peak memory and disk of one stage, in bytes, and its time in seconds
    (``None`` when no batch was timed)."""

    stage: str
    memory: float
    disk: float
    note: str = ""
    seconds: float | None = None


def _gib(x: float) -> str:
    return f"{x / 2**30:.3f} GiB" if x >= 2**27 else f"{x / 2**20:.1f} MiB"


def pass_activation_bytes(model, dims, batch_size: int, tokens: int) -> float:
    """Rule of thumb for what one forward + backward of a batch adds to the memory held
    between batches: ``4·B·T·(16·d·n_layer + 2V)`` activations (``d`` hidden width, ``V``
    vocabulary, from the model's config; within a factor of ~2 on transformers) + the
    captured ``ā, s`` of the tracked layers, ``4·B·T·Σ_ℓ (in_ℓ + out_ℓ)``.

    Args:
        model: The model (its ``config`` gives width, depth and vocabulary when it has one).
        dims: ``(in_ℓ, out_ℓ)`` of the tracked layers.
        batch_size: Sequences per batch ``B``.
        tokens: Tokens per sequence ``T`` (the longest).
    """
    cfg = getattr(model, "config", None)
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 0
    depth = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0) or 0
    vocab = getattr(cfg, "vocab_size", 0) or 0
    per_token = 16 * width * depth + 2 * vocab + sum(i + o for i, o in dims)
    return 4.0 * batch_size * tokens * per_token


def padded_tokens(data: EncodedDataset, batch_size: int) -> int:
    """``Σ_b B_b T_b``: the tokens of every batch, each padded to its longest sequence."""
    total = 0
    for _, examples in data.batches(batch_size):
        longest = max(int(ex["input_ids"].shape[-1]) for ex in examples)
        total += len(examples) * longest
    return total


def estimate(
    inf,
    train: EncodedDataset,
    batch_size: int = 8,
    n_queries: int = 0,
    index=None,
    curvature: str = "ekfac",
    max_examples: int | None = None,
    cost: BatchCost | None = None,
    cache_mb: float | None = None,
    memory_gb: float | None = None,
    shard_size: int = 256,
    partitions: Sequence[tuple[int, int]] | None = None,
    stream_factors: bool = False,
    query_rank: int | None = None,
    score_batch_size: int | None = None,
) -> list[StageEstimate]:
    """Estimates for fitting (``curvature``, on at most ``max_examples`` sequences), scoring
    and (when ``index`` is an IndexConfig) indexing; with ``cost`` (one measured batch, see
    :func:`influscope.costs.measure_batch`) memory is anchored on measurements and fit stages
    get a time.

    The replay cache is sized as the fit sizes it (:mod:`influscope.budget`): what the
    budget ``memory_gb`` (``None``: held now + 90 % of the free memory) leaves above the
    stages' peak without it, at most ``cache_mb`` (``None``: no limit) and at most the whole
    first pass.

    With ``partitions`` (``(start, stop)`` ranges of the tracked layers, the fit's
    :attr:`~influscope.budget.FitPlan.partitions`) the fit runs one module partition after
    the other: memory is the largest partition's, each partition pays its own passes over the
    data (time × the number of partitions for the forward + backward part) and the factors on
    disk are all layers'. With ``stream_factors`` (implied by several partitions) the score
    stage holds one layer's factors instead of all of them. With ``query_rank`` and more
    query numbers than :data:`~influscope.scoring.queries.DENSE_BUDGET`, the queries are kept
    as rank-``r`` factors ``4·Q·r·Σ(in + out)`` plus one layer's rotated gradients and their
    scaled copy and SVD input, ``3·4·Q·max in·out``, instead of ``4·Q·P``.

    The score row is at ``score_batch_size`` (``None``: ``batch_size``), the batch the score
    pass runs at (:func:`influscope.budget.plan_score`), which is often larger than the fit's
    (a fit under a budget lowers its batch to hold its statistics; a score holds none): the
    measured batch peak is scaled by ``score_batch_size / cost.batch_size`` (activations and
    captures grow with the batch; scaling all of it, fixed part included, errs high)."""
    tracked = getattr(inf, "tracked", inf)  # an Influence or its TrackedModel
    model = tracked.model
    n_params = sum(p.numel() for p in model.parameters())
    bsz = index.batch_size if index is not None else batch_size
    t = train.max_length()
    n = len(train)
    dims = [(layer.in_dim, layer.out_dim) for layer in tracked.layers]
    grad = sum(i * o for i, o in dims)
    n_fit = n if max_examples is None else min(n, max_examples)
    fit_data = train.subset(list(range(n_fit)))
    tokens = padded_tokens(fit_data, bsz)
    if cost is not None:
        resident = cost.resident
        pass_bytes = cost.resident + cost.batch_peak
    else:
        resident = 4 * n_params
        pass_bytes = resident + pass_activation_bytes(model, dims, bsz, t)
    spec = CURVATURES[curvature]
    per = max(1, -(-shard_size // bsz)) * bsz
    shards = max(1, -(-n_fit // per))
    ranges = list(partitions) if partitions else [(0, len(dims))]

    def bare_peak(ds) -> float:
        bare = FitFootprint(ds, n_fit, bsz, pass_bytes, resident, 0.0, shards)
        return max((row[1] for row in spec.estimate(bare)), default=pass_bytes)

    # the partition whose stages need the most: the fit's peak
    lo, hi = max(ranges, key=lambda r: bare_peak(dims[r[0] : r[1]]))
    part = dims[lo:hi]
    full_cache = 4 * tokens * sum(i + o for i, o in part) + tokens  # a and s, plus the mask
    cache = 0.0
    if spec.replays:
        peak = bare_peak(part)
        from influscope.budget import budget_bytes
        from influscope.modules.passes import model_device

        room = max(0.0, budget_bytes(memory_gb, model_device(model)) - peak)
        cache = min(full_cache, room, math.inf if cache_mb is None else cache_mb * 2**20)
    footprint = FitFootprint(part, n_fit, bsz, pass_bytes, resident, cache, shards)
    out = [StageEstimate(*row) for row in spec.estimate(footprint)]
    if len(ranges) > 1:
        whole = spec.estimate(FitFootprint(dims, n_fit, bsz, pass_bytes, resident, 0.0, shards))
        for row, full in zip(out, whole):
            row.disk = full[2]  # every partition's factors end on disk
            row.note = (
                f"{row.note + '; ' if row.note else ''}largest of {len(ranges)} module "
                f"partitions ({hi - lo} layers)"
            )
    if cost is not None:
        _fit_times(out, cost, tokens, cache / full_cache if full_cache else 1.0, len(ranges))
    if n_queries:
        factors = 8 * sum(i * i + o * o + i * o for i, o in dims)
        note = ""
        if stream_factors or len(ranges) > 1:  # one layer's factors at a time
            factors = 8 * max(i * i + o * o + i * o for i, o in dims)
            note = "factors streamed one layer at a time"
        from influscope.scoring.queries import DENSE_BUDGET

        held = 4 * n_queries * grad  # (Q, out, in) per layer, all layers
        if query_rank is not None and n_queries * grad > DENSE_BUDGET:
            widest_grad = max(i * o for i, o in dims)
            held = 4 * n_queries * (query_rank * sum(i + o for i, o in dims) + 3 * widest_grad)
        score_b = score_batch_size or bsz
        if cost is not None:
            score_pass = cost.resident + cost.batch_peak * score_b / max(cost.batch_size, 1)
        else:
            score_pass = resident + pass_activation_bytes(model, dims, score_b, t)
        if score_b != bsz:
            note = f"{note + '; ' if note else ''}batch {score_b}"
        out.append(
            StageEstimate(
                "score", score_pass + factors + held + 4 * n_queries * n * len(dims), 0, note
            )
        )
    if index is not None:
        d = sum(min(index.k_out, o) * min(index.k_in, i) for i, o in dims)
        nbytes = {"float32": 4, "float16": 2, "bfloat16": 2}[index.dtype]
        extra_mem = extra_disk = 0
        if index.init == "eigen":  # rotated gradients + used eigenvectors (at most all)
            extra_disk = 4 * sum(i * i + o * o for i, o in dims)
            extra_mem = 4 * bsz * max(i * o for i, o in dims) + extra_disk
        out.append(
            StageEstimate(
                "index",
                pass_bytes + (4 * bsz + 8) * d + extra_mem,
                n * d * nbytes + extra_disk,
                f"{n} rows × {d} dims × {nbytes} B",
            )
        )
    return out


def _fit_times(
    rows: list[StageEstimate], cost: BatchCost, tokens: int, cached: float, partitions: int = 1
) -> None:
    """Seconds of each fit row from the timed batch, scaled to ``tokens`` padded tokens;
    ``cached`` is the fraction of the eigenvalue pass replayed from memory (no forward);
    each of ``partitions`` module partitions runs its own forward + backward passes (the
    statistics and eigendecompositions are the same in total)."""
    scale = tokens / max(cost.tokens, 1)
    p = partitions
    for row in rows:
        if row.stage == "fit: covariance":
            row.seconds = scale * (p * cost.seconds_pass + cost.seconds_cov)
        elif row.stage == "fit: eigendecomposition":
            row.seconds = cost.seconds_eigh
        elif row.stage == "fit: eigenvalues":
            row.seconds = scale * (cost.seconds_rot + p * (1 - cached) * cost.seconds_pass)
        elif row.stage.startswith("fit"):  # one pass with per-example statistics
            row.seconds = scale * (p * cost.seconds_pass + cost.seconds_rot)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, sec = divmod(math.ceil(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def describe(estimates: list[StageEstimate], cost: BatchCost | None = None) -> str:
    """A plain-text table of estimates; with ``cost`` a time column, a total and what was
    measured."""
    timed = cost is not None or any(e.seconds is not None for e in estimates)
    head = f"{'stage':<24} {'peak memory':>12} {'disk':>12}"
    rows = [head + (f" {'time':>14}" if timed else "") + "  note"]
    for e in estimates:
        line = f"{e.stage:<24} {_gib(e.memory):>12} {_gib(e.disk):>12}"
        rows.append(line + (f" {_duration(e.seconds):>14}" if timed else "") + f"  {e.note}")
    fit = [e for e in estimates if e.stage.startswith("fit")]
    if fit:
        peak = max(e.memory for e in fit)
        total = sum(e.seconds for e in fit if e.seconds is not None)
        rows.append(
            f"fit peak ≈ {_gib(peak)}"
            + (f", time ≈ {_duration(total)} (+ writing {_gib(fit[-1].disk)})" if timed else "")
        )
    if cost is not None:
        rows.append(
            f"measured on {cost.device}: {_gib(cost.resident)} held with the model loaded; one "
            f"batch of {cost.batch_size} sequences ({cost.tokens} padded tokens): forward + "
            f"backward {cost.seconds_pass:.2f} s, +{_gib(cost.batch_peak)} at its peak"
        )
    return "\n".join(rows)
