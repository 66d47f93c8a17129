"""Preconditioned query gradients, optionally as rank-r factorisations.

For query ``q`` and layer ℓ the stored quantity is ``q̃_ℓ = (G_ℓ + λ_ℓ I)^{-1} ∇_{W_ℓ} f_q``,
an ``(out, in)`` matrix. With ``rank = r`` it is kept as its truncated SVD
``q̃_ℓ ≈ Σ_{k<r} σ_k u_k v_k^⊤`` (σ folded into ``u``): ``U (Q, r, out)``, ``V (Q, r, in)``.
Many queries then share one pass over the training data (Grosse et al. 2023, §3.2).

The truncated SVD is exact or randomized (:mod:`influscope.linalg`, ``ScoreConfig.query_svd``,
default ``"auto"``); K-FAC/EK-FAC take it in their eigenbasis
(:meth:`~influscope.curvature.base.CurvatureOperator.precondition_low_rank`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from influscope.config import ScoreConfig, resolve_dtype
from influscope.curvature.base import CurvatureOperator
from influscope.engine.distributed import rank_and_world
from influscope.errors import ConfigError
from influscope.modules.passes import layer_passes
from influscope.modules.tracked import TrackedModel
from influscope.progress import track
from influscope.tasks.data import EncodedDataset

#: Above this many stored elements (all queries, all layers) low-rank queries stay factored.
DENSE_BUDGET = 2**27


@dataclass
class PreconditionedQueries:
    """Per-layer preconditioned query gradients.

    Attributes:
        dense: ``{layer: (Q, out, in)}`` for layers kept (or reconstructed) dense.
        factors: ``{layer: (U (Q, r, out), V (Q, r, in))}`` for low-rank layers.
        measurements: ``(Q,)`` the measurement ``f`` of each query at θ.
        refine_residuals: ``(Q, k+1)`` relative residuals ``‖∇f − (G+Λ)v‖/‖∇f‖`` of the
            refinement iterations (``ScoreConfig.refine_steps``), or ``None`` without one.
        source: Fingerprint of the encoded queries these gradients came from
            (:meth:`EncodedDataset.fingerprint`), so that a stored scores stage can be checked
            against them; ``None`` when unknown (built by hand).
    """

    layer_names: list[str]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    measurements: torch.Tensor | None = None
    source: str | None = None
    refine_residuals: torch.Tensor | None = None

    @property
    def n_queries(self) -> int:
        name = self.layer_names[0]
        return int(
            self.dense[name].shape[0] if name in self.dense else self.factors[name][0].shape[0]
        )

    def matrix(self, layer: str) -> torch.Tensor:
        """The ``(Q, out, in)`` matrix of a layer (reconstructed from factors if needed)."""
        if layer in self.dense:
            return self.dense[layer]
        u, v = self.factors[layer]
        return torch.einsum("qro,qri->qoi", u, v)

    def select(self, queries: list[int]) -> PreconditionedQueries:
        """A view restricted to some queries."""
        return PreconditionedQueries(
            self.layer_names,
            {k: v[queries] for k, v in self.dense.items()},
            {k: (u[queries], v[queries]) for k, (u, v) in self.factors.items()},
            None if self.measurements is None else self.measurements[queries],
            None if self.source is None else _digest(f"{self.source}{list(queries)}"),
            None if self.refine_residuals is None else self.refine_residuals[queries],
        )


def _digest(text: str) -> str:
    """A 16-hex-digit SHA-256 of ``text`` (the length of :meth:`EncodedDataset.fingerprint`)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def precondition_queries(
    tracked: TrackedModel,
    operator: CurvatureOperator,
    queries: EncodedDataset,
    config: ScoreConfig,
    dense_budget: int = DENSE_BUDGET,
    train: EncodedDataset | None = None,
    refine_store=None,
) -> PreconditionedQueries:
    """Compute ``(G + λI)^{-1} ∇f`` for every query and layer (one pass over the queries).

    With ``config.refine_steps > 0`` the dense block-diagonal result is refined towards the
    joint ``(G + Λ)^{-1} ∇f`` over ``train`` (:func:`influscope.solvers.refine_queries`) and
    only then truncated to rank ``r``: refining the factors instead would need the SVD to
    commute with the solve, which it does not (the refined vector's top singular directions
    differ from those of ``P^{-1}∇f``).

    The queries are refined in blocks of at most ``config.batch_size`` that fit half of
    ``config.refine_memory_gb`` (:func:`refine_block_size`), one block after the other, so
    memory does not grow with the number of queries. With a ``refine_store`` (a
    :class:`~influscope.engine.shards.PartialSums`, which :meth:`influscope.Influence.score`
    passes when it stores its stage) each block is saved when done, so a killed refinement
    resumes at the first unfinished block. Every method keeps per-query step sizes (and
    ASTRA's mini-batches depend only on the seed and the step), so blocks give the same
    result as one solve over every query.
    """
    model, task, layers = tracked.model, tracked.task, list(tracked.layers)
    if config.refine_steps > 0:
        return _refined(
            model, task, layers, operator, queries, config, dense_budget, train, refine_store
        )
    dense: dict[str, list[torch.Tensor]] = {}
    us: dict[str, list[torch.Tensor]] = {}
    vs: dict[str, list[torch.Tensor]] = {}
    values = []
    for _, grads, f in layer_passes(
        model,
        task,
        layers,
        queries,
        batch_size=config.batch_size,
        objective="measurement",
        amp_dtype=resolve_dtype(config.amp_dtype),
        desc="query gradients",
    ):
        values.append(f)
        for name, lb in track(grads.items(), "query gradients: preconditioning", unit="layer"):
            # the operator takes the captured rows, not Σ_t s_t ā_tᵀ: an eigenbasis operator
            # rotates the T token rows, far cheaper than rotating an (out, in) gradient
            full = min(lb.s.shape[-1], lb.a.shape[-1])
            if config.query_rank is None or config.query_rank >= full:
                dense.setdefault(name, []).append(operator.precondition_batch(name, lb))
            else:
                u, v = operator.precondition_low_rank_batch(
                    name, lb, config.query_rank, config.query_svd
                )
                us.setdefault(name, []).append(u)
                vs.setdefault(name, []).append(v)
    names = [layer.name for layer in layers]
    pq = PreconditionedQueries(
        names,
        {k: torch.cat(v) for k, v in dense.items()},
        {k: (torch.cat(us[k]), torch.cat(vs[k])) for k in us},
        torch.cat(values),
        queries.fingerprint(),
    )
    # Reconstruct low-rank layers densely when it fits: the dense contraction is cheaper per
    # training token than the factored one (out·in vs Q·r·(out+in)), and scores are identical.
    total = sum(pq.n_queries * layer.numel for layer in layers)
    if total <= dense_budget:
        for name in list(pq.factors):
            pq.dense[name] = pq.matrix(name)
            del pq.factors[name]
    return pq


