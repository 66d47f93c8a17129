"""Layers: where in the network a query's influence flows.

With per-layer terms (``ScoreConfig(per_layer=True)``) the influence of ``z_m`` on query ``q``
splits exactly over the tracked layers, ``I_q(z_m) = Σ_ℓ I_{q,ℓ}(z_m)`` with
``I_{q,ℓ}(z_m) = −∇_{W_ℓ} f_q^⊤ (G_ℓ + λ_ℓ I)^{-1} ∇_{W_ℓ} L(z_m)`` (block-diagonal curvature).
This study reports, per query:

- the **absolute share** of layer ℓ, ``Σ_m |I_{q,ℓ}(z_m)| / Σ_{ℓ'} Σ_m |I_{q,ℓ'}(z_m)|`` (how much
  of all the influence mass passes through ℓ; non-negative, sums to 1);
- the **top-k share**, ``Σ_{m ∈ top_k(q)} I_{q,ℓ}(z_m) / Σ_{m ∈ top_k(q)} I_q(z_m)`` (how the
  score of the strongest proponents is made up; signed, sums to 1);
- **scoring restricted to a layer range**: ``I_q^{R}(z_m) = Σ_{ℓ ∈ R} I_{q,ℓ}(z_m)`` for the lower,
  middle and upper thirds of the network (by transformer block), with the Spearman correlation
  of the restricted scores against the full ones and the overlap of their top-``k`` sets.

Grosse et al. (2023, §5.4) found that influence on factual queries sits mostly in the middle
layers while more abstract queries draw on the upper ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from influscope.analysis.base import clean, fmt, spearman
from influscope.errors import ConfigError, DataError
from influscope.report.html import html_figure, html_paragraph, html_table
from influscope.report.svg import svg_bar_chart, svg_heatmap
from influscope.report.views import Section
from influscope.scoring.pairwise import Scores

__all__ = [
    "THIRDS",
    "LayerResult",
    "layer_heatmap",
    "layer_study",
    "layer_thirds",
    "restrict_scores",
]

THIRDS = ("lower", "middle", "upper")
_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _block(name: str) -> int | None:
    match = _NUMBER.search(name)
    return int(match.group(1)) if match else None


def layer_thirds(layer_names: Sequence[str]) -> dict[str, list[str]]:
    """Split tracked layers into the lower, middle and upper thirds of the network.

    A layer's depth is its transformer block (the first number in its dotted name, e.g. ``h.3``),
    or its position in ``layer_names`` when a name has none. Block ``b`` of ``B`` goes to third
    ``⌊3 (b + ½) / B⌋``; with two blocks the middle third is empty.

    Example:
        >>> layer_thirds(["h.0.mlp.c_fc", "h.1.mlp.c_fc", "h.2.mlp.c_fc"])["middle"]
        ['h.1.mlp.c_fc']
    """
    blocks = [_block(n) for n in layer_names]
    if any(b is None for b in blocks):
        blocks = list(range(len(layer_names)))
    levels = sorted(set(blocks))
    rank = {b: i for i, b in enumerate(levels)}
    out: dict[str, list[str]] = {t: [] for t in THIRDS}
    for name, b in zip(layer_names, blocks):
        third = min(2, int(3 * (rank[b] + 0.5) / len(levels)))
        out[THIRDS[third]].append(name)
    return out


def _per_layer(scores: Scores) -> np.ndarray:
    if scores.per_layer is None:
        raise DataError(
            "These scores have no per-layer terms. Score with ScoreConfig(per_layer=True) "
            "(the CLI `influscope score` always stores them)."
        )
    return scores.per_layer.detach().to("cpu", torch.float64).numpy()  # (Q, N, L)


def restrict_scores(scores: Scores, layers: Sequence[str]) -> torch.Tensor:
    """Influence restricted to some layers: ``Σ_{ℓ ∈ layers} I_{q,ℓ}(z_m)``, shape ``(Q, N)``.

    Raises:
        DataError: No per-layer terms, or an unknown layer name.
    """
    unknown = [n for n in layers if n not in scores.layer_names]
    if unknown:
        raise DataError(f"Unknown layers {unknown}. Scored layers: {scores.layer_names}.")
    if scores.per_layer is None:
        _per_layer(scores)  # raises
    idx = [scores.layer_names.index(n) for n in layers]
    per = scores.per_layer  # (Q, N, L)
    if not idx:
        return torch.zeros(per.shape[:2], dtype=per.dtype)
    return per[..., idx].sum(-1)


def layer_heatmap(
    scores: Scores, query: int, k: int = 10
) -> tuple[list[str], list[str], list[list[float]]]:
    """Layers × top-``k`` proponents of one query: ``values[ℓ][j] = I_{q,ℓ}(z_{m_j})``.

    Returns:
        ``(row_labels, col_labels, values)`` for :func:`~influscope.report.svg.svg_heatmap`
        (columns are labelled ``#<training index>``).
    """
    per = _per_layer(scores)[query]  # (N, L)
    top = np.argsort(-per.sum(-1), kind="stable")[:k]
    cols = [f"#{scores.train_indices[m]}" for m in top]
    values = [[float(per[m, li]) for m in top] for li in range(per.shape[1])]
    return list(scores.layer_names), cols, values


@dataclass(frozen=True)
class LayerResult:
    """Per-layer shares and layer-range scoring of every query.

    Attributes:
        query_names: One label per query.
        layer_names: Tracked layers, in model order.
        abs_share: ``(Q, L)`` absolute share of each layer (rows sum to 1).
        top_share: ``(Q, L)`` signed share in the top-``k`` proponents' scores (rows sum to 1).
        thirds: Layers of each third (see :func:`layer_thirds`).
        third_share: ``{third: (Q,)}`` absolute share of each third.
        third_spearman: ``{third: (Q,)}`` Spearman of the restricted against the full scores.
        third_top_overlap: ``{third: (Q,)}`` fraction of the full top-``k`` kept by the
            restricted top-``k``.
        heatmaps: Layers × top sequences of the first queries (see :func:`layer_heatmap`).
        top_k: The ``k`` used.
    """

    query_names: list[str]
    layer_names: list[str]
    abs_share: list[list[float]]
    top_share: list[list[float]]
    thirds: dict[str, list[str]]
    third_share: dict[str, list[float]]
    third_spearman: dict[str, list[float]]
    third_top_overlap: dict[str, list[float]]
    heatmaps: list[tuple[list[str], list[str], list[list[float]]]]
    top_k: int

    def summary(self) -> dict[str, Any]:
        mean_abs = np.mean(np.asarray(self.abs_share), axis=0)
        return clean(
            {
                "mean_abs_share": dict(zip(self.layer_names, mean_abs.tolist())),
                "thirds": {
                    t: {
                        "layers": self.thirds[t],
                        "mean_share": float(np.mean(self.third_share[t])),
                        "mean_spearman_vs_full": float(np.nanmean(self.third_spearman[t]))
                        if self.thirds[t]
                        else float("nan"),
                        "mean_top_k_overlap": float(np.mean(self.third_top_overlap[t])),
                    }
                    for t in THIRDS
                },
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": "layers",
            "summary": self.summary(),
            "queries": clean(
                [
                    {
                        "query": n,
                        "abs_share": dict(zip(self.layer_names, a)),
                        "top_k_share": dict(zip(self.layer_names, t)),
                    }
                    for n, a, t in zip(self.query_names, self.abs_share, self.top_share)
                ]
            ),
        }

    def to_section(self) -> Section:
        s = self.summary()
        bars = svg_bar_chart(
            self.layer_names, list(s["mean_abs_share"].values()), width=560, title=""
        )
        parts = [
            html_paragraph(
                "Share of each query's influence mass Σ|I_ℓ| per tracked layer, averaged over "
                f"the {len(self.query_names)} queries."
            ),
            html_figure(bars, "Mean absolute share per layer."),
        ]
        rows = [
            [
                t,
                ", ".join(self.thirds[t]) or "(none)",
                fmt(s["thirds"][t]["mean_share"]),
                fmt(s["thirds"][t]["mean_spearman_vs_full"]),
                fmt(s["thirds"][t]["mean_top_k_overlap"]),
            ]
            for t in THIRDS
        ]
        parts.append(
            html_table(
                ["third", "layers", "share", "Spearman vs full", f"top-{self.top_k} overlap"],
                rows,
                caption="Scoring restricted to the lower, middle and upper thirds (by block).",
            )
        )
        grid = svg_heatmap(
            self.layer_names,
            self.query_names,
            [list(col) for col in np.asarray(self.top_share).T.tolist()],
            title="",
        )
        parts.append(
            html_figure(
                grid,
                f"Signed share of each layer in the top-{self.top_k} proponents' "
                "scores (rows: layers, columns: queries).",
            )
        )
        for name, (rows_, cols, values) in zip(self.query_names, self.heatmaps):
            parts.append(
                html_figure(
                    svg_heatmap(rows_, cols, values, title=""),
                    f"{name}: layer terms of its top-{len(cols)} proponents.",
                )
            )
        return Section("Layers: where influence flows", "".join(parts))


def layer_study(
    scores: Scores,
    query_names: Sequence[str] | None = None,
    top_k: int = 10,
    n_heatmaps: int = 3,
) -> LayerResult:
    """Per-layer shares, thirds and heatmaps from per-layer scores.

    Args:
        scores: Scores with ``per_layer`` ``(Q, N, L)``.
        query_names: One label per query.
        top_k: Proponents used for the top-``k`` share, the overlap and the heatmaps.
        n_heatmaps: Queries (the first ones) that get a layers × sequences heatmap.

    Raises:
        DataError: If the scores have no per-layer terms.
        ConfigError: If ``top_k < 1``.
    """
    if top_k < 1:
        raise ConfigError(f"top_k must be ≥ 1, received {top_k}.")
    per = _per_layer(scores)  # (Q, N, L)
    n_q, n, _ = per.shape
    k = min(top_k, n)
    full = per.sum(-1)  # (Q, N)
    mass = np.abs(per).sum(1)  # (Q, L)
    abs_share = mass / np.clip(mass.sum(-1, keepdims=True), 1e-300, None)
    top = np.argsort(-full, axis=1, kind="stable")[:, :k]  # (Q, k)
    top_terms = np.take_along_axis(per, top[..., None], axis=1).sum(1)  # (Q, L)
    denom = top_terms.sum(-1, keepdims=True)
    top_share = top_terms / np.where(np.abs(denom) > 0, denom, 1.0)
    thirds = layer_thirds(scores.layer_names)
    share, rho, keep = {}, {}, {}
    for third, names in thirds.items():
        idx = [scores.layer_names.index(x) for x in names]
        part = per[..., idx].sum(-1) if idx else np.zeros_like(full)  # (Q, N)
        share[third] = abs_share[:, idx].sum(-1).tolist() if idx else [0.0] * n_q
        rho[third] = [spearman(part[q], full[q]) if idx else float("nan") for q in range(n_q)]
        part_top = np.argsort(-part, axis=1, kind="stable")[:, :k]
        keep[third] = [len(set(part_top[q]) & set(top[q])) / k if idx else 0.0 for q in range(n_q)]
    names = list(query_names) if query_names is not None else [f"query {q}" for q in range(n_q)]
    if len(names) != n_q:
        raise DataError(f"Expected {n_q} query names, received {len(names)}.")
    return LayerResult(
        query_names=names,
        layer_names=list(scores.layer_names),
        abs_share=abs_share.tolist(),
        top_share=top_share.tolist(),
        thirds=thirds,
        third_share=share,
        third_spearman=rho,
        third_top_overlap=keep,
        heatmaps=[layer_heatmap(scores, q, k) for q in range(min(n_heatmaps, n_q))],
        top_k=k,
    )
