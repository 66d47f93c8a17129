"""How a scored bank is shown: terminal lines, and the HTML report's section.

``influscope validate score`` writes its :class:`~.bank_score.BankScore` to
``RUN/validation/<scores>.json``; ``influscope report RUN`` adds one section per such file
(:func:`validation_sections`): LDS mean ± s.e.m. and the subset-bootstrap s.e. per drop
fraction, and the top-k removal numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from influscope.evaluation.bank_score import BankScore

__all__ = ["report_section", "summary_lines", "validation_sections"]


def _pm(mean: float, sem: float, digits: int = 3) -> str:
    return f"{mean:.{digits}g} ± {sem:.2g}" if np.isfinite(mean) else "undefined (constant)"


def report_section(result: BankScore):
    """The HTML report's section for one scored attribution: LDS per ``k``, removals.

    Returns:
        A :class:`~influscope.report.views.Section`.
    """
    from influscope.report.html import html_paragraph, html_table
    from influscope.report.views import Section

    rows = [
        [
            f"{r.fraction:g}",
            r.n_dropped,
            r.subsets,
            _pm(r.mean, r.sem),
            f"{r.subset_se:.2g}" if np.isfinite(r.subset_se) else "—",
            r.n,
            r.constant_queries,
        ]
        for r in result.lds
    ]
    html = html_table(
        [
            "leave-k-out",
            "rows dropped",
            "subsets",
            "LDS mean ± s.e.m.",
            "subset bootstrap s.e.",
            "queries",
            "constant",
        ],
        rows,
        caption="LDS: Spearman over the subsets between −Σ_{dropped} τ and the retrained "
        "measurement, per query; mean ± s.e.m. over queries with a defined correlation.",
    )
    if result.removal:
        html += html_table(
            ["k", "Δf remove top-k", "Δf remove k random", "top below random", "queries"],
            [
                [
                    r.k,
                    _pm(r.delta_top, r.delta_top_sem, 4),
                    _pm(r.delta_random, r.delta_random_sem, 4),
                    f"{r.top_below_random:.0%}",
                    r.queries,
                ]
                for r in result.removal
            ],
            caption="Retrained without each query's top-k proponents vs k random rows.",
        )
    html += html_paragraph(
        f"Bank for data {result.bank.get('data')}, queries {result.bank.get('queries')} "
        "(influscope validate; docs/validation.md).",
        muted=True,
    )
    return Section(f"Validation bank: {result.scores}", html)


def validation_sections(run: str | Path) -> list:
    """Sections for every result stored under ``RUN/validation/*.json`` (unreadable: skipped)."""
    import logging

    out = []
    for path in sorted((Path(run) / "validation").glob("*.json")):
        try:
            out.append(report_section(BankScore.load(path)))
        except (KeyError, TypeError, ValueError, OSError) as exc:
            logging.getLogger(__name__).warning("validation section %s skipped: %s", path, exc)
    return out


def summary_lines(result: BankScore) -> list[str]:
    """Plain-text summary (one line per fraction and per removal size)."""
    lines = []
    for r in result.lds:
        flag = f", {r.constant_queries} constant" if r.constant_queries else ""
        lines.append(
            f"LDS leave-{r.fraction:.3g}-out ({r.n_dropped} rows, m={r.subsets}): "
            f"{r.mean:.3f} ± {r.sem:.3f} over {r.n} queries (subset bootstrap s.e. "
            f"{r.subset_se:.3f}){flag}"
        )
    for r in result.removal:
        lines.append(
            f"remove top-{r.k}: Δf = {r.delta_top:.4g} ± {r.delta_top_sem:.2g}; random "
            f"{r.k}: {r.delta_random:.4g} ± {r.delta_random_sem:.2g}; top below random in "
            f"{r.top_below_random:.0%} of {r.queries} queries"
        )
    return lines
