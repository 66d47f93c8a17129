"""Render a :class:`~influscope.report.views.ReportView` as one self-contained HTML5 page.

The page needs nothing from the network: CSS is inline, charts are inline SVG
(:mod:`influscope.report.svg`), fonts are the system's, and the only script is a few lines that
expand or collapse every ``<details>`` block (the blocks work without it).

Layout, top to bottom: title and overview table; a legend with the sign convention; an index of
the queries; one card per query (prompt with the completion highlighted, notes, a per-layer bar
chart, then the top proponents and opponents with their tokens coloured by per-token influence);
the layer x sequence heatmap; extra sections.

Safety: every piece of text (tokens, prompts, metadata, titles, layer names) goes through
:func:`~influscope.report.svg.escape_text`. Only :attr:`Section.html` is inserted verbatim, and it
must come from this package's helpers (:func:`html_table`, :func:`html_paragraph`,
:func:`html_figure`, :func:`html_tokens`).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from influscope.report.summary import one_line
from influscope.report.svg import (
    color_strength,
    diverging_color,
    escape_text,
    format_score,
    svg_bar_chart,
    svg_heatmap,
)
from influscope.report.views import QueryView, ReportView, SequenceView
from influscope.storage.atomic import default_mode

__all__ = [
    "html_figure",
    "html_paragraph",
    "html_table",
    "html_tokens",
    "render_html",
    "write_report",
]

_STRONG = 0.6  # colour intensity above which a token's text turns white for contrast

_CSS = """
:root { --fg: #111827; --muted: #6b7280; --line: #e5e7eb; --card: #ffffff; --bg: #f3f4f6;
  --pos: #b91c1c; --neg: #1d4ed8; --mono: ui-monospace, SFMono-Regular, Menlo, Consolas,
  'Liberation Mono', monospace; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg); line-height: 1.45;
  font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial,
  sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 20px 20px 48px; }
header.top { display: flex; align-items: baseline; justify-content: space-between; gap: 12px;
  flex-wrap: wrap; }
h1 { font-size: 22px; margin: 4px 0 12px; }
h2 { font-size: 17px; margin: 0 0 10px; }
h3 { font-size: 14px; margin: 14px 0 6px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 14px 16px; margin: 0 0 16px; box-shadow: 0 1px 2px rgba(0,0,0,.04); }
.grid2 { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: minmax(0, 1fr); } }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; vertical-align: top; padding: 4px 8px;
  border-bottom: 1px solid var(--line); }
