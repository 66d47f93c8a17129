"""Exact re-ranking of candidate rows (from an ANN index, BM25, or anything else).

For each query ``q`` and each of its candidate rows ``m`` the exact index score
``I_q(z_m) = -⟨q̃, g̃_m⟩`` is recomputed from the stored rows (the same numbers as
:meth:`GradientIndex.search`), and the best ``k`` are kept. Only the union of the candidates is
read, ``chunk`` rows at a time, and only each query's own candidates are kept from each chunk,
so memory is ``O(Q·K' + Q·chunk + chunk·D)`` for ``K'`` candidates per query.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from influscope.errors import DataError
from influscope.index.store import GradientIndex, TopK


def _padded(candidates: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """Candidates as ``(Q, K')`` long, ``-1`` for padding."""
    if isinstance(candidates, torch.Tensor):
        return candidates.long().cpu()
    width = max((len(c) for c in candidates), default=0)
    out = torch.full((len(candidates), width), -1, dtype=torch.long)
    for i, c in enumerate(candidates):
        out[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
    return out


def rerank(
    index: GradientIndex,
    queries: torch.Tensor,
    candidates: torch.Tensor | Sequence[Sequence[int]],
    k: int = 10,
    chunk: int = 4096,
) -> TopK:
    """The ``k`` best of each query's candidates by the exact index score.

    Args:
        index: The gradient index the candidates are rows of.
        queries: ``(Q, D)`` preconditioned projected queries.
        candidates: ``(Q, K')`` row numbers (``-1`` = none, as :class:`TopK` from an ANN
            search), or one list of rows per query.
        k: Rows kept per query.
        chunk: Candidate rows read at a time.

    Returns:
        :class:`TopK` with exact scores, best first; ``-1`` / ``-inf`` where a query had fewer
        than ``k`` candidates.

    Raises:
        DataError: Candidate rows outside the index, or a query count that differs.
    """
    q = queries.float().cpu()  # (Q, D)
    cand = _padded(candidates)  # (Q, K')
    if cand.shape[0] != q.shape[0]:
        raise DataError(
            f"Got {q.shape[0]} queries but candidates for {cand.shape[0]}; pass one candidate "
            "list per query."
        )
    valid = cand >= 0
    if bool((cand[valid] >= index.n_rows).any()):
        raise DataError(
            f"Candidate rows up to {int(cand.max())} given, but the index {index.root} has "
            f"{index.n_rows} rows. Candidates must come from this index's training set."
        )
    union = cand[valid].unique()  # sorted
    col = torch.searchsorted(union, cand.clamp(min=0))  # (Q, K') position in the union
    exact = torch.full(cand.shape, float("-inf"))  # (Q, K')
    for lo in range(0, len(union), chunk):
        rows = index.rows(union[lo : lo + chunk])  # (n, D)
        s = -(q @ rows.t())  # (Q, n)
        hit = valid & (col >= lo) & (col < lo + rows.shape[0])  # (Q, K')
        qi, kj = hit.nonzero(as_tuple=True)
        exact[qi, kj] = s[qi, col[qi, kj] - lo]
    keep = min(k, cand.shape[1])
    scores, order = exact.topk(keep, dim=1)  # (Q, keep)
    rows_out = cand.gather(1, order).masked_fill(scores == float("-inf"), -1)
    return TopK(rows_out, scores)
