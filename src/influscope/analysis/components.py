"""Heads and experts: which attention heads, and which MoE experts, carry a query's influence.

Both split a query's influence exactly into components ``c`` (docs/heads_experts.md):

* **heads** — ``Scores.per_head`` (``ScoreConfig(per_head=True)``): the terms of each head's
  block of rows (q/k/v) or columns (output projection) of each tracked attention projection;
* **experts** — the per-layer terms of an MoE block's experts
  (:mod:`influscope.modules.experts`), expert ``e`` of block ``b`` being the sum of its
  ``gate_up_proj.e`` and ``down_proj.e`` terms (the router, ``<b>.gate``, is its own component).

For each query ``q`` the study reports, over the ``N`` scored training sequences,

- the **absolute share** of component ``c``: ``Σ_m |I_{q,c}(z_m)| / Σ_{c'} Σ_m |I_{q,c'}(z_m)|``
  (non-negative, sums to 1 over the components of the study);
- the **top-k share**: ``Σ_{m ∈ top_k(q)} I_{q,c}(z_m) / Σ_{m ∈ top_k(q)} Σ_{c'} I_{q,c'}(z_m)``
  (signed, sums to 1): how the scores of the strongest proponents are made up,

and lists the components with the largest absolute shares ("which experts carry it").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from influscope.analysis.base import clean, fmt
from influscope.errors import ConfigError, DataError
from influscope.report.html import html_figure, html_paragraph, html_table
from influscope.report.svg import svg_heatmap
from influscope.report.views import Section
from influscope.scoring.pairwise import Scores

__all__ = ["ComponentResult", "expert_groups", "expert_study", "head_study"]

_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?:gate_up_proj|down_proj)\.(?P<e>\d+)$")


def expert_groups(layer_names: Sequence[str]) -> dict[str, list[int]]:
    """``{"<block>.experts.<e>": [positions of its gate_up_proj.e and down_proj.e]}`` plus
    ``{"<block>.gate": [position]}`` for tracked routers of blocks with tracked experts."""
    groups: dict[str, list[int]] = {}
    blocks = set()
    for i, name in enumerate(layer_names):
        m = _EXPERT.match(name)
        if m:
            groups.setdefault(f"{m['block']}.experts.{m['e']}", []).append(i)
            blocks.add(m["block"])
    for i, name in enumerate(layer_names):
        if name.endswith(".gate") and name[: -len(".gate")] in blocks:
            groups[name] = [i]
    return groups


@dataclass(frozen=True)
class ComponentResult:
    """Shares of each component (head or expert) in each query's influence.

    Attributes:
        study: ``"heads"`` or ``"experts"``.
        query_names: One label per query.
        components: Component labels.
        abs_share: ``(Q, C)`` absolute shares (rows sum to 1).
        top_share: ``(Q, C)`` signed shares in the top-``k`` proponents' scores (rows sum to 1).
        top_k: The ``k`` used.
        n_show: Components listed per query.
    """

    study: str
    query_names: list[str]
    components: list[str]
    abs_share: list[list[float]]
    top_share: list[list[float]]
    top_k: int
    n_show: int = 3

    def leaders(self, q: int) -> list[tuple[str, float, float]]:
        """The ``n_show`` components with the largest absolute share for query ``q``:
        ``[(label, absolute share, top-k share)]``."""
        order = np.argsort(-np.asarray(self.abs_share[q]), kind="stable")[: self.n_show]
        return [(self.components[c], self.abs_share[q][c], self.top_share[q][c]) for c in order]

    def to_dict(self) -> dict[str, Any]:
        return clean(
            {
                "study": self.study,
                "mean_abs_share": dict(
                    zip(self.components, np.mean(np.asarray(self.abs_share), 0).tolist())
                ),
                "queries": [
                    {
                        "query": name,
                        "leaders": [
                            {"component": c, "abs_share": a, "top_k_share": t}
                            for c, a, t in self.leaders(q)
                        ],
                        "abs_share": dict(zip(self.components, self.abs_share[q])),
                        "top_k_share": dict(zip(self.components, self.top_share[q])),
                    }
                    for q, name in enumerate(self.query_names)
                ],
            }
        )

    def to_section(self) -> Section:
        what = "attention head" if self.study == "heads" else "expert (and router)"
        rows = [
            [name, *[f"{c} ({fmt(a)} | {fmt(t)})" for c, a, t in self.leaders(q)]]
            for q, name in enumerate(self.query_names)
        ]
        n = min(self.n_show, len(self.components))
        parts = [
            html_paragraph(
                f"Which {what}s carry each query's influence: the {n} with the largest share "
                f"of the influence mass Σ|I| (in brackets: absolute share | signed share in the "
                f"top-{self.top_k} proponents' scores). The components split the scores "
                "exactly (docs/heads_experts.md)."
            ),
            html_table(["query", *[f"#{i + 1}" for i in range(n)]], rows),
            html_figure(
                svg_heatmap(
                    self.components,
                    self.query_names,
                    np.asarray(self.abs_share).T.tolist(),
                    title="",
                ),
                f"Absolute share of each {what} (rows) per query (columns).",
            ),
        ]
        title = "Heads: which attention heads" if self.study == "heads" else "Experts: which"
        return Section(f"{title} carry the influence", "".join(parts))


def _shares(per: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Absolute and top-``k`` shares from ``(Q, N, C)`` component terms."""
    n = per.shape[1]
    k = min(top_k, n)
    mass = np.abs(per).sum(1)  # (Q, C)
    abs_share = mass / np.clip(mass.sum(-1, keepdims=True), 1e-300, None)
    top = np.argsort(-per.sum(-1), axis=1, kind="stable")[:, :k]  # (Q, k)
    top_terms = np.take_along_axis(per, top[..., None], axis=1).sum(1)  # (Q, C)
    denom = top_terms.sum(-1, keepdims=True)
    return abs_share, top_terms / np.where(np.abs(denom) > 0, denom, 1.0), k


