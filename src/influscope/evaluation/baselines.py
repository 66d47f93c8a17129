"""Baseline attribution methods, returned as :class:`~influscope.scoring.pairwise.Scores`.

Every baseline shares influscope's layout (``pairwise`` is ``(Q, N)``) and its sign convention
where one exists (positive = training on the sequence increases the query's measurement ``f``),
so the evaluation protocols treat them exactly like influence scores.

* :func:`gradient_dot` — ``-∇f_q^⊤ ∇L(z_i)`` (identity curvature; TracIn at one checkpoint).
* :func:`gradient_cosine` — the same divided by ``‖∇f_q‖ ‖∇L(z_i)‖``.
* :func:`tracin` — ``Σ_k η_k (-∇f_q(θ_k)^⊤ ∇L(z_i, θ_k))`` over checkpoints θ_k with learning
  rates η_k (Pruthi et al. 2020): a gradient step on ``z_i`` changes ``f_q`` by that amount.
* :func:`representation_similarity` — cosine of pooled hidden states (no sign semantics).
* :func:`bm25` — Okapi BM25 of the training texts against the query texts (``bm25s``; Lucene
  IDF ``log((C - n_t + 0.5)/(n_t + 0.5) + 1)``, ``k1 = 1.5``, ``b = 0.75``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from influscope.analyzer import Influence
from influscope.config import ScoreConfig
from influscope.curvature import IdentityOperator
from influscope.errors import DataError
from influscope.modules.passes import eval_mode
from influscope.scoring.pairwise import Scores
from influscope.tasks.data import EncodedDataset


def _wrap(pairwise: torch.Tensor, train: EncodedDataset, names: list[str] | None = None) -> Scores:
    return Scores(pairwise=pairwise, layer_names=names or [], train_indices=list(train.indices))


def _identity(inf: Influence) -> IdentityOperator:
    return IdentityOperator({name: 0.0 for name in inf.layer_names})


def gradient_dot(
    inf: Influence, queries: EncodedDataset, train: EncodedDataset, batch_size: int = 8
) -> Scores:
    """Gradient dot product ``-∇f_q^⊤ ∇L(z_i)`` over the tracked layers: ``(Q, N)``."""
    return inf.score(
        queries, train, _identity(inf), ScoreConfig(query_rank=None, batch_size=batch_size)
    )


def _query_norms(inf: Influence, queries: EncodedDataset, batch_size: int) -> torch.Tensor:
    pq = inf.precondition(
        queries, _identity(inf), ScoreConfig(query_rank=None, batch_size=batch_size)
    )
    sq = sum(pq.matrix(n).double().square().sum(dim=(-2, -1)) for n in pq.layer_names)
    return sq.sqrt()  # (Q,)


def gradient_cosine(
    inf: Influence, queries: EncodedDataset, train: EncodedDataset, batch_size: int = 8
) -> Scores:
    """``-∇f_q^⊤ ∇L(z_i) / (‖∇f_q‖ ‖∇L(z_i)‖)`` over the tracked layers: ``(Q, N)``."""
    dot = gradient_dot(inf, queries, train, batch_size)
    train_norm = inf.self_influence(train, _identity(inf), batch_size).double().sqrt()  # (N,)
    query_norm = _query_norms(inf, queries, batch_size)  # (Q,)
    denom = (query_norm[:, None] * train_norm[None, :]).clamp_min(1e-30)
    dot.pairwise = dot.pairwise.double() / denom.to(dot.pairwise.device)
    return dot


def tracin(
    checkpoints: Sequence[tuple[nn.Module, float]],
    make_influence: Callable[[nn.Module], Influence],
    queries: EncodedDataset,
    train: EncodedDataset,
    batch_size: int = 8,
) -> Scores:
    """TracIn-CP: learning-rate-weighted gradient dot products summed over checkpoints.

    Args:
        checkpoints: ``(model at checkpoint k, learning rate η_k)`` pairs.
        make_influence: Builds the :class:`~influscope.Influence` for a model (same task and
            tracked modules for every checkpoint).
        queries: The queries.
        train: The training sequences.
    """
    if not checkpoints:
        raise DataError("tracin needs at least one (model, learning rate) checkpoint, received 0.")
    total = None
    for model, lr in checkpoints:
        dot = gradient_dot(make_influence(model), queries, train, batch_size).pairwise
        total = lr * dot.double() if total is None else total + lr * dot.double()
    return _wrap(total, train)


@torch.no_grad()
def hidden_states(
    model: nn.Module, data: EncodedDataset, task, batch_size: int = 16, layer: int = -1
) -> torch.Tensor:
    """Mean-pooled hidden states of a Hugging Face model (``output_hidden_states``): ``(N, D)``.

    Positions are averaged under the attention mask (all positions without one).
    """
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for _, examples in data.batches(batch_size):
            batch = {k: v.to(device) for k, v in task.collate(examples).items()}
            mask = batch.get("attention_mask")
            res = model(
                input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True
            )
            h = res.hidden_states[layer].double()  # (B, T, D)
            w = (
                mask.double()[..., None]
                if mask is not None
                else torch.ones_like(h[..., :1])  # (B, T, 1)
            )
            out.append((h * w).sum(1) / w.sum(1).clamp_min(1))  # (B, D)
    return torch.cat(out)


def representation_similarity(
    query_embeddings: torch.Tensor, train_embeddings: torch.Tensor, train: EncodedDataset
) -> Scores:
    """Cosine similarity of query and training representations: ``(Q, N)``.

    Args:
        query_embeddings: ``(Q, D)``, e.g. from :func:`hidden_states`.
        train_embeddings: ``(N, D)``.
        train: The training set (for the indices).
    """
    if query_embeddings.shape[-1] != train_embeddings.shape[-1]:
        raise DataError(
            f"Embedding widths differ: queries {tuple(query_embeddings.shape)}, training "
            f"{tuple(train_embeddings.shape)}."
        )
    q = torch.nn.functional.normalize(query_embeddings.double(), dim=-1)
    t = torch.nn.functional.normalize(train_embeddings.double(), dim=-1)
    return _wrap(q @ t.T, train)


def bm25(
    query_texts: Sequence[str],
    train_texts: Sequence[str],
    train: EncodedDataset | None = None,
    k1: float = 1.5,
    b: float = 0.75,
) -> Scores | torch.Tensor:
    """BM25 relevance of every training text to every query text: ``(Q, N)``.

    Returns :class:`Scores` when ``train`` is given (for its indices), else the tensor.
    """
    import bm25s

    if not train_texts or not query_texts:
        raise DataError("bm25 needs at least one query text and one training text.")
    corpus = bm25s.tokenize(list(train_texts), stopwords=None, show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(corpus, show_progress=False)
    vocab = corpus.vocab
    tokenized = bm25s.tokenize(
        list(query_texts), stopwords=None, show_progress=False, return_ids=False
    )
    rows = []
    for tokens in tokenized:
        known = [t for t in tokens if t in vocab]
        rows.append(
            torch.from_numpy(retriever.get_scores(known)).double()
            if known
            else torch.zeros(len(train_texts), dtype=torch.float64)
        )
    pairwise = torch.stack(rows)  # (Q, N)
    return _wrap(pairwise, train) if train is not None else pairwise
