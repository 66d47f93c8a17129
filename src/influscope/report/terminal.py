"""A rich summary table in the terminal: each query with its strongest proponents."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from influscope.report.views import ReportView


def _snippet(tokens: list[str], width: int = 70) -> str:
    text = "".join(tokens).replace("\n", " ⏎ ").strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def print_summary(report: ReportView, console: Console | None = None, per_query: int = 3) -> None:
    """Print the overview and one row per (query, top proponent)."""
    console = console or Console()
    over = Table(title=report.title, show_header=False, box=None)
    for key, value in report.overview.items():
        over.add_row(f"[bold]{escape(key)}[/bold]", escape(str(value)))
    console.print(over)
    table = Table(title="Top proponents (positive = raises log p(completion | prompt))")
    table.add_column("query", overflow="fold", max_width=40)
    table.add_column("rank", justify="right")
    table.add_column("train #", justify="right")
    ens = any(seq.sem is not None for q in report.queries for seq in q.proponents)
    table.add_column("influence (mean ± s.e.)" if ens else "influence", justify="right")
    if ens:
        table.add_column("stable", justify="right")
    table.add_column("training sequence", overflow="fold")
    for q in report.queries:
        label = f"{escape(q.prompt)}[bold]{escape(q.completion)}[/bold]"
        if q.contrast:
            label += f" [dim]rather than[/dim] [bold]{escape(q.contrast)}[/bold]"
        for r, seq in enumerate(q.proponents[:per_query]):
            score = f"{seq.score:+.3g}"
            extra = []
            if ens:
                score += "" if seq.sem is None else f" ± {seq.sem:.2g}"
                extra = [
                    "–"
                    if seq.stable is None or seq.n_members is None
                    else f"{seq.stable}/{seq.n_members}"
                ]
            table.add_row(
                label if r == 0 else "",
                str(r + 1),
                str(seq.index),
                score,
                *extra,
                escape(_snippet([seq.excerpt_text])),
            )
        table.add_section()
    console.print(table)