def _names(query_names: Sequence[str] | None, n_q: int) -> list[str]:
    names = list(query_names) if query_names is not None else [f"query {q}" for q in range(n_q)]
    if len(names) != n_q:
        raise DataError(f"Expected {n_q} query names, received {len(names)}.")
    return names


def head_study(
    scores: Scores, query_names: Sequence[str] | None = None, top_k: int = 10
) -> ComponentResult:
    """Shares of each attention head from ``Scores.per_head``.

    Raises:
        DataError: If the scores have no per-head terms.
        ConfigError: If ``top_k < 1``.
    """
    if top_k < 1:
        raise ConfigError(f"top_k must be ≥ 1, received {top_k}.")
    if scores.per_head is None or not scores.head_names:
        raise DataError(
            "These scores have no per-head terms. Score with ScoreConfig(per_head=True) "
            "(CLI: influscope score --per-head) while tracking attention projections "
            "(modules='attn')."
        )
    per = scores.per_head.detach().to("cpu", torch.float64).numpy()  # (Q, N, H)
    abs_share, top_share, k = _shares(per, top_k)
    return ComponentResult(
        "heads",
        _names(query_names, per.shape[0]),
        list(scores.head_names),
        abs_share.tolist(),
        top_share.tolist(),
        k,
    )


def expert_study(
    scores: Scores, query_names: Sequence[str] | None = None, top_k: int = 10
) -> ComponentResult:
    """Shares of each MoE expert (and router) from the per-layer terms.

    Raises:
        DataError: If the scores have no per-layer terms or no tracked experts.
        ConfigError: If ``top_k < 1``.
    """
    if top_k < 1:
        raise ConfigError(f"top_k must be ≥ 1, received {top_k}.")
    groups = expert_groups(scores.layer_names)
    if scores.per_layer is None or not groups:
        raise DataError(
            "The expert study needs per-layer terms of tracked MoE experts "
            "(ScoreConfig(per_layer=True), modules='mlp' on an MoE model); these scores have "
            f"{'no per-layer terms' if scores.per_layer is None else 'no expert layers'}."
        )
    per_layer = scores.per_layer.detach().to("cpu", torch.float64).numpy()  # (Q, N, L)
    per = np.stack([per_layer[..., idx].sum(-1) for idx in groups.values()], -1)  # (Q, N, C)
    abs_share, top_share, k = _shares(per, top_k)
    return ComponentResult(
        "experts",
        _names(query_names, per.shape[0]),
        list(groups),
        abs_share.tolist(),
        top_share.tolist(),
        k,
    )
