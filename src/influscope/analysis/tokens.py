"""Token-wise view: is a sequence's influence spread over its tokens or sitting on a few?

The influence of a training sequence splits exactly over its tokens,
``I_q(z) = Σ_t I_{q,t}(z)`` with ``I_{q,t}(z) = −Σ_ℓ s_t^⊤ q̃_ℓ ā_t`` (see
:mod:`influscope.scoring.pairwise`). Grosse et al. (2023, §5.7) summarise the vector
``v = (I_{q,1}, …, I_{q,T})`` by its concentration

.. math:: c(v) = \\frac{\\lVert v \\rVert_2}{\\lVert v \\rVert_1} \\in [T^{-1/2}, 1],

which is 1 when all influence sits on one token and ``1/√T`` when it is spread evenly; ``c > 2/3``
flags influence concentrated on a few tokens (e.g. a rare name), which often says the match is
lexical rather than semantic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from influscope.analysis.base import clean, finite_mean, fmt
from influscope.errors import DataError
from influscope.report.html import html_paragraph, html_table
from influscope.report.views import QueryView, Section

__all__ = ["CONCENTRATION_THRESHOLD", "TokenResult", "token_concentration", "token_study"]

#: Grosse et al.'s threshold on ``‖v‖₂ / ‖v‖₁`` above which influence counts as concentrated.
CONCENTRATION_THRESHOLD = 2.0 / 3.0


def token_concentration(token_scores: Sequence[float] | torch.Tensor | np.ndarray) -> float:
    """``‖v‖₂ / ‖v‖₁`` of a per-token influence vector (NaN for an all-zero vector).

    Raises:
        DataError: If the vector is empty or holds NaN/Inf.

    Example:
        >>> token_concentration([0.0, 3.0, 0.0])
        1.0
        >>> round(token_concentration([1.0, 1.0, 1.0, 1.0]), 3)
        0.5
    """
    if isinstance(token_scores, torch.Tensor):
        token_scores = token_scores.detach().to("cpu", torch.float64).numpy()
    v = np.asarray(token_scores, dtype=np.float64).ravel()
    if v.size == 0 or not np.isfinite(v).all():
        raise DataError(
            f"Expected a non-empty, finite per-token influence vector, received {v.size} values"
            f"{' with NaN/Inf' if v.size else ''}."
        )
    l1 = float(np.abs(v).sum())
    return float(np.linalg.norm(v) / l1) if l1 > 0 else float("nan")


@dataclass(frozen=True)
class TokenEntry:
    """The token view of one (query, training sequence) pair.

    Attributes:
        query: Query label.
        index: Training index of the sequence.
        kind: ``"proponent"`` or ``"opponent"``.
        score: The sequence's influence.
        concentration: ``‖v‖₂ / ‖v‖₁``.
        top_tokens: The three tokens with the largest ``|I_t|``, strongest first.
    """

    query: str
    index: int
    kind: str
    score: float
    concentration: float
    top_tokens: list[str]

    @property
    def concentrated(self) -> bool:
        return self.concentration > CONCENTRATION_THRESHOLD


@dataclass(frozen=True)
class TokenResult:
    """Concentration of per-token influence over the sequences shown in a report.

    Attributes:
        entries: One entry per (query, shown sequence) with per-token scores.
    """

    entries: list[TokenEntry]

    def summary(self) -> dict[str, Any]:
        props = [e for e in self.entries if e.kind == "proponent"]
        return clean(
            {
                "n_sequences": len(self.entries),
                "threshold": CONCENTRATION_THRESHOLD,
                "mean_concentration": finite_mean([e.concentration for e in self.entries]),
                "fraction_concentrated": float(np.mean([e.concentrated for e in self.entries]))
                if self.entries
                else float("nan"),
                "fraction_concentrated_proponents": float(np.mean([e.concentrated for e in props]))
                if props
                else float("nan"),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": "tokens",
            "summary": self.summary(),
            "entries": clean(
                [
                    {
                        "query": e.query,
                        "index": e.index,
                        "kind": e.kind,
                        "score": e.score,
                        "concentration": e.concentration,
                        "concentrated": e.concentrated,
                        "top_tokens": e.top_tokens,
                    }
                    for e in self.entries
                ]
            ),
        }

    def to_section(self, max_rows: int = 60) -> Section:
        s = self.summary()
        text = html_paragraph(
            f"ℓ2/ℓ1 of the per-token influence of the {s['n_sequences']} shown sequences: mean "
            f"{fmt(s['mean_concentration'])}; {fmt(s['fraction_concentrated'])} of them (and "
            f"{fmt(s['fraction_concentrated_proponents'])} of the proponents) exceed 2/3, i.e. "
            "their influence sits on a few tokens."
        )
        ranked = sorted(self.entries, key=lambda e: -(e.concentration or 0.0))[:max_rows]
        rows = [
            [
                e.query,
                e.kind,
                f"#{e.index}",
                fmt(e.score),
                fmt(e.concentration),
                "yes" if e.concentrated else "no",
                " | ".join(repr(t) for t in e.top_tokens),
            ]
            for e in ranked
        ]
        table = html_table(
            ["query", "kind", "train #", "influence", "ℓ2/ℓ1", "> 2/3", "strongest tokens"],
            rows,
            caption="Most concentrated first.",
        )
        return Section("Token-wise concentration", text + table)


def token_study(queries: Sequence[QueryView]) -> TokenResult:
    """Concentration of every shown proponent's and opponent's per-token influence.

    Args:
        queries: Report query views (sequences without token scores are skipped).

    Returns:
        One :class:`TokenEntry` per sequence with token scores.
    """
    entries = []
    for qv in queries:
        for kind, seqs in (("proponent", qv.proponents), ("opponent", qv.opponents)):
            for seq in seqs:
                if not seq.token_scores:
                    continue
                v = np.asarray(seq.token_scores, dtype=np.float64)
                order = np.argsort(-np.abs(v), kind="stable")[:3]
                conc = token_concentration(v) if np.isfinite(v).all() else math.nan
                entries.append(
                    TokenEntry(
                        query=qv.name,
                        index=seq.index,
                        kind=kind,
                        score=seq.score,
                        concentration=conc,
                        top_tokens=[seq.tokens[i] for i in order],
                    )
                )
    return TokenResult(entries)
