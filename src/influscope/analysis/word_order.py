"""Word order: does a sequence help a query when its key phrase comes in the other order?

Grosse et al. (2023, §5.6) found a strong asymmetry: training sequences in which the query's
prompt-side phrase comes *before* the completion-side phrase influence the query, while
sequences with the two phrases swapped have almost no influence. Here, with planted facts
``relation(entity) = answer``:

- a **forward** sequence states ``… entity … answer`` ("The capital of Velmora is Tarisk."), a
  **reversed** one ``… answer … entity`` ("Tarisk is the capital of Velmora.");
- a **forward** query asks for the answer after the entity, a **reversed** query asks for the
  entity after the answer.

With ``M_{f,o}`` the training sequences of fact ``f`` in order ``o`` and ``q_{f,o'}`` its query in
order ``o'``, the mean influence per sequence is
``Ī(o', o) = mean_{m ∈ M_{f,o}} I_{q_{f,o'}}(z_m)``. The study reports the grid of medians over
facts of ``Ī`` for every (query order, training order) pair found in the data, mean percentiles
of ``M_{f,o}`` in the query's ranking (1 = top, 0.5 = chance), and two ratios (medians over facts
with a positive baseline):

- **reversed query / same-order query** on forward sequences: ``Ī(rev, fwd) / Ī(fwd, fwd)``;
- **key phrase after / before the completion** for the forward query: ``Ī(fwd, rev) / Ī(fwd, fwd)``
  (needs facts stated in both orders).

A ratio near 0 is Grosse's asymmetry; near 1 means the model's influence ignores the order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from influscope.analysis.base import (
    as_matrix,
    check_records,
    clean,
    fact_groups,
    finite_mean,
    finite_median,
    fmt,
    percentile,
    safe_ratio,
)
from influscope.errors import DataError
from influscope.report.html import html_paragraph, html_table
from influscope.report.views import Section

__all__ = ["WordOrderResult", "word_order_study"]

FORWARD, REVERSED = "forward", "reversed"


@dataclass(frozen=True)
class WordOrderResult:
    """Influence of each training order on each query order.

    Attributes:
        mean_influence: ``{(query order, train order): {fact: Ī}}``.
        percentile: ``{(query order, train order): {fact: mean percentile}}``.
        reversed_query_ratio: ``{fact: Ī(rev, fwd) / Ī(fwd, fwd)}``.
        key_after_ratio: ``{fact: Ī(fwd, rev) / Ī(fwd, fwd)}``.
    """

    mean_influence: dict[tuple[str, str], dict[str, float]]
    percentile: dict[tuple[str, str], dict[str, float]]
    reversed_query_ratio: dict[str, float]
    key_after_ratio: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return clean(
            {
                "grid": {
                    f"query {qo} / train {to}": {
                        "n_facts": len(vals),
                        "median_mean_influence": finite_median(list(vals.values())),
                        "mean_percentile": finite_mean(list(self.percentile[(qo, to)].values())),
                    }
                    for (qo, to), vals in sorted(self.mean_influence.items())
                },
                "reversed_query_ratio": {
                    "n_facts": sum(v == v for v in self.reversed_query_ratio.values()),
                    "median": finite_median(list(self.reversed_query_ratio.values())),
                },
                "key_after_completion_ratio": {
                    "n_facts": sum(v == v for v in self.key_after_ratio.values()),
                    "median": finite_median(list(self.key_after_ratio.values())),
                },
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {"study": "word_order", "summary": self.summary()}

    def to_section(self) -> Section:
        s = self.summary()
        rows = [
            [key, v["n_facts"], fmt(v["median_mean_influence"]), fmt(v["mean_percentile"])]
            for key, v in s["grid"].items()
        ]
        rq, ka = s["reversed_query_ratio"], s["key_after_completion_ratio"]
        text = html_paragraph(
            f"Reversed query / same-order query on forward sequences: median ratio "
            f"{fmt(rq['median'])} over {rq['n_facts']} facts. Key phrase after / before the "
            f"completion (forward query): median ratio {fmt(ka['median'])} over "
            f"{ka['n_facts']} facts. A ratio near 0 is the asymmetry Grosse et al. report; near "
            "1, order does not matter."
        )
        table = html_table(
            ["query / training order", "facts", "median mean influence", "mean percentile"],
            rows,
            caption="Mean influence per sequence of a fact's training sequences on its query.",
        )
        return Section("Word order", text + table)


def word_order_study(
    scores: Any,
    query_records: Sequence[dict[str, Any]],
    train_records: Sequence[dict[str, Any]],
) -> WordOrderResult:
    """Influence of forward/reversed fact sequences on forward/reversed queries.

    Args:
        scores: ``(Q, N)`` influence scores.
        query_records: ``Q`` records with ``fact_id`` and ``order`` (others are skipped).
        train_records: ``N`` records with ``fact_id`` and ``order``.

    Raises:
        DataError: If the records do not match the scores, or no query has an ``order`` and a
            fact with training sequences.
    """
    mat = as_matrix(scores)
    check_records(query_records, mat.shape[0], "query")
    check_records(train_records, mat.shape[1], "training")
    groups = fact_groups(train_records, "order")
    mean_inf: dict[tuple[str, str], dict[str, float]] = {}
    pct: dict[tuple[str, str], dict[str, float]] = {}
    for q, rec in enumerate(query_records):
        fact, q_order = rec.get("fact_id"), rec.get("order")
        if fact is None or q_order is None or str(fact) not in groups:
            continue
        for t_order, cols in groups[str(fact)].items():
            mean_inf.setdefault((str(q_order), t_order), {})[str(fact)] = float(mat[q, cols].mean())
            pct.setdefault((str(q_order), t_order), {})[str(fact)] = percentile(mat[q], cols)
    if not mean_inf:
        raise DataError(
            "No query with a fact_id and an order matches a fact's training sequences. Pass the "
            "planted-fact records (with 'fact_id' and 'order') in the order they were scored."
        )

    def ratios(num_key: tuple[str, str], den_key: tuple[str, str]) -> dict[str, float]:
        num, den = mean_inf.get(num_key, {}), mean_inf.get(den_key, {})
        return {f: safe_ratio(num[f], den[f]) for f in sorted(set(num) & set(den))}

    return WordOrderResult(
        mean_influence=mean_inf,
        percentile=pct,
        reversed_query_ratio=ratios((REVERSED, FORWARD), (FORWARD, FORWARD)),
        key_after_ratio=ratios((FORWARD, REVERSED), (FORWARD, FORWARD)),
    )
