"""Estimated memory and disk of each stage, before anything runs (``--dry-run``).

Estimates, per stage, for ``L`` tracked layers of widths ``in_ℓ`` (bias column included) and
``out_ℓ``, batch ``B``, padded length ``T``, ``N`` training sequences and ``Q`` queries (4-byte
floats unless stated):

* every pass: parameters ``4P`` + activations kept for backward ``≈ 4·B·T·(16·d·n_layer + 2V)``
  (``d`` hidden width, ``V`` vocabulary; the usual transformer rule of thumb) + captured
  ``ā, s``: ``4·B·T·Σ_ℓ (in_ℓ + out_ℓ)``;
* covariance: ``8·Σ_ℓ (in_ℓ² + out_ℓ²)`` (float64 sums);
* eigenvalues: ``8·Σ_ℓ in_ℓ out_ℓ`` sums + ``4·B·Σ_ℓ in_ℓ out_ℓ`` rotated gradients of a batch;
* factors on disk: ``8·Σ_ℓ (in_ℓ² + out_ℓ² + in_ℓ out_ℓ)``;
* ``curvature="datainf"`` instead keeps every per-example gradient, ``4·N·Σ_ℓ in_ℓ out_ℓ`` in
  memory and on disk (``N`` capped by ``max_examples``), plus a batch of gradients;
  ``diagonal`` keeps ``8·Σ_ℓ in_ℓ out_ℓ`` sums and a batch of gradients; ``identity`` fits
  nothing. Each curvature's rows come from its spec's ``estimate``
  (:mod:`influscope.curvature.spec`);
* scores: ``4·Q·Σ_ℓ in_ℓ out_ℓ`` query gradients + ``4·Q·N·L`` per-layer scores;
* index: ``N·D·bytes`` on disk with ``D = Σ_ℓ k_out,ℓ k_in,ℓ``, ``4·B·D`` per batch in memory;
  with ``init="eigen"`` also up to one full rotated gradient ``4·B·max_ℓ in_ℓ out_ℓ`` per batch
  and the used eigenvectors ``4·Σ_ℓ (in_ℓ² + out_ℓ²)`` (in memory and on disk).

They are rough (within a factor of ~2 for activations), meant to tell 1 GiB from 100 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from influscope.curvature.registry import CURVATURES
from influscope.curvature.spec import FitFootprint
from influscope.tasks.data import EncodedDataset


@dataclass
class StageEstimate:
    """Estimated peak memory and disk of one stage, in bytes."""

    stage: str
    memory: float
    disk: float
    note: str = ""


def _gib(x: float) -> str:
    return f"{x / 2**30:.3f} GiB" if x >= 2**27 else f"{x / 2**20:.1f} MiB"


def estimate(
    inf,
    train: EncodedDataset,
    batch_size: int = 8,
    n_queries: int = 0,
    index=None,
    curvature: str = "ekfac",
    max_examples: int | None = None,
) -> list[StageEstimate]:
    """Estimates for fitting (``curvature``, on at most ``max_examples`` sequences), scoring
    and (when ``index`` is an IndexConfig) indexing."""
    tracked = getattr(inf, "tracked", inf)  # an Influence or its TrackedModel
    model = tracked.model
    n_params = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "config", None)
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 0
    depth = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0) or 0
    vocab = getattr(cfg, "vocab_size", 0) or 0
    bsz = index.batch_size if index is not None else batch_size
    t = train.max_length()
    n = len(train)
    dims = [(layer.in_dim, layer.out_dim) for layer in tracked.layers]
    base = 4 * n_params + 4 * bsz * t * (16 * width * depth + 2 * vocab)
    captured = 4 * bsz * t * sum(i + o for i, o in dims)
    grad = sum(i * o for i, o in dims)
    n_fit = n if max_examples is None else min(n, max_examples)
    footprint = FitFootprint(dims, n_fit, bsz, base + captured)
    out = [StageEstimate(*row) for row in CURVATURES[curvature].estimate(footprint)]
    if n_queries:
        out.append(
            StageEstimate(
                "score", base + captured + 4 * n_queries * grad + 4 * n_queries * n * len(dims), 0
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
                base + captured + (4 * bsz + 8) * d + extra_mem,
                n * d * nbytes + extra_disk,
                f"{n} rows × {d} dims × {nbytes} B",
            )
        )
    return out


def describe(estimates: list[StageEstimate]) -> str:
    """A plain-text table of estimates."""
    rows = [f"{'stage':<20} {'memory':>12} {'disk':>12}  note"]
    for e in estimates:
        rows.append(f"{e.stage:<20} {_gib(e.memory):>12} {_gib(e.disk):>12}  {e.note}")
    return "\n".join(rows)
