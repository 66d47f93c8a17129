"""Scores of training sequences against preconditioned queries.

Sign convention: the influence of training sequence ``z_m`` on query ``q`` is

.. math:: I_q(z_m) = -\\nabla f_q^⊤ (G + λI)^{-1} \\nabla L(z_m) = \\frac{df_q}{dε},

the rate of change of the query's measurement when ``z_m`` is up-weighted by ``ε``; positive
means training on ``z_m`` *increases* ``f_q`` (e.g. ``log p(completion | prompt)``). Units: those
of ``f`` per unit of up-weighting of one sequence's summed loss.

Decompositions (both sum exactly to the total):

* per layer: ``I = Σ_ℓ -q̃_ℓ · ∇_{W_ℓ} L(z_m)``;
* per token: ``I = Σ_ℓ Σ_t -s_t^⊤ q̃_ℓ ā_t``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from influscope.config import ScoreConfig, resolve_dtype
from influscope.curvature.base import CurvatureOperator
from influscope.engine.distributed import all_reduce_, rank_and_world
from influscope.errors import ConfigError
from influscope.modules.capture import LayerBatch
from influscope.modules.heads import head_splits
from influscope.modules.passes import layer_passes
from influscope.modules.tracked import TrackedModel
from influscope.scoring.heads import head_terms
from influscope.scoring.queries import PreconditionedQueries
from influscope.tasks.data import EncodedDataset


def layer_terms(pq: PreconditionedQueries, name: str, lb: LayerBatch) -> torch.Tensor:
    """Influence terms of one layer: ``(Q, B)``."""
    if name in pq.dense:
        q = pq.dense[name].to(lb.a.dtype)  # (Q, out, in)
        g = lb.gradient()  # (B, out, in)
        # one (Q, out·in) × (out·in, B) product; torch.einsum("qoi,boi->qb") computes the same
        # about 15× slower on CPU (SmolLM2's MLP shapes: benchmarks/layer_terms_cpu.py)
        return -(q.reshape(q.shape[0], -1) @ g.reshape(g.shape[0], -1).t())  # (Q, B)
    return token_terms(pq, name, lb).sum(-1)


def token_terms(pq: PreconditionedQueries, name: str, lb: LayerBatch) -> torch.Tensor:
    """Per-token influence terms of one layer: ``(Q, B, T)``."""
    if name in pq.dense:
        q = pq.dense[name].to(lb.a.dtype)  # (Q, out, in)
        qa = torch.einsum("qoi,bti->qbto", q, lb.a)  # (Q, B, T, out)
        return -(qa * lb.s.unsqueeze(0)).sum(-1)
    u, v = pq.factors[name]
    u, v = u.to(lb.a.dtype), v.to(lb.a.dtype)  # (Q, r, out), (Q, r, in)
    su = torch.einsum("bto,qro->qbtr", lb.s, u)  # (Q, B, T, r)
    av = torch.einsum("bti,qri->qbtr", lb.a, v)  # (Q, B, T, r)
    return -(su * av).sum(-1)


@dataclass
class Scores:
    """Influence scores of training sequences on queries.

    Attributes:
        pairwise: ``(Q, N)`` total influence (see the module docstring for sign and units).
        layer_names: Tracked layers, in the order of ``per_layer``'s last axis.
        train_indices: Global index of each of the ``N`` training sequences.
        per_layer: ``(Q, N, L)`` layer terms, or ``None``.
        self_influence: ``(N,)`` ``∇L^⊤ (G + λI)^{-1} ∇L``, when computed.
        measurements: ``(Q,)`` the queries' measurements at θ.
        per_head: ``(Q, N, H)`` per-attention-head terms (``ScoreConfig(per_head=True)``), or
            ``None``; they sum to ``per_layer`` over each layer's heads.
        head_names: ``"<layer>:<head>"`` label of each of the ``H`` columns of ``per_head``.
    """

    pairwise: torch.Tensor
    layer_names: list[str]
    train_indices: list[int]
    per_layer: torch.Tensor | None = None
    self_influence: torch.Tensor | None = None
    measurements: torch.Tensor | None = None
    per_head: torch.Tensor | None = None
    head_names: list[str] | None = None

    def top(self, query: int, k: int = 10, opponents: bool = False) -> list[tuple[int, float]]:
        """The ``k`` most positive (or most negative) training sequences for a query.

        Args:
            query: Position of the query (``0 ≤ query < Q``).
            k: How many to return (at most ``N``; ``k ≥ 0``).
            opponents: Return the most negative instead.

        Returns:
            ``[(position in the scored training set, score), ...]`` best first.

        Raises:
            ConfigError: If ``query`` is out of range or ``k`` is negative.
        """
        n_q = self.pairwise.shape[0]
        if _as_int(query) is None or not -n_q <= _as_int(query) < n_q:
            raise ConfigError(
                f"query must be the position of a scored query, 0 ≤ query < {n_q}; received "
                f"{query!r}. These scores hold {n_q} queries (rows of `pairwise`)."
            )
        if _as_int(k) is None or _as_int(k) < 0:
            raise ConfigError(f"k must be an integer ≥ 0, received {k!r}.")
        row = self.pairwise[_as_int(query)]
        k = _as_int(k)
        _, idx = torch.topk(-row if opponents else row, min(k, row.numel()))
        return [(int(i), float(row[i])) for i in idx]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"pairwise": self.pairwise.contiguous()}
        for key in ("per_layer", "self_influence", "measurements", "per_head"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.contiguous()
        return out


def _as_int(value) -> int | None:
    """``value`` as an int when it is integer-like (int, NumPy / 0-d torch integer), else None."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def _like(pq: PreconditionedQueries) -> dict:
    """dtype and device of the stored query gradients."""
    t = next(iter(pq.dense.values()), None)
    if t is None:
        t = next(iter(pq.factors.values()))[0]
    return {"dtype": t.dtype, "device": t.device}