def refine_block_size(
    config: ScoreConfig, n_params: int, dtype: torch.dtype, n_queries: int
) -> int:
    """Queries refined together: as many as half of ``config.refine_memory_gb`` holds.

    Each query of a block holds :data:`influscope.solvers.cost.STATE_VECTORS` vectors of
    ``n_params`` numbers; the other half of the budget is the Gauss-Newton product's tangents
    (:meth:`~influscope.solvers.GaussNewtonProduct.query_block`). At most ``config.batch_size``
    (the resumable unit), at least 1.
    """
    from influscope.solvers.cost import state_bytes

    half = config.refine_memory_gb * 2**30 / 2
    fit = int(half // max(1, state_bytes(1, n_params, dtype)))
    return max(1, min(fit, config.batch_size, n_queries))


def _refined(model, task, layers, operator, queries, config, dense_budget, train, store=None):
    """Refine the queries block by block (see :func:`precondition_queries`).

    Each block's query gradients are computed, preconditioned, refined and (when low-rank
    queries are stored factored) truncated before the next block starts, so the solver's
    memory is one block's whatever the number of queries.
    """
    from influscope.linalg import low_rank
    from influscope.solvers import GaussNewtonProduct, refine_queries
    from influscope.solvers.cost import RefineMeter
    from influscope.solvers.gnh import product_batch_size

    if train is None:
        raise ConfigError(
            f"refine_steps={config.refine_steps} needs the training data (the Gauss-Newton "
            "products run over it): pass train= to Influence.precondition, or refine_steps=0."
        )
    names = [layer.name for layer in layers]
    n_q, n_params = len(queries), sum(layer.numel for layer in layers)
    dtype = next(model.parameters()).dtype
    block = refine_block_size(config, n_params, dtype, n_q)
    product = GaussNewtonProduct(
        model,
        task,
        layers,
        operator.damping,
        product_batch_size(config.batch_size, train, config.refine_examples),
        memory_budget=config.refine_memory_gb * 2**30 / 2,
    )
    rank = config.query_rank
    factored = rank is not None and n_q * n_params > dense_budget
    resident = sum(p.numel() * p.element_size() for p in model.parameters()) + (
        operator.held_bytes()
    )
    meter = RefineMeter(blocks=-(-n_q // block), resident=resident)
    dense: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    values, histories = [], []
    for i, lo in enumerate(range(0, n_q, block)):
        rows = list(range(lo, min(lo + block, n_q)))
        grads, start, f, seconds = _block_gradients(  # (q, P), (q, P), (q,), s
            model, task, layers, operator, queries.subset(rows), config
        )
        if i == 0:  # a dense P⁻¹r rotates twice where P⁻¹∇f from token rows rotates once
            meter.precondition_seconds = 2 * seconds / len(rows)
        values.append(f)
        done = store.get("refine", i) if store is not None else None
        if done is not None:  # refined before an interruption
            hist = done.pop("__residuals__").to(start.device)
            part = {k: v.to(device=start.device, dtype=start.dtype) for k, v in done.items()}
        else:  # the solver takes the flat tensors over (no copies)
            part, hist = refine_queries(
                product,
                operator,
                grads,
                start,
                train,
                steps=config.refine_steps,
                method=config.refine,
                tol=config.refine_tol,
                examples=config.refine_examples,
                seed=config.refine_seed,
                alpha=config.refine_alpha,
                scale_start=config.refine_start == "scaled",
                meter=meter,
            )
            if store is not None and rank_and_world()[0] == 0:
                store.put(
                    "refine",
                    i,
                    {**{k: v.cpu() for k, v in part.items()}, "__residuals__": hist.cpu()},
                )
        del grads, start
        histories.append(hist)
        for layer in layers:
            m = part.pop(layer.name)  # (q, out, in)
            if rank is not None and rank < min(layer.out_dim, layer.in_dim):
                u, v = low_rank(m, rank, config.query_svd)
                if factored:
                    factors.setdefault(layer.name, []).append((u, v))
                    continue
                m = torch.einsum("qro,qri->qoi", u, v)
            dense[layer.name].append(m)
    # blocks may stop at different steps: converged queries repeat their last residual
    width = max(h.shape[1] for h in histories)
    residuals = torch.cat(
        [torch.cat([h, h[:, -1:].expand(-1, width - h.shape[1])], 1) for h in histories]
    )
    return PreconditionedQueries(
        names,
        {k: torch.cat(v) for k, v in dense.items() if v},
        {
            k: (torch.cat([u for u, _ in v]), torch.cat([w for _, w in v]))
            for k, v in factors.items()
        },
        torch.cat(values),
        queries.fingerprint(),
        residuals,
    )


def _block_gradients(model, task, layers, operator, queries, config):
    """``((q, P) gradients, (q, P) P^{-1} images, (q,) measurements, seconds)``, flat.

    ``seconds`` is the time spent forming ``P^{-1}∇f`` (the refinement's cost estimate uses
    it, :class:`~influscope.solvers.cost.RefineMeter`).

    The flat layout is :meth:`~influscope.solvers.GaussNewtonProduct.flatten`'s (each layer's
    ``(out, in)`` matrix row-major, layer after layer); each layer's part is written in place,
    so no per-layer copy is kept besides the two ``(q, P)`` tensors. ``P^{-1}∇f`` comes from
    the captured token rows (:meth:`CurvatureOperator.precondition_batch`: an eigenbasis
    operator rotates the ``T`` rows, not the ``(out, in)`` gradient), as in the plain path.
    """
    sizes = [layer.numel for layer in layers]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    grads = start = None
    values = []
    row, seconds = 0, 0.0
    for _, lbs, f in layer_passes(
        model,
        task,
        layers,
        queries,
        batch_size=config.batch_size,
        objective="measurement",
        amp_dtype=resolve_dtype(config.amp_dtype),
        desc="query gradients",
    ):
        values.append(f)
        n = len(f)
        for layer, off, size in zip(layers, offsets, sizes):
            lb = lbs[layer.name]
            g = lb.gradient()  # (B, out, in)
            if grads is None:  # (q, P) each
                grads = g.new_empty(len(queries), sum(sizes))
                start = g.new_empty(len(queries), sum(sizes))
            grads[row : row + n, off : off + size].view(n, *g.shape[1:]).copy_(g)
            del g
            t0 = time.perf_counter()
            pre = operator.precondition_batch(layer.name, lb)  # (B, out, in)
            seconds += time.perf_counter() - t0
            start[row : row + n, off : off + size].view(n, *pre.shape[1:]).copy_(pre)
            del pre
        row += n
    return grads, start, torch.cat(values), seconds
