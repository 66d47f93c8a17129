"""Two-stage (three-stage) retrieval of influential training sequences.

    training texts ─▶ [BM25 top K] ─┐
                                     ├▶ [projected index: top k₁] ─▶ [EK-FAC exact re-score: top k]
    ANN index (FAISS) ─▶ [top K'] ──┘

Each stage is optional: without a candidate source (BM25 or an ANN index) the index scans the
whole training set; with one, the index re-ranks only the candidates by their exact index scores
(:func:`influscope.index.rerank.rerank`, reading only those rows); without an index the BM25
candidates go straight to EK-FAC; without factors the index ranking is final. The EK-FAC stage
scores the *union* of the queries' candidates in one pass over the training data, then keeps
each query's own candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from influscope.config import ScoreConfig
from influscope.curvature.base import CurvatureOperator
from influscope.errors import ConfigError, StaleArtifactError
from influscope.index.ann import AnnIndex
from influscope.index.build import preconditioned_queries
from influscope.index.rerank import rerank
from influscope.index.store import GradientIndex
from influscope.tasks.data import EncodedDataset


@dataclass
class Retrieval:
    """Ranked training positions per query.

    Attributes:
        indices: Per query, positions in the training set, best first.
        scores: Per query, the score of the last stage that ranked them (EK-FAC influence,
            projected influence, or BM25).
        stage: Which stage produced the final ranking (``"bm25"``, ``"index"``, ``"ekfac"``).
        candidates: Per stage, how many positions per query it passed on.
    """

    indices: list[list[int]]
    scores: list[list[float]]
    stage: str
    candidates: dict[str, int] = field(default_factory=dict)


def retrieve(
    inf,
    queries: EncodedDataset,
    train: EncodedDataset,
    *,
    query_texts: Sequence[str] | None = None,
    train_texts: Sequence[str] | None = None,
    bm25_k: int | None = 10_000,
    index: GradientIndex | None = None,
    index_k: int = 100,
    factors: CurvatureOperator | None = None,
    top_k: int = 10,
    batch_size: int = 8,
    ann: AnnIndex | None = None,
    ann_k: int = 1000,
) -> Retrieval:
    """Rank training sequences for each query through the enabled stages.

    Args:
        inf: An :class:`~influscope.Influence` for the model and task.
        queries: Encoded queries.
        train: Encoded training set (positions refer to it; the index must be built from it).
        query_texts: Query texts for BM25 (``None`` disables BM25).
        train_texts: Training texts for BM25.
        bm25_k: Candidates kept by BM25 (``None`` disables BM25).
        index: A projected gradient index of ``train`` (``None``: skip).
        index_k: Candidates kept by the index stage.
        factors: EK-FAC (or other) factors for exact re-scoring (``None``: skip).
        top_k: Final number per query.
        batch_size: Sequences per pass.
        ann: An ANN index over ``index`` (:func:`influscope.index.open_ann`) whose top
            ``ann_k`` rows per query are the candidates the index re-ranks exactly (``index``
            defaults to ``ann.index``).
        ann_k: Candidates the ANN index passes on (e.g. ``10 × index_k``).

    Raises:
        ConfigError: If every stage is disabled, BM25 lacks texts, both BM25 and an ANN index
            are given, or the ANN index belongs to another index.
    """
    use_bm25 = bm25_k is not None and query_texts is not None
    if ann is not None:
        if use_bm25:
            raise ConfigError(
                "BM25 and an ANN index are both candidate sources; give one (BM25 candidates are "
                "already re-ranked exactly, reading only their rows)."
            )
        index = index or ann.index
        if ann.index.root.resolve() != index.root.resolve():
            raise ConfigError(
                f"The ANN index {ann.name!r} belongs to {ann.index.root}, not to the index "
                f"given, {index.root}. Open the ANN index of the index you query (open_ann)."
            )
    if bm25_k is not None and query_texts is not None and train_texts is None:
        raise ConfigError("BM25 needs train_texts (one per training sequence).")
    if not (use_bm25 or index is not None or factors is not None):
        raise ConfigError("Enable at least one stage: BM25 texts, an index, or factors.")
    if index is not None and index.meta.get("data") != train.fingerprint():
        # Index rows are positions in the data it was built from: other data misnames them.
        raise StaleArtifactError(
            f"The index in {index.root} was built from other training data ({index.n_rows} "
            f"sequences, fingerprint {index.meta.get('data')!r}) than the {len(train)} given "
            f"now (fingerprint {train.fingerprint()!r}). Pass the training records it was "
            "built from (CLI: --train), or rebuild it with `influscope index --overwrite`."
        )
    n_q = len(queries)
    ranked: list[list[int]] | None = None
    scores: list[list[float]] = [[] for _ in range(n_q)]
    stage, counts = "bm25", {}
    if use_bm25:
        from influscope.filtering import BM25Filter

        bm25 = BM25Filter(train_texts)
        ranked = bm25.candidates(query_texts, bm25_k)
        scores = [bm25.scores(q)[r].tolist() for q, r in zip(query_texts, ranked)]
        counts["bm25"] = bm25_k
    if index is not None:
        q = preconditioned_queries(inf.tracked, queries, index, batch_size)
        k = index_k if factors is not None else top_k
        if ann is not None:
            ranked = ann.search(q, k=ann_k).indices.tolist()  # approximate: candidates only
            counts["ann"] = ann_k
        if ranked is not None:
            hits = rerank(index, q, ranked, k=k)  # exact scores of the candidates
        else:
            hits = index.search(q, k=k)
        ranked, scores = [], []
        for row_i, row_s in zip(hits.indices.tolist(), hits.scores.tolist()):
            keep = [(i, s) for i, s in zip(row_i, row_s) if s != float("-inf") and i >= 0]
            ranked.append([i for i, _ in keep])
            scores.append([s for _, s in keep])
        stage, counts["index"] = "index", k
    if factors is not None:
        union = sorted({i for r in ranked for i in r}) if ranked is not None else None
        subset = train.subset(union) if union is not None else train
        exact = inf.score(
            queries, subset, factors, ScoreConfig(query_rank=None, batch_size=batch_size)
        ).pairwise.cpu()  # (Q, |union|)
        where = {m: j for j, m in enumerate(union)} if union is not None else None
        ranked_out, scores = [], []
        for qi in range(n_q):
            cand = ranked[qi] if ranked is not None else list(range(len(train)))
            cols = torch.tensor([where[m] for m in cand] if where else cand, dtype=torch.long)
            vals = exact[qi, cols]
            order = vals.argsort(descending=True)[:top_k]
            ranked_out.append([cand[j] for j in order.tolist()])
            scores.append(vals[order].tolist())
        ranked, stage, counts["ekfac"] = ranked_out, "ekfac", top_k
    ranked = [r[:top_k] for r in ranked]
    return Retrieval(ranked, [s[:top_k] for s in scores], stage, counts)