def score_pass(
    tracked: TrackedModel,
    pq: PreconditionedQueries,
    train: EncodedDataset,
    config: ScoreConfig,
    operator: CurvatureOperator | None = None,
    want_self: bool = False,
) -> Scores:
    """One pass over the training data computing pairwise (and per-layer / head / self) scores."""
    model, task, layers = tracked.model, tracked.task, list(tracked.layers)
    names = [layer.name for layer in layers]
    splits = head_splits(model, layers) if config.per_head else []  # validates before the pass
    head_names = [h for split in splits for h in split.names]
    per_head = (
        torch.zeros(pq.n_queries, len(train), len(head_names), **_like(pq)) if splits else None
    )  # (Q, N, H)
    # Under torch.distributed each rank scores its own batches into a zero-filled (Q, N, L)
    # tensor; an all-reduce then assembles the full matrix on every rank.
    per_layer = torch.zeros(pq.n_queries, len(train), len(names), **_like(pq))  # (Q, N, L)
    self_inf = (
        torch.zeros(len(train), **_like(pq)) if want_self and operator is not None else None
    )  # (N,)
    for pos, grads, _ in layer_passes(
        model,
        task,
        layers,
        train,
        batch_size=config.batch_size,
        objective="loss",
        amp_dtype=resolve_dtype(config.amp_dtype),
        desc="training scores",
        shard=True,
        # without it the freed blocks of each batch stay resident: on SmolLM2-135M (32 × 96
        # tokens, full-rank queries) the pass peaked at 8.68 GiB instead of 6.83 and left
        # 4.3 GiB held (benchmarks/score_heap.py)
        trim_heap=True,
    ):
        block = torch.stack([layer_terms(pq, n, grads[n]) for n in names], dim=-1)  # (Q, B, L)
        per_layer[:, pos] = block.to(per_layer)
        if per_head is not None:
            heads = [head_terms(pq, split, grads[split.layer]) for split in splits]
            per_head[:, pos] = torch.cat(heads, dim=-1).to(per_head)  # (Q, B, H)
        if self_inf is not None:
            quad = sum(operator.quadratic(n, grads[n].gradient()) for n in names)  # (B,)
            self_inf[pos] = quad.to(self_inf)
        del grads, block  # the batch's captures are freed before the next (trim_heap)
    if rank_and_world()[1] > 1:
        all_reduce_(per_layer)
        if per_head is not None:
            all_reduce_(per_head)
        if self_inf is not None:
            all_reduce_(self_inf)
    pairwise = per_layer.sum(-1)
    if config.normalize == "relatif":
        if self_inf is None:
            raise ValueError("RelatIF normalisation needs self-influence (want_self=True).")
        pairwise = pairwise / self_inf.clamp_min(1e-30).sqrt()
        per_layer = per_layer / self_inf.clamp_min(1e-30).sqrt()[None, :, None]
        if per_head is not None:
            per_head = per_head / self_inf.clamp_min(1e-30).sqrt()[None, :, None]
    return Scores(
        pairwise=pairwise,
        layer_names=names,
        train_indices=list(train.indices),
        per_layer=per_layer if config.per_layer else None,
        self_influence=self_inf,
        measurements=pq.measurements,
        per_head=per_head,
        head_names=head_names or None,
    )


def self_influence_pass(
    tracked: TrackedModel,
    operator: CurvatureOperator,
    train: EncodedDataset,
    batch_size: int = 8,
    amp_dtype: str | None = None,
) -> torch.Tensor:
    """``∇L(z)^⊤ (G + λI)^{-1} ∇L(z)`` for every training sequence: ``(N,)``."""
    model, task, layers = tracked.model, tracked.task, list(tracked.layers)
    out = []
    for _, grads, _ in layer_passes(
        model,
        task,
        layers,
        train,
        batch_size=batch_size,
        objective="loss",
        amp_dtype=resolve_dtype(amp_dtype),
        desc="self-influence",
    ):
        out.append(
            sum(operator.quadratic(layer.name, grads[layer.name].gradient()) for layer in layers)
        )
    return torch.cat(out)


def token_pass(
    tracked: TrackedModel,
    pq: PreconditionedQueries,
    train: EncodedDataset,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Per-token influence of each training sequence on each query.

    Returns:
        One ``(Q, T_m)`` tensor per training sequence (``T_m`` its model rows × length, padding
        removed); each row sums to the sequence's pairwise score.
    """
    model, task, layers = tracked.model, tracked.task, list(tracked.layers)
    out: list[torch.Tensor] = []
    for pos, grads, _ in layer_passes(
        model, task, layers, train, batch_size=batch_size, objective="loss", desc="token scores"
    ):
        total = sum(token_terms(pq, layer.name, grads[layer.name]) for layer in layers)
        mask = grads[layers[0].name].mask  # (B, T) or None
        for b in range(len(pos)):
            row = total[:, b]  # (Q, T_pad)
            out.append(row[:, mask[b]] if mask is not None else row)
    return out
