"""Turn scores into report views: top proponents/opponents with token-level influence.

Token-level influence of training sequence ``z`` on query ``q`` at position ``t`` is
``-Σ_ℓ s_{t}^⊤ q̃_ℓ ā_{t}`` — the part of the score carried by the layer inputs at that
position (see :mod:`influscope.scoring.pairwise`); the terms of a sequence sum to its score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from influscope.analyzer import Influence
from influscope.curvature import CurvatureOperator
from influscope.report.summary import record_meta
from influscope.report.views import QueryView, ReportView, Section, SequenceView
from influscope.scoring.ensemble import EnsembleScores
from influscope.scoring.pairwise import Scores
from influscope.scoring.queries import PreconditionedQueries
from influscope.tasks import EncodedDataset
from influscope.tasks.chat import contents, display_texts, is_conversational


def decode_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """One string per token id: what the token adds to the decoded text.

    Byte-level BPE splits a multi-byte character (accented letters, CJK, emoji) over several
    tokens, and decoding such a token alone gives U+FFFD replacement characters. A token that
    ends inside a character therefore gets ``""`` and the token that completes the character
    carries it, so that the strings concatenate to the decoded sequence.
    """
    if tokenizer is None:
        return [f"[{int(i)}]" for i in ids]
    ids = [int(i) for i in ids]
    out: list[str] = []
    start = 0  # first token whose text has not been emitted yet
    for i in range(len(ids)):
        piece = tokenizer.decode(ids[start : i + 1])
        if piece.endswith("\ufffd") and i + 1 < len(ids) and i + 1 - start < 4:
            out.append("")  # inside a UTF-8 character (at most 4 bytes): wait for the rest
            continue
        out.append(piece)
        start = i + 1
    return out


def _record_text(record: dict) -> tuple[str, str]:
    if is_conversational(record):
        return display_texts(record)
    if "prompt" in record and "completion" in record:
        return str(record["prompt"]), str(record["completion"])
    return str(record.get("text", "")), ""


def build_report(
    inf: Influence,
    queries: EncodedDataset,
    pq: PreconditionedQueries,
    train: EncodedDataset,
    factors: CurvatureOperator,
    scores: Scores,
    *,
    title: str,
    overview: dict[str, str],
    top_k: int = 5,
    notes: Sequence[dict[str, str]] | None = None,
    sections: Sequence[Section] = (),
    ensemble: EnsembleScores | None = None,
) -> ReportView:
    """Assemble a :class:`ReportView` for every query.

    With ``ensemble`` (whose ``mean`` should be ``scores.pairwise``), every shown sequence
    also carries its standard error and, for proponents, in how many members' own top
    ``top_k`` it appears.

    Token scores are computed only for the sequences shown (each query's top ``top_k``
    proponents and opponents), in one extra pass over those sequences.
    """
    n_q = scores.pairwise.shape[0]
    tops = [scores.top(q, top_k) for q in range(n_q)]
    bottoms = [scores.top(q, top_k, opponents=True) for q in range(n_q)]
    shown = sorted({i for lst in tops + bottoms for i, _ in lst})
    tokens = inf.token_scores(pq, train.subset(shown), factors)  # one (Q, T) per shown sequence
    token_of = dict(zip(shown, tokens))

    def view(q: int, pos: int, score: float) -> SequenceView:
        ids = train.examples[pos]["input_ids"].tolist()
        ts = token_of[pos][q].tolist()
        rec = train.records[pos]
        meta = record_meta(rec)
        return SequenceView(
            index=train.indices[pos],
            score=score,
            tokens=decode_tokens(inf.tokenizer, ids)[: len(ts)],
            token_scores=ts,
            meta=meta,
            text="".join(_record_text(rec)),
        )

    views = []
    for q in range(n_q):
        prompt, completion = _record_text(queries.records[q])
        layer_scores = {}
        if scores.per_layer is not None and tops[q]:
            idx = torch.tensor([i for i, _ in tops[q]])
            per = scores.per_layer[q, idx].sum(0)  # (L,)
            layer_scores = {n: float(v) for n, v in zip(scores.layer_names, per)}
        proponents = [view(q, i, s) for i, s in tops[q]]
        opponents = [view(q, i, s) for i, s in bottoms[q]]
        if ensemble is not None:
            in_top = ensemble.in_member_top(top_k)[:, q].sum(0)  # (N,) members keeping it
            m = ensemble.n_members
            proponents = [
                replace(seq, sem=float(ensemble.sem[q, i]), stable=int(in_top[i]), n_members=m)
                for (i, _), seq in zip(tops[q], proponents)
            ]
            opponents = [
                replace(seq, sem=float(ensemble.sem[q, i]), n_members=m)
                for (i, _), seq in zip(bottoms[q], opponents)
            ]
        views.append(
            QueryView(
                name=f"query {q}",
                prompt=prompt,
                completion=completion,
                contrast=contents(queries.records[q].get("contrast", "")),
                proponents=proponents,
                opponents=opponents,
                layer_scores=layer_scores,
                notes=dict(notes[q]) if notes else {},
            )
        )
    heatmap = None
    if scores.per_layer is not None:
        cols, values = [], []
        for q in range(n_q):
            if tops[q]:
                i, _ = tops[q][0]
                per = scores.per_layer[q, i]
                cols.append(f"query {q} → #{train.indices[i]}")
                values.append((per / per.abs().sum().clamp_min(1e-30)).tolist())
        if cols:
            rows = list(scores.layer_names)
            heatmap = (
                rows,
                cols,
                [[values[c][r] for c in range(len(cols))] for r in range(len(rows))],
            )
    return ReportView(
        title=title,
        overview=overview,
        queries=views,
        sections=list(sections),
        layer_heatmap=heatmap,
    )