th { font-weight: 600; color: #374151; background: #f9fafb; white-space: nowrap; }
table.kv th { width: 34%; }
table.data { width: auto; min-width: 50%; margin: 8px 0; }
caption { text-align: left; font-size: 12px; color: var(--muted); padding: 4px 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pos { color: var(--pos); } .neg { color: var(--neg); }
.muted { color: var(--muted); }
.legend p { margin: 4px 0; }
.swatches { display: inline-flex; vertical-align: middle; border: 1px solid var(--line);
  margin: 0 6px; }
.swatches span { display: inline-block; width: 18px; height: 14px; }
.toolbar button { font: inherit; font-size: 12px; padding: 3px 10px; margin-left: 6px;
  border: 1px solid #d1d5db; border-radius: 5px; background: #fff; cursor: pointer; }
.toolbar button:hover { background: #f3f4f6; }
.qhead { display: flex; align-items: baseline; gap: 10px; flex-wrap: wrap; }
.qhead h2 { margin: 0; }
.qnum { color: var(--muted); font-weight: 500; }
.chips { display: flex; flex-wrap: wrap; gap: 4px; margin: 6px 0 10px; }
.chip { display: inline-block; font-size: 12px; padding: 1px 7px; border-radius: 10px;
  background: #f3f4f6; border: 1px solid var(--line); white-space: pre-wrap;
  overflow-wrap: anywhere; }
.chip b { font-weight: 600; color: #374151; }
.chip.yes { background: #ecfdf5; border-color: #a7f3d0; }
.chip.no { background: #fef2f2; border-color: #fecaca; }
.qa { font-family: var(--mono); font-size: 13px; white-space: pre-wrap; overflow-wrap: anywhere;
  background: #f9fafb; border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px;
  margin: 0; max-height: 22em; overflow: auto; }
.label { font-size: 12px; color: var(--muted); margin: 0 0 4px; }
mark.completion { background: #fde68a; color: inherit; border-bottom: 2px solid #d97706;
  padding: 0 1px; }
figure { margin: 0; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 4px; }
.scroll { overflow-x: auto; }
details { margin-top: 10px; }
summary { cursor: pointer; font-weight: 600; font-size: 14px; padding: 2px 0; }
summary .muted { font-weight: 400; }
table.seqs td.tokcell { width: 62%; }
.tokens { font-family: var(--mono); font-size: 12.5px; line-height: 1.7; white-space: pre-wrap;
  overflow-wrap: anywhere; max-height: 10.5em; overflow: auto; padding: 2px 4px;
  border: 1px solid var(--line); border-radius: 4px; background: #fff; }
.tok { border-radius: 2px; }
.tok.strong { color: #fff; }
.tok.empty { color: var(--muted); }
.peak { font-size: 12px; color: var(--muted); margin-bottom: 3px; }
.peak .tok { font-family: var(--mono); padding: 0 3px; margin-right: 4px;
  border: 1px solid var(--line); white-space: pre-wrap; }
.queries td.qtext { font-family: var(--mono); font-size: 12.5px; min-width: 16em;
  overflow-wrap: anywhere; }
.queries td.qtext a { color: inherit; text-decoration: none; }
.queries td.toptext { min-width: 16em; overflow-wrap: anywhere; }
.queries .idx { color: var(--muted); font-variant-numeric: tabular-nums; }
.empty-list { color: var(--muted); font-style: italic; margin: 6px 0; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
svg text { user-select: none; }
"""

# Expand/collapse all <details>; written without "<" so it cannot close the script element.
_SCRIPT = (
    "document.querySelectorAll('button[data-details]').forEach(function (b) {"
    " b.addEventListener('click', function () {"
    " var open = b.getAttribute('data-details') === 'open';"
    " document.querySelectorAll('details').forEach(function (d) { d.open = open; });"
    " }); });"
)


# ------------------------------------------------------------------------------------------------
# Public fragment helpers (also for building Section.html)
# ------------------------------------------------------------------------------------------------


def html_paragraph(text: str, *, muted: bool = False) -> str:
    """Return ``<p>`` with ``text`` escaped.

    Args:
        text: Plain text.
        muted: Render in the muted (grey) style.

    Returns:
        A safe HTML fragment.
    """
    cls = ' class="muted"' if muted else ""
    return f"<p{cls}>{escape_text(text)}</p>"


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return f"<td>{escape_text(value)}</td>"
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    if isinstance(value, float):
        text = f"{value:.4g}" if math.isfinite(value) else str(value)
        return f'<td class="num">{escape_text(text)}</td>'
    return f"<td>{escape_text(value)}</td>"


def html_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, caption: str = ""
) -> str:
    """Return a table with every cell escaped; ints and floats are right-aligned.

    Args:
        header: Column titles.
        rows: Rows of cells (strings, ints, floats with 4 significant digits, anything else via
            ``str``).
        caption: Optional caption shown above the table.

    Returns:
        A safe HTML fragment.

    Example:
        >>> html_table(["model", "score"], [["<gpt2>", 0.5]]).count("&lt;gpt2&gt;")
        1
    """
    parts = ['<div class="scroll"><table class="data">']
    if caption:
        parts.append(f"<caption>{escape_text(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{escape_text(h)}</th>" for h in header))
    parts.append("</tr></thead><tbody>")
    parts.extend("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    parts.append("</tbody></table></div>")
    return "".join(parts)


def html_figure(svg: str, caption: str = "") -> str:
    """Wrap an SVG produced by :mod:`influscope.report.svg` in a scrollable ``<figure>``.

    Args:
        svg: Safe SVG markup from :func:`~influscope.report.svg.svg_line_plot` and friends.
        caption: Plain-text caption (escaped).

    Returns:
        A safe HTML fragment.
    """
    cap = f"<figcaption>{escape_text(caption)}</figcaption>" if caption else ""
    return f'<figure class="scroll">{svg}{cap}</figure>'


def _token_span(
    token: str, score: float | None, vmax: float, position: int, *, inline: bool = False
) -> str:
    text = escape_text(token, visible_whitespace=True)
    if inline:  # a chip outside the token box: keep the marks, drop the line breaks and tabs
        text = text.replace("\n", "").replace("\t", "")
    classes = ["tok"]
    if not text:
        text, classes = "∅", ["tok", "empty"]
    if score is None:
        return f'<span class="{" ".join(classes)}" title="token {position}">{text}</span>'
    style = ""
    t = color_strength(score, vmax)
    if t > 0:
        style = f' style="background:{diverging_color(score, vmax)}"'
        if t > _STRONG:
            classes.append("strong")
    title = f"{format_score(score)} (token {position})"
    return f'<span class="{" ".join(classes)}"{style} title="{escape_text(title)}">{text}</span>'


def html_tokens(tokens: Sequence[str], token_scores: Sequence[float] = ()) -> str:
    """Render tokens as ``<span>`` s coloured by their influence.

    Background: red for positive, blue for negative, intensity ``|score| / max |score|`` within
    this token list; the value is in each span's ``title`` (tooltip). Whitespace stays visible
    (the container uses ``white-space: pre-wrap``; newlines show as ``↵``, tabs as ``⇥``).

    Args:
        tokens: Decoded tokens.
        token_scores: One score per token, or empty for uncoloured tokens.

    Returns:
        A safe HTML fragment (a ``<div class="tokens">``).
    """
    scores = [float(s) for s in token_scores] if len(token_scores) else None
    finite = [abs(s) for s in scores or [] if math.isfinite(s)]
    vmax = max(finite, default=0.0)
    spans = "".join(
        _token_span(tok, scores[i] if scores else None, vmax, i) for i, tok in enumerate(tokens)
    )
    return f'<div class="tokens">{spans}</div>'


def _peak_tokens(seq: SequenceView, k: int = 3) -> str:
    """The ``k`` tokens with the largest |score|, as coloured chips."""
    if not seq.token_scores:
        return ""
    scored = [(abs(s), i) for i, s in enumerate(seq.token_scores) if math.isfinite(s) and s != 0.0]
    if not scored:
        return ""
    vmax = max(a for a, _ in scored)
    top = sorted(scored, reverse=True)[:k]
    chips = "".join(
        _token_span(seq.tokens[i], seq.token_scores[i], vmax, i, inline=True) for _, i in top
    )
    return f'<div class="peak">strongest tokens: {chips}</div>'


# ------------------------------------------------------------------------------------------------
# Page pieces
# ------------------------------------------------------------------------------------------------


def _sign_class(value: float) -> str:
    return "pos" if value > 0 else "neg" if value < 0 else ""


def _blank(value: object) -> bool:
    """Metadata that says nothing (``None``, ``""``, ``"None"``, ``"nan"``): shown as no chip."""
    return value is None or str(value).strip() in ("", "None", "null", "nan", "NaN")


def _chips(items: dict[str, str], *, judge: bool = False) -> str:
    items = {k: v for k, v in items.items() if not _blank(v)}
    if not items:
        return ""
    out = []
    for key, value in items.items():
        cls = "chip"
        word = str(value).strip().lower()
        if judge and word in ("yes", "true", "correct", "✓"):
            cls += " yes"
        elif judge and word in ("no", "false", "wrong", "✗"):
            cls += " no"
        out.append(f'<span class="{cls}"><b>{escape_text(key)}</b> {escape_text(value)}</span>')
    return "".join(out)


def _overview(report: ReportView) -> str:
    rows = "".join(
        f"<tr><th>{escape_text(k)}</th><td>{escape_text(v)}</td></tr>"
        for k, v in report.overview.items()
    )
    body = f'<table class="kv"><tbody>{rows}</tbody></table>' if rows else ""
    if not body:
        body = '<p class="empty-list">No overview given.</p>'
    return f'<section class="card"><h2>Overview</h2>{body}</section>'


def _legend() -> str:
    swatches = "".join(
        f'<span style="background:{diverging_color(v / 4, 1.0)}"></span>' for v in range(-4, 5)
    )
    return (
        '<section class="card legend"><h2>How to read this report</h2>'
        "<p><b>Sign convention.</b> An influence score is "
        "I(z) = −∇f(θ)ᵀ (G + λI)⁻¹ ∇L(z, θ) with f = log p(completion | prompt). "
        '<span class="pos"><b>Positive (red)</b></span> = up-weighting the training sequence '
        "<i>increases</i> log p(completion | prompt): it helps the completion (a proponent). "
        '<span class="neg"><b>Negative (blue)</b></span> = up-weighting it <i>decreases</i> '
        "log p(completion | prompt) (an opponent).</p>"
        f'<p>Token colours <span class="swatches" title="blue: negative, red: positive">'
        f"{swatches}</span> show each token's share of the sequence's influence. The intensity "
        "is scaled by the largest |token score| <i>within that sequence</i>: compare colours "
        "inside a sequence, and use the numbers to compare sequences. Hover a token to see its "
        "value. Newlines are shown as ↵, tabs as ⇥, empty tokens as ∅ (also a token holding "
        "the first bytes of a character that the next token completes).</p>"
        "<p><b>Numbering.</b> Queries and training sequences are numbered by their position "
        "in the file they came from, counting from 0: <i>Query 2</i> is the third query, "
        "<i>#342</i> the training record at position 342 (the <code>index</code> of "
        "<code>RUN/NAME.json</code> and of the Python API).</p>"
        "</section>"
    )


def query_title(q: QueryView, number: int) -> str:
    """``"Query 3"``, with the query's name after it when it says more than its number."""
    name = q.name.strip()
    if not name or name.lower() == f"query {number}":
        return f"Query {number}"
    return f"Query {number} · {name}"


def _query_text(q: QueryView, width: int = 90) -> str:
    """``prompt → completion`` on one line: the prompt's end, the completion highlighted."""
    completion = one_line(q.completion, width // 2) if q.completion.strip() else ""
    if completion and q.completion[:1].isspace():
        completion = " " + completion  # one_line strips it; the join shows it
    room = max(width - len(completion), 20)
    prompt = one_line(q.prompt, 10**9)
    if len(prompt) > room:
        prompt = "…" + prompt[-(room - 1) :].lstrip()
    mark = f'<mark class="completion">{escape_text(completion)}</mark>' if completion else ""
    return f"{escape_text(prompt)}{mark}"


def _query_index(report: ReportView) -> str:
    if not report.queries:
        return ""
    rows = []
    for i, q in enumerate(report.queries):
        top = q.proponents[0] if q.proponents else None
        top_cell = (
            f'<td class="toptext"><span class="idx">#{top.index}</span> '
            f"{escape_text(one_line(top.excerpt_text, 110))}</td>"
            f'<td class="num {_sign_class(top.score)}">{escape_text(format_score(top.score))}</td>'
            if top
            else '<td class="muted">–</td><td class="num muted">–</td>'
        )
        title = query_title(q, i)
        rows.append(
            f'<tr><td class="num"><a href="#q-{i}" title="{escape_text(title)}">{i}</a></td>'
            f'<td class="qtext"><a href="#q-{i}">{_query_text(q)}</a>'
            f"{_contrast_note(q, short=True)}</td>"
            f"{top_cell}<td>{_chips(q.notes, judge=True)}</td></tr>"
        )
    return (
        '<section class="card queries"><h2>Queries</h2><div class="scroll"><table>'
        '<thead><tr><th class="num">query</th><th>prompt → <mark class="completion">'
        "completion</mark></th><th>top proponent (train # · text)</th>"
        '<th class="num">its influence</th><th>notes</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _ensemble_cells(seq: SequenceView) -> str:
    """``± s.e.`` and ``stable in x/M`` cells of an ensemble's sequence row."""
    sem = "–" if seq.sem is None else f"± {seq.sem:.3g}"
    stable = "–" if seq.stable is None or seq.n_members is None else f"{seq.stable}/{seq.n_members}"
    return (
        f'<td class="num ens-sem">{escape_text(sem)}</td>'
        f'<td class="num ens-stable">{escape_text(stable)}</td>'
    )


def _sequence_table(seqs: Sequence[SequenceView], kind: str) -> str:
    if not seqs:
        return f'<p class="empty-list">No {kind}.</p>'
    rows = []
    ens = any(seq.sem is not None for seq in seqs)
    for rank, seq in enumerate(seqs, 1):
        meta = _chips(seq.meta) or '<span class="muted">–</span>'
        rows.append(
            f'<tr><td class="num">{rank}</td><td class="num">#{seq.index}</td>'
            f'<td class="num {_sign_class(seq.score)}">{escape_text(format_score(seq.score))}</td>'
            + (_ensemble_cells(seq) if ens else "")
            + f'<td><div class="chips">{meta}</div></td>'
            f'<td class="tokcell">{_peak_tokens(seq)}{html_tokens(seq.tokens, seq.token_scores)}'
            "</td></tr>"
        )
    return (
        '<div class="scroll"><table class="seqs"><thead><tr><th class="num">rank</th>'
        '<th class="num">train #</th><th class="num">influence</th>'
        + ('<th class="num">± s.e.</th><th class="num">stable in x/M</th>' if ens else "")
        + "<th>metadata</th>"
        "<th>tokens (colour = per-token influence)</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _contrast_note(q: QueryView, short: bool = False) -> str:
    """For a contrastive query: what its completion is measured against (else nothing)."""
    if not q.contrast:
        return ""
    if short:
        return f' <span class="muted">rather than “{escape_text(q.contrast)}”</span>'
    return (
        '<p class="muted">contrastive: f = log p(completion | prompt) − log p(contrast | '
        f"prompt), rather than <mark>{escape_text(q.contrast)}</mark></p>"
    )


def _query_card(q: QueryView, number: int) -> str:
    notes = _chips(q.notes, judge=True)
    qa = (
        '<div><p class="label">prompt → <mark class="completion">completion</mark></p>'
        f'<div class="qa">{escape_text(q.prompt)}'
        f'<mark class="completion">{escape_text(q.completion)}</mark></div>{_contrast_note(q)}'
        "</div>"
    )
    if q.layer_scores:
        chart = svg_bar_chart(
            list(q.layer_scores), list(q.layer_scores.values()), width=520, title=""
        )
        layers = (
            '<figure><p class="label">influence of the top proponents by layer</p>'
            f'<div class="scroll">{chart}</div></figure>'
        )
    else:
        layers = '<div><p class="label">per-layer influence</p><p class="empty-list">none</p></div>'
    return (
        f'<section class="card query" id="q-{number}"><div class="qhead">'
        f"<h2>{escape_text(query_title(q, number))}</h2></div>"
        f'<div class="chips">{notes}</div>'
        f'<div class="grid2">{qa}{layers}</div>'
        f'<details open><summary>Top proponents <span class="muted">({len(q.proponents)}, '
        "help the completion)</span></summary>"
        f"{_sequence_table(q.proponents, 'proponents')}</details>"
        f'<details open><summary>Top opponents <span class="muted">({len(q.opponents)}, '
        "hurt the completion)</span></summary>"
        f"{_sequence_table(q.opponents, 'opponents')}</details>"
        "</section>"
    )


def _heatmap(report: ReportView) -> str:
    if report.layer_heatmap is None:
        return ""
    rows, cols, values = report.layer_heatmap
    svg = svg_heatmap(rows, cols, values, title="")
    return (
        '<section class="card"><h2>Influence by layer and sequence</h2>'
        f'<div class="scroll">{svg}</div>'
        '<p class="muted">Rows: layers; columns: training sequences. Each cell is that layer\'s '
        "term of the sequence's influence. Red helps the completion, blue hurts it; the colour "
        "scale is shared by all cells. Hover a cell for its value.</p></section>"
    )


# ------------------------------------------------------------------------------------------------
# Page and file
# ------------------------------------------------------------------------------------------------


def render_html(report: ReportView) -> str:
    """Render the whole report as one self-contained HTML5 page.

    Args:
        report: What to show.

    Returns:
        The page as a string (no external URLs; inline CSS, SVG and a tiny script).

    Example:
        >>> page = render_html(ReportView(title="<demo>"))
        >>> "<title>&lt;demo&gt;</title>" in page
        True
    """
    title = escape_text(report.title)
    sections = "".join(
        f'<section class="card extra"><h2>{escape_text(s.title)}</h2>{s.html}</section>'
        for s in report.sections
    )
    body = "".join(
        [
            '<header class="top">',
            f"<h1>{title}</h1>",
            '<div class="toolbar"><button type="button" data-details="open">Expand all</button>'
            '<button type="button" data-details="close">Collapse all</button></div>',
            "</header>",
            _overview(report),
            _legend(),
            _query_index(report),
            *(_query_card(q, i) for i, q in enumerate(report.queries)),
            _heatmap(report),
            sections,
            "<footer>Generated by influscope.</footer>",
        ]
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="influscope">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_report(report: ReportView, path: str | os.PathLike[str]) -> Path:
    """Render ``report`` and write it to ``path`` atomically.

    The page is written to a temporary file in the same directory, flushed to disk, then moved
    over ``path`` with :func:`os.replace`, so a reader never sees a half-written page and an
    interruption leaves any previous report intact. Missing parent directories are created.

    Args:
        report: What to show.
        path: Destination file (conventionally ``*.html``).

    Returns:
        The destination path.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = render_html(report).encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        mode = dest.stat().st_mode & 0o777 if dest.exists() else default_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return dest
