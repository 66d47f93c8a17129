"""The report stage: self-contained HTML pages (and SVG charts) from plain result views.

Modules:

- :mod:`~influscope.report.views`: frozen dataclasses describing what a report shows
  (:class:`ReportView`, :class:`QueryView`, :class:`SequenceView`, :class:`Section`).
- :mod:`~influscope.report.svg`: inline SVG charts (bar chart, heatmap, line plot with log axes)
  and the shared escaping / colour helpers.
- :mod:`~influscope.report.html`: :func:`render_html`, :func:`write_report` and fragment helpers
  for building extra sections.

Sign convention: a positive influence means that up-weighting the training sequence increases
``log p(completion | prompt)``; red marks positive influence, blue negative.

Example:
    >>> from influscope.report import QueryView, ReportView, SequenceView, render_html
    >>> seq = SequenceView(index=3, score=0.5, tokens=["Paris", " is"], token_scores=[0.4, 0.1],
    ...                    meta={"source": "wiki"})
    >>> q = QueryView(name="capital", prompt="The capital of France is", completion=" Paris",
    ...               proponents=[seq], opponents=[], layer_scores={"h.0": 0.5}, notes={})
    >>> page = render_html(ReportView(title="demo", overview={"model": "gpt2"}, queries=[q],
    ...                               sections=[], layer_heatmap=None))
    >>> page.startswith("<!DOCTYPE html>")
    True
"""

from influscope.report.html import (
    html_figure,
    html_paragraph,
    html_table,
    html_tokens,
    render_html,
    write_report,
)
from influscope.report.svg import (
    diverging_color,
    escape_text,
    format_score,
    svg_bar_chart,
    svg_heatmap,
    svg_line_plot,
)
from influscope.report.views import QueryView, ReportView, Section, SequenceView

__all__ = [
    "QueryView",
    "ReportView",
    "Section",
    "SequenceView",
    "diverging_color",
    "escape_text",
    "format_score",
    "html_figure",
    "html_paragraph",
    "html_table",
    "html_tokens",
    "render_html",
    "svg_bar_chart",
    "svg_heatmap",
    "svg_line_plot",
    "write_report",
]
