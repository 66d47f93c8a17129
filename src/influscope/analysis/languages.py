"""Languages: does a fact learnt from English sequences help the same query in another language?

Grosse et al. (2023, §5.5) asked a query in several languages and measured how much the English
sequences that state the answer influence each translation; the cross-lingual influence grew
with model size. This study does the same on records carrying ``fact_id`` and ``lang`` (the
planted-facts corpus of :mod:`influscope.demo`).

For a fact ``f`` whose training sequences ``M_f`` are all in the source language ``s`` and its
query ``q_ℓ`` in language ``ℓ``, the fact's influence on the query is
``S_f(q_ℓ) = Σ_{m ∈ M_f} I_{q_ℓ}(z_m)``, and the cross-lingual ratio is

.. math:: r_ℓ(f) = S_f(q_ℓ) / S_f(q_s),

defined when ``S_f(q_s) > 0``. ``r_ℓ ≈ 1`` means the English sequences help the translated query
as much as the English one; ``r_ℓ ≈ 0`` means they do not transfer. Because a raw ratio is
unstable when the baseline is small, the study also reports the mean *percentile* of ``M_f`` in
the ranking of all scored sequences for ``q_ℓ`` (1 = top, 0.5 = chance) and how often a sequence
of ``M_f`` is the top-1 proponent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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

__all__ = ["LanguageResult", "language_study"]


@dataclass(frozen=True)
class LanguageResult:
    """Cross-lingual influence of source-language sequences, per fact and query language.

    Attributes:
        source_lang: Language of the facts' training sequences.
        languages: Query languages, the source first.
        facts: Facts studied (those stated only in ``source_lang``).
        influence: ``{lang: {fact: S_f(q_lang)}}``.
        ratio: ``{lang: {fact: r_lang(f)}}`` (NaN when the source baseline is not positive).
        percentile: ``{lang: {fact: mean percentile of M_f}}``.
        top1: ``{lang: {fact: whether a sequence of M_f is the top-1 proponent}}``.
    """

    source_lang: str
    languages: list[str]
    facts: list[str]
    influence: dict[str, dict[str, float]]
    ratio: dict[str, dict[str, float]]
    percentile: dict[str, dict[str, float]]
    top1: dict[str, dict[str, bool]]

    def summary(self) -> dict[str, Any]:
        return clean(
            {
                lang: {
                    "n_facts": len(self.influence[lang]),
                    "median_ratio": finite_median(list(self.ratio[lang].values())),
                    "mean_ratio": finite_mean(list(self.ratio[lang].values())),
                    "fraction_positive": float(
                        np.mean([v > 0 for v in self.influence[lang].values()])
                    )
                    if self.influence[lang]
                    else float("nan"),
                    "mean_percentile": finite_mean(list(self.percentile[lang].values())),
                    "top1_rate": float(np.mean(list(self.top1[lang].values())))
                    if self.top1[lang]
                    else float("nan"),
                }
                for lang in self.languages
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": "languages",
            "source_lang": self.source_lang,
            "summary": self.summary(),
            "facts": clean(
                {
                    f: {
                        lang: {
                            "influence": self.influence[lang].get(f),
                            "ratio": self.ratio[lang].get(f),
                            "percentile": self.percentile[lang].get(f),
                        }
                        for lang in self.languages
                    }
                    for f in self.facts
                }
            ),
        }

    def to_section(self) -> Section:
        s = self.summary()
        rows = [
            [
                lang,
                s[lang]["n_facts"],
                fmt(s[lang]["median_ratio"]),
                fmt(s[lang]["mean_ratio"]),
                fmt(s[lang]["fraction_positive"]),
                fmt(s[lang]["mean_percentile"]),
                fmt(s[lang]["top1_rate"]),
            ]
            for lang in self.languages
        ]
        text = html_paragraph(
            f"{len(self.facts)} facts stated only in {self.source_lang!r} training sequences. "
            "Ratio = summed influence of those sequences on the query in each language divided "
            f"by their influence on the {self.source_lang!r} query (1 = full transfer, 0 = none);"
            " percentile = mean rank of the fact's sequences among all scored ones (1 = top, "
            "0.5 = chance)."
        )
        table = html_table(
            [
                "query language",
                "facts",
                "median ratio",
                "mean ratio",
                "influence > 0",
                "mean percentile",
                "top-1 is the fact",
            ],
            rows,
        )
        return Section("Languages: cross-lingual influence", text + table)


def language_study(
    scores: Any,
    query_records: Sequence[dict[str, Any]],
    train_records: Sequence[dict[str, Any]],
    source_lang: str = "en",
    order: str | None = "forward",
) -> LanguageResult:
    """Influence of source-language fact sequences on the same fact's query in each language.

    Args:
        scores: ``(Q, N)`` influence scores.
        query_records: ``Q`` query records with ``fact_id`` and ``lang`` (others are skipped).
        train_records: ``N`` training records with ``fact_id`` and ``lang`` (``fact_id`` None
            for background text).
        source_lang: The language facts are stated in.
        order: Only queries in this word order (records without ``order`` always count);
            ``None`` ignores the order.

    Returns:
        Per-language influence, ratios and percentiles.

    Only facts asked in ``source_lang`` and at least one other language are studied.

    Raises:
        DataError: If the records do not match the scores, if a fact is asked twice in one
            language (and order), or if no fact stated only in ``source_lang`` is asked in
            ``source_lang`` and another language.
    """
    mat = as_matrix(scores)
    check_records(query_records, mat.shape[0], "query")
    check_records(train_records, mat.shape[1], "training")
    groups = fact_groups(train_records, "lang")
    source_only = {f: g[source_lang] for f, g in groups.items() if set(g) == {source_lang}}
    by_lang: dict[str, dict[str, int]] = {}
    for q, rec in enumerate(query_records):
        fact, lang = rec.get("fact_id"), rec.get("lang")
        if fact is None or lang is None or str(fact) not in source_only:
            continue
        if order is not None and rec.get("order") not in (None, order):
            continue
        seen = by_lang.setdefault(str(lang), {})
        if str(fact) in seen:
            raise DataError(
                f"Fact {fact!r} is asked twice in {lang!r} (queries {seen[str(fact)]} and {q}). "
                "Give each fact one query per language, or select one word order with order=."
            )
        seen[str(fact)] = q
    asked = {f for lang, fs in by_lang.items() if lang != source_lang for f in fs}
    by_lang = {lang: {f: q for f, q in fs.items() if f in asked} for lang, fs in by_lang.items()}
    if not by_lang.get(source_lang):
        raise DataError(
            f"No fact stated only in {source_lang!r} training sequences is asked in {source_lang!r}"
            f" and another language (query languages: {sorted(by_lang)}). Build the corpus with "
            f"facts in "
            f"{source_lang!r} and queries in {source_lang!r} plus the other languages."
        )
    languages = [source_lang, *sorted(lang for lang in by_lang if lang != source_lang)]
    facts = sorted(by_lang[source_lang])
    influence: dict[str, dict[str, float]] = {}
    ratio: dict[str, dict[str, float]] = {}
    pct: dict[str, dict[str, float]] = {}
    top1: dict[str, dict[str, bool]] = {}
    for lang in languages:
        influence[lang], ratio[lang], pct[lang], top1[lang] = {}, {}, {}, {}
        for fact, q in by_lang[lang].items():
            cols = source_only[fact]
            total = float(mat[q, cols].sum())
            influence[lang][fact] = total
            pct[lang][fact] = percentile(mat[q], cols)
            top1[lang][fact] = int(np.argmax(mat[q])) in cols
            base = by_lang[source_lang].get(fact)
            ratio[lang][fact] = (
                safe_ratio(total, float(mat[base, cols].sum())) if base is not None else np.nan
            )
    return LanguageResult(source_lang, languages, facts, influence, ratio, pct, top1)
