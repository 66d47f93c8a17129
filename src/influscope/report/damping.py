"""The damping sweep as a plot and an HTML page (``influscope damping`` writes both).

The x axis is the damping actually used, summarised per setting as the geometric mean of the
per-layer ``λ_ℓ`` (log scale); one line per rule (absolute, relative) and quantity: the
agreement with the default (Spearman ρ, top-k overlap) and every criterion the sweep was given
(self-consistency top-1, planted-check top-1 and recall@k, LDS).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from influscope.report.html import html_figure, html_paragraph, html_table, write_report
from influscope.report.svg import svg_line_plot
from influscope.report.views import ReportView, Section

__all__ = ["damping_report", "damping_svg", "write_damping_report"]

#: (label, DampingRow attribute) of the quantities plotted when present.
QUANTITIES = (
    ("ρ vs default", "spearman_vs_reference"),
    ("top-k ∩ default", "overlap_vs_reference"),
    ("self-consistency top-1", "self_top1"),
    ("planted top-1", "check_top1"),
    ("recall@k", "check_recall"),
    ("LDS", "lds"),
)


def _geomean(values) -> float:
    vals = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def damping_svg(sweep, *, standalone: bool = False) -> str:
    """Every quantity of ``sweep`` against the (geometric-mean) damping, one line per rule.

    Args:
        sweep: A :class:`~influscope.scoring.damping.DampingSweep`.
        standalone: Add the SVG namespace (to save the string as an ``.svg`` file).
    """
    xs, ys, labels = [], [], []
    for rule in ("absolute", "relative"):
        rows = [r for r in sweep.rows if r.setting.rule == rule]
        rows.sort(key=lambda r: _geomean(r.setting.per_layer.values()))
        for name, attr in QUANTITIES:
            if not rows or getattr(rows[0], attr) is None:
                continue
            xs.append([_geomean(r.setting.per_layer.values()) for r in rows])
            ys.append([float(getattr(r, attr)) for r in rows])
            labels.append(f"{name} ({rule})")
    return svg_line_plot(
        xs,
        ys,
        labels,
        log_x=True,
        title=f"Damping sweep (default: relative 0.1; k = {sweep.k})",
        x_label="λ (geometric mean over layers)",
        y_label="value",
        standalone=standalone,
    )


def damping_report(sweep, title: str = "influscope damping sweep") -> ReportView:
    """A :class:`ReportView` with the plot, the table and the recommendation."""
    header = ["damping", "λ min", "λ max", "ρ vs default", "top-k ∩ default"]
    present = [(n, a) for n, a in QUANTITIES[2:] if getattr(sweep.rows[0], a) is not None]
    header += [n for n, _ in present]
    rows = []
    for i, r in enumerate(sweep.rows):
        lam = list(r.setting.per_layer.values())
        mark = " (best)" if i == sweep.best else (" (default)" if i == sweep.reference else "")
        rows.append(
            [
                r.setting.label + mark,
                min(lam),
                max(lam),
                r.spearman_vs_reference,
                r.overlap_vs_reference,
                *(float(getattr(r, a)) for _, a in present),
            ]
        )
    rec = sweep.recommended
    verdict = (
        f"Recommended by {sweep.criterion}: {rec.label}."
        if rec is not None
        else "No criterion was given: the sweep only shows how far each λ moves the scores "
        "from the default."
    )
    html = "".join(
        [
            html_paragraph(verdict),
            html_figure(damping_svg(sweep), "Each quantity against the damping used."),
            html_table(header, rows, caption=f"top-k with k = {sweep.k}"),
        ]
    )
    return ReportView(
        title=title,
        overview={"settings": str(len(sweep.rows)), "default": "relative 0.1"},
        sections=[Section("Damping sweep", html)],
    )


def write_damping_report(sweep, path: str | os.PathLike[str]) -> Path:
    """Write the sweep's HTML page (atomically) to ``path``."""
    return write_report(damping_report(sweep), path)
