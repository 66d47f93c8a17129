"""Inline SVG charts for the HTML report, written by hand (no plotting library).

Implementations:

- :func:`svg_bar_chart`: horizontal bars (e.g. influence per layer), red for positive values and
  blue for negative ones, drawn from a zero line.
- :func:`svg_heatmap`: a matrix of coloured cells (e.g. layers x sequences) on a diverging scale
  symmetric around zero, with a colour legend.
- :func:`svg_line_plot`: one or more polylines with optional log axes (e.g. the power-law tail of
  the influence distribution).

Every function returns a *safe* SVG string: all labels go through :func:`escape_text`, and the
output parses as XML. By default the ``<svg>`` root carries no ``xmlns`` attribute, which HTML5
does not need for inline SVG (so a report contains no URL at all); pass ``standalone=True`` to get
a document that can be saved as an ``.svg`` file.

The text helpers (:func:`clean_text`, :func:`escape_text`) and the diverging colour scale
(:func:`diverging_color`) live here too, so that charts and HTML agree on both.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

from influscope.errors import DataError

__all__ = [
    "NEGATIVE_RGB",
    "POSITIVE_RGB",
    "clean_text",
    "diverging_color",
    "escape_text",
    "format_score",
    "svg_bar_chart",
    "svg_heatmap",
    "svg_line_plot",
]

#: Colour of the strongest positive influence (helps the completion): red.
POSITIVE_RGB: tuple[int, int, int] = (220, 38, 38)
#: Colour of the strongest negative influence (hurts the completion): blue.
NEGATIVE_RGB: tuple[int, int, int] = (37, 99, 235)

_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
_PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_CHAR_WIDTH = 0.6  # average glyph width as a fraction of the font size (estimate for layout)

# Characters that are neither valid XML 1.0 nor clean HTML text: C0 controls other than
# tab/newline/carriage return, DEL and C1 controls, lone surrogates, and noncharacters.
_BAD_CHARS = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]"
)
_VISIBLE_WS = {"\n": "↵\n", "\t": "⇥\t", "\r": "␍"}
_VISIBLE_WS_RE = re.compile("[\n\t\r]")


def _replace_bad(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # Unicode "control pictures": U+0007 -> ␇
    if code == 0x7F:
        return "␡"
    if code <= 0x9F:
        return f"\\x{code:02x}"
    return "\ufffd"


def clean_text(text: object, *, visible_whitespace: bool = False) -> str:
    """Make any text safe to place in HTML and XML (before escaping markup).

    Control characters become visible symbols (``"\\x07"`` -> ``"␇"``, C1 controls ->
    ``"\\x85"``), lone surrogates and noncharacters become ``"\\ufffd"``.

    Args:
        text: The text (anything; converted with ``str``).
        visible_whitespace: Also mark newlines (``"↵"`` followed by the newline), tabs (``"⇥"``)
            and carriage returns (``"␍"``), as wanted for tokens.

    Returns:
        The cleaned text; markup characters are *not* escaped yet (see :func:`escape_text`).
    """
    out = _BAD_CHARS.sub(_replace_bad, str(text))
    if visible_whitespace:
        out = _VISIBLE_WS_RE.sub(lambda m: _VISIBLE_WS[m.group()], out)
    return out


def escape_text(text: object, *, visible_whitespace: bool = False) -> str:
    """Clean ``text`` (see :func:`clean_text`) and escape ``& < > " '`` for HTML/XML.

    The result is safe both as element content and inside a double- or single-quoted attribute.

    Args:
        text: The text to escape.
        visible_whitespace: Mark newlines, tabs and carriage returns visibly.

    Returns:
        The escaped text.
    """
    return html.escape(clean_text(text, visible_whitespace=visible_whitespace), quote=True)


def format_score(value: float) -> str:
    """Format an influence score with an explicit sign and 4 significant digits.

    Args:
        value: The score.

    Returns:
        E.g. ``"+0.01234"``, ``"-1.5e-07"``, ``"nan"``.
    """
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    return f"{value:+.4g}"


def diverging_color(value: float, vmax: float) -> str:
    """Map a value to a hex colour on a white-centred red/blue scale.

    ``colour = white + t (end - white)`` with ``t = min(1, |value| / vmax)`` and ``end`` =
    :data:`POSITIVE_RGB` (red) for positive values, :data:`NEGATIVE_RGB` (blue) for negative ones.

    Args:
        value: The value to colour.
        vmax: The magnitude that gets the full colour (values beyond it are clipped).

    Returns:
        A colour such as ``"#f4b6b6"``; white (``"#ffffff"``) for zero, non-finite values or a
        non-positive ``vmax``.
    """
    t = color_strength(value, vmax)
    if t == 0.0:
        return "#ffffff"
    end = POSITIVE_RGB if value > 0 else NEGATIVE_RGB
    r, g, b = (round(255 + (c - 255) * t) for c in end)
    return f"#{r:02x}{g:02x}{b:02x}"


def color_strength(value: float, vmax: float) -> float:
    """Return the colour intensity ``t = min(1, |value| / vmax)`` in ``[0, 1]`` (0 if undefined)."""
    value, vmax = float(value), float(vmax)
    if not (math.isfinite(value) and math.isfinite(vmax)) or vmax <= 0 or value == 0:
        return 0.0
    return min(1.0, abs(value) / vmax)


# ------------------------------------------------------------------------------------------------
# Layout helpers
# ------------------------------------------------------------------------------------------------


def _n(x: float) -> str:
    """Format a coordinate compactly (XML attributes)."""
    text = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _text_width(text: str, font_size: float) -> float:
    return len(text) * font_size * _CHAR_WIDTH


def _shorten(text: str, max_chars: int) -> str:
    """Shorten with an ellipsis in the middle (keeps both ends of names like ``h.11.mlp.c_fc``)."""
    if max_chars < 3 or len(text) <= max_chars:
        return text if len(text) <= max(max_chars, 1) else text[: max(max_chars, 1)]
    head = (max_chars - 1) // 2
    tail = max_chars - 1 - head
    return text[:head] + "…" + text[len(text) - tail :]


def _open_svg(width: float, height: float, title: str, standalone: bool, cls: str) -> list[str]:
    ns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    label = escape_text(title) if title else cls
    return [
        f'<svg{ns} class="{cls}" width="{_n(width)}" height="{_n(height)}" '
        f'viewBox="0 0 {_n(width)} {_n(height)}" role="img" aria-label="{label}" '
        f'font-family="{_FONT}">',
        f"<title>{escape_text(title)}</title>" if title else "",
    ]


def _title_text(title: str, x: float, y: float) -> str:
    if not title:
        return ""
    return (
        f'<text x="{_n(x)}" y="{_n(y)}" font-size="13" font-weight="600" '
        f'fill="#1f2937">{escape_text(title)}</text>'
    )


def _empty_svg(title: str, width: float, standalone: bool, cls: str) -> str:
    parts = _open_svg(width, 48, title, standalone, cls)
    parts.append(_title_text(title, 4, 16))
    parts.append('<text x="4" y="38" font-size="12" fill="#6b7280">no data</text>')
    parts.append("</svg>")
    return "".join(parts)


def _check_len(name: str, expected: int, received: int, what: str) -> None:
    if expected != received:
        raise DataError(
            f"{name}: expected {expected} {what} (one per label), received {received}. "
            "Pass labels and values of the same length."
        )


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if math.isfinite(float(v))]


def _scale(v: float, lo: float, hi: float, a: float, b: float) -> float:
    """Map data value ``v`` in ``[lo, hi]`` linearly to pixels in ``[a, b]``."""
    return a + (v - lo) / (hi - lo) * (b - a)


def _row_label(x: float, y: float, font: float, label: str, max_chars: int) -> str:
    """Right-aligned row label ending at ``x`` (px), shortened, with the full text as tooltip."""
    return (
        f'<text x="{_n(x)}" y="{_n(y)}" font-size="{_n(font)}" '
        f'text-anchor="end" fill="#374151"><title>{escape_text(label)}</title>'
        f"{escape_text(_shorten(label, max_chars))}</text>"
    )


# ------------------------------------------------------------------------------------------------
# Bar chart
# ------------------------------------------------------------------------------------------------


class _BarLayout(NamedTuple):
    """Pixel geometry of a bar chart (all lengths in px)."""

    width: float
    height: float
    top: float  # y of the first row
    bottom: float  # margin under the last row
    row_h: float  # height of one row (bar plus gap)
    font: float  # font size of the labels and values
    stride: int  # label every `stride`-th bar
    label_w: float  # width of the label column, left of the bars
    max_chars: int  # label length that fits in the label column
    x0: float  # left end of the bar area
    x1: float  # right end of the bar area (the value column follows)


def _bar_layout(labels: list[str], width: float, height: float | None, title: str) -> _BarLayout:
    """Size rows, fonts and columns for ``len(labels)`` (>= 1) bars."""
    n = len(labels)
    top = 26.0 if title else 6.0
    bottom = 6.0
    if height is None:
        row_h = 18.0 if n <= 24 else max(7.0, 18.0 * 24 / n)
        height = top + n * row_h + bottom
    else:
        row_h = max(1.0, (height - top - bottom) / n)
    font = max(8.5, min(11.0, row_h * 0.72))
    stride = max(1, math.ceil((font + 1) / row_h))  # label every `stride`-th bar if rows are thin

    value_w = 6 + _text_width("+0.0000e-00", font)
    longest = max(_text_width(label, font) for label in labels)
    label_w = min(0.42 * width, max(36.0, longest + 8))
    max_chars = int((label_w - 8) / (font * _CHAR_WIDTH))
    return _BarLayout(
        width,
        height,
        top,
        bottom,
        row_h,
        font,
        stride,
        label_w,
        max_chars,
        label_w,
        width - value_w,
    )


def _bar_range(values: list[float]) -> tuple[float, float]:
    """Data range of the bars: the finite values and zero, never empty."""
    finite = _finite(values)
    lo = min([0.0, *finite])
    hi = max([0.0, *finite])
    if hi == lo:
        hi = lo + 1.0
    return lo, hi


def _bar_row(i: int, label: str, value: float, lay: _BarLayout, lo: float, hi: float) -> list[str]:
    """Bar ``i`` (skipped when non-finite), then its label and value text on labelled rows."""
    parts = []
    y = lay.top + i * lay.row_h  # top of the row, px
    zero = _scale(0.0, lo, hi, lay.x0, lay.x1)
    if math.isfinite(value):
        bar_h = max(1.0, lay.row_h * 0.74)
        tip = f"{escape_text(label)}: {format_score(value)}"
        xv = _scale(value, lo, hi, lay.x0, lay.x1)
        colour = diverging_color(value, abs(value)) if value != 0 else "#9ca3af"
        parts.append(
            f'<rect x="{_n(min(zero, xv))}" y="{_n(y + (lay.row_h - bar_h) / 2)}" '
            f'width="{_n(max(abs(xv - zero), 0.5))}" height="{_n(bar_h)}" fill="{colour}">'
            f"<title>{tip}</title></rect>"
        )
    if i % lay.stride == 0:
        ty = y + lay.row_h / 2 + lay.font * 0.35  # text baseline, px
        parts.append(_row_label(lay.label_w - 6, ty, lay.font, label, lay.max_chars))
        parts.append(
            f'<text x="{_n(lay.width - 2)}" y="{_n(ty)}" font-size="{_n(lay.font)}" '
            f'text-anchor="end" fill="#374151" font-variant-numeric="tabular-nums">'
            f"{escape_text(format_score(value))}</text>"
        )
    return parts


def svg_bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    width: float = 480,
    height: float | None = None,
    title: str = "",
    standalone: bool = False,
) -> str:
    """Draw a horizontal bar chart, one bar per label, from a zero line.

    Positive bars are red, negative ones blue; each bar has a tooltip with its label and value,
    and the value is printed in a right-hand column. Long labels are shortened in the middle.

    Args:
        labels: Bar labels (e.g. layer names), top to bottom.
        values: One value per label; non-finite values are drawn as an empty bar marked ``nan``.
        width: Width of the SVG in pixels.
        height: Height in pixels; ``None`` sizes it from the number of bars.
        title: Title drawn above the chart (also the accessible name).
        standalone: Add the SVG namespace so the string can be saved as an ``.svg`` file.

    Returns:
        The SVG markup.

    Raises:
        DataError: If ``labels`` and ``values`` differ in length.

    Example:
        >>> svg = svg_bar_chart(["h.0", "h.1"], [0.5, -0.2], title="per layer")
        >>> svg.startswith("<svg") and svg.endswith("</svg>")
        True
    """
    labels = [str(label) for label in labels]
    values = [float(v) for v in values]
    _check_len("svg_bar_chart", len(labels), len(values), "values")
    if not labels:
        return _empty_svg(title, width, standalone, "bar-chart")

    lay = _bar_layout(labels, width, height, title)
    lo, hi = _bar_range(values)
    parts = _open_svg(width, lay.height, title, standalone, "bar-chart")
    parts.append(_title_text(title, 2, 16))
    for i, (label, value) in enumerate(zip(labels, values)):
        parts.extend(_bar_row(i, label, value, lay, lo, hi))
    zero = _scale(0.0, lo, hi, lay.x0, lay.x1)
    y1, y2 = lay.top - 2, lay.height - lay.bottom + 2
    parts.append(
        f'<line x1="{_n(zero)}" y1="{_n(y1)}" x2="{_n(zero)}" y2="{_n(y2)}" '
        f'stroke="#6b7280" stroke-width="1"/>'
    )
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------
# Heatmap
# ------------------------------------------------------------------------------------------------

_MAX_COL_CHARS = 24  # column labels are shortened to this many characters
_LEGEND_STEPS = 11  # colour swatches in the heatmap legend, from -vmax to +vmax
_SWATCH_W = 16.0  # width of one swatch, px
_LEGEND_CAPTION = "red: helps the completion · blue: hurts it"


class _HeatLayout(NamedTuple):
    """Pixel geometry of a heatmap (all lengths in px)."""

    width: float
    height: float
    top: float  # y of the grid (title and legend band above it)
    label_w: float  # width of the row-label column; the grid starts at this x
    cw: float  # cell width
    ch: float  # cell height
    row_font: float
    col_font: float
    row_stride: int  # label every `row_stride`-th row
    col_stride: int  # label every `col_stride`-th column
    max_row_chars: int  # row label length that fits in the label column
    grid_w: float  # cw * columns
    grid_h: float  # ch * rows


def _check_matrix(rows: list[str], cols: list[str], matrix: list[list[float]]) -> None:
    """Raise :class:`DataError` unless ``matrix`` is ``len(rows) x len(cols)``."""
    shape = [len(r) for r in matrix]
    if len(matrix) != len(rows) or any(k != len(cols) for k in shape):
        raise DataError(
            f"svg_heatmap: expected a {len(rows)} x {len(cols)} value matrix (one row per row "
            f"label, one value per column label), received row lengths {shape}."
        )


def _heat_layout(
    rows: list[str],
    cols: list[str],
    title: str,
    cell_width: float | None,
    cell_height: float | None,
) -> _HeatLayout:
    """Size cells, fonts, label strides and the canvas for a non-empty grid."""
    cw = cell_width or min(48.0, max(6.0, 720.0 / len(cols)))
    ch = cell_height or (16.0 if len(rows) <= 40 else max(4.0, 640.0 / len(rows)))
    row_font = max(8.5, min(11.0, ch * 0.75))
    col_font = max(8.5, min(11.0, cw * 0.75))
    # Label every k-th row / column when cells are thinner than the text (45° labels are spaced
    # by cw / sqrt(2)).
    row_stride = max(1, math.ceil((row_font + 1) / ch))
    col_stride = max(1, math.ceil((col_font + 1) / (cw * math.sqrt(0.5))))

    label_w = min(240.0, max(_text_width(r, row_font) for r in rows) + 10)
    max_row_chars = int((label_w - 10) / (row_font * _CHAR_WIDTH))
    col_h = min(
        _text_width("x" * _MAX_COL_CHARS, col_font), max(_text_width(c, col_font) for c in cols)
    )
    col_h = col_h * math.sqrt(0.5) + col_font + 6  # height of the 45° column-label band

    top = (26.0 if title else 6.0) + 30.0  # title, then the legend band
    grid_w = cw * len(cols)
    grid_h = ch * len(rows)
    legend_w = _LEGEND_STEPS * _SWATCH_W + 8 + _text_width(_LEGEND_CAPTION, 10) + 4
    width = max(label_w + grid_w + col_h + 8, label_w + legend_w)  # the legend is never cut
    height = top + grid_h + col_h
    return _HeatLayout(
        width,
        height,
        top,
        label_w,
        cw,
        ch,
        row_font,
        col_font,
        row_stride,
        col_stride,
        max_row_chars,
        grid_w,
        grid_h,
    )


def _colour_bar(scale: float, lx: float, ly: float) -> list[str]:
    """Legend at ``(lx, ly)``: swatches from ``-scale`` to ``+scale``, three values, a caption."""
    steps, sw = _LEGEND_STEPS, _SWATCH_W
    parts = []
    for k in range(steps):
        v = scale * (2 * k / (steps - 1) - 1)
        parts.append(
            f'<rect x="{_n(lx + k * sw)}" y="{_n(ly)}" width="{_n(sw)}" height="10" '
            f'fill="{diverging_color(v, scale)}" stroke="#d1d5db" stroke-width="0.5"/>'
        )
    for k, anchor in ((0, "start"), ((steps - 1) // 2, "middle"), (steps - 1, "end")):
        v = scale * (2 * k / (steps - 1) - 1)
        x = lx + k * sw + (0 if anchor == "start" else sw if anchor == "end" else sw / 2)
        parts.append(
            f'<text x="{_n(x)}" y="{_n(ly + 21)}" font-size="9" text-anchor="{anchor}" '
            f'fill="#4b5563">{escape_text(format_score(v))}</text>'
        )
    parts.append(
        f'<text x="{_n(lx + steps * sw + 8)}" y="{_n(ly + 9)}" font-size="10" fill="#4b5563">'
        f"{_LEGEND_CAPTION}</text>"
    )
    return parts


def _cell_grid(
    rows: list[str], cols: list[str], matrix: list[list[float]], scale: float, lay: _HeatLayout
) -> list[str]:
    """One tooltipped cell per value (grey when non-finite), row by row, plus the row labels."""
    parts = []
    for r, (label, row) in enumerate(zip(rows, matrix)):
        y = lay.top + r * lay.ch  # top of the row, px
        for c, value in enumerate(row):
            fill = diverging_color(value, scale) if math.isfinite(value) else "#d1d5db"
            tip = f"{escape_text(label)} · {escape_text(cols[c])}: {format_score(value)}"
            parts.append(
                f'<rect x="{_n(lay.label_w + c * lay.cw)}" y="{_n(y)}" width="{_n(lay.cw)}" '
                f'height="{_n(lay.ch)}" fill="{fill}"><title>{tip}</title></rect>'
            )
        if r % lay.row_stride == 0:
            ty = y + lay.ch / 2 + lay.row_font * 0.35  # text baseline, px
            parts.append(_row_label(lay.label_w - 5, ty, lay.row_font, label, lay.max_row_chars))
    parts.append(
        f'<rect x="{_n(lay.label_w)}" y="{_n(lay.top)}" width="{_n(lay.grid_w)}" '
        f'height="{_n(lay.grid_h)}" fill="none" stroke="#9ca3af" stroke-width="0.5"/>'
    )
    return parts


def _col_labels(cols: list[str], lay: _HeatLayout) -> list[str]:
    """Column labels under the grid, rotated 45°, on every ``col_stride``-th column."""
    parts = []
    base = lay.top + lay.grid_h + 4  # y where the rotated labels hang from, px
    for c, label in enumerate(cols):
        if c % lay.col_stride:
            continue
        x = lay.label_w + c * lay.cw + lay.cw / 2  # column centre, px
        parts.append(
            f'<text x="{_n(x)}" y="{_n(base)}" font-size="{_n(lay.col_font)}" fill="#374151" '
            f'transform="rotate(45 {_n(x)} {_n(base)})" dominant-baseline="hanging">'
            f"<title>{escape_text(label)}</title>"
            f"{escape_text(_shorten(label, _MAX_COL_CHARS))}</text>"
        )
    return parts


def svg_heatmap(
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    values: Sequence[Sequence[float]],
    *,
    title: str = "",
    vmax: float | None = None,
    cell_width: float | None = None,
    cell_height: float | None = None,
    standalone: bool = False,
) -> str:
    """Draw a heatmap on a diverging red/blue scale symmetric around zero.

    Cell ``(r, c)`` is coloured with :func:`diverging_color` ``(values[r][c], vmax)``; its tooltip
    gives the row, the column and the value. Column labels are written at 45 degrees below the
    grid; a colour legend sits above it.

    Args:
        row_labels: One label per row (e.g. layers), top to bottom.
        col_labels: One label per column (e.g. training sequences), left to right.
        values: ``values[r][c]``, ``len(row_labels)`` rows of ``len(col_labels)`` values.
        title: Title drawn above the chart.
        vmax: Magnitude of the full colour; default ``max |value|`` over the finite values.
        cell_width: Cell width in pixels; default fits about 720 px of columns (6 to 48 px each).
        cell_height: Cell height in pixels; default 16, smaller for more than 40 rows.
        standalone: Add the SVG namespace so the string can be saved as an ``.svg`` file.

    Returns:
        The SVG markup.

    Raises:
        DataError: If ``values`` does not have the shape given by the labels.

    Example:
        >>> svg = svg_heatmap(["h.0", "h.1"], ["#3", "#7"], [[0.1, -0.2], [0.0, 0.4]])
        >>> svg.count("<rect") >= 4
        True
    """
    rows = [str(label) for label in row_labels]
    cols = [str(label) for label in col_labels]
    matrix = [[float(v) for v in row] for row in values]
    _check_matrix(rows, cols, matrix)
    if not rows or not cols:
        return _empty_svg(title, 320, standalone, "heatmap")

    finite = [abs(v) for v in _finite([v for row in matrix for v in row])]
    scale = float(vmax) if vmax is not None else max(finite, default=0.0)
    lay = _heat_layout(rows, cols, title, cell_width, cell_height)
    parts = _open_svg(lay.width, lay.height, title, standalone, "heatmap")
    parts.append(_title_text(title, 2, 16))
    parts.extend(_colour_bar(scale, lay.label_w, lay.top - 28))
    parts.extend(_cell_grid(rows, cols, matrix, scale, lay))
    parts.extend(_col_labels(cols, lay))
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------
# Line plot
# ------------------------------------------------------------------------------------------------

_Segment = list[tuple[float, float]]  # consecutive drawable points (x, y), in axis units


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * mag >= raw * (1 - 1e-9):
            return m * mag
    return 10 * mag


def _linear_axis(lo: float, hi: float, target: int = 5) -> tuple[float, float, list[float]]:
    """Return a padded range and 'nice' tick positions (multiples of 1, 2, 2.5 or 5 x 10^k)."""
    if hi <= lo:
        pad = abs(lo) * 0.5 if lo != 0 else 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target)
    lo2 = math.floor(lo / step + 1e-9) * step
    hi2 = math.ceil(hi / step - 1e-9) * step
    count = round((hi2 - lo2) / step)
    ticks = [lo2 + k * step for k in range(count + 1)]
    return lo2, hi2, ticks


def _log_axis(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """Range and ticks in log10 space: whole decades around the data."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if b <= a:
        b = a + 1
    stride = max(1, math.ceil((b - a) / 8))
    return float(a), float(b), [float(k) for k in range(a, b + 1, stride)]


def _axis(values: list[float], log: bool) -> tuple[float, float, list[float]]:
    """Range and ticks, in axis units (log10 on a log axis), for the drawable ``values``."""
    if log:
        return _log_axis(10 ** min(values), 10 ** max(values))
    return _linear_axis(min(values), max(values))


def _tick_label(value: float, log: bool) -> str:
    if log:
        k = round(value)
        return f"{10.0**k:g}" if -3 <= k <= 4 else f"1e{k}"
    if abs(value) < 1e-12:
        return "0"
    return f"{value:.4g}"


def _segments(xs: Sequence[float], ys: Sequence[float], log_x: bool, log_y: bool) -> list[_Segment]:
    """Split one series at undrawable points into non-empty segments, in axis units."""
    segments: list[_Segment] = [[]]
    for x, y in zip(xs, ys):
        x, y = float(x), float(y)
        ok = math.isfinite(x) and math.isfinite(y)
        ok = ok and not (log_x and x <= 0) and not (log_y and y <= 0)
        if ok:
            segments[-1].append((math.log10(x) if log_x else x, math.log10(y) if log_y else y))
        elif segments[-1]:
            segments.append([])
    return [s for s in segments if s]


def _series_segments(
    xs_list: Sequence[Sequence[float]],
    ys_list: Sequence[Sequence[float]],
    labels: Sequence[str],
    log_x: bool,
    log_y: bool,
) -> list[list[_Segment]]:
    """Check the series lengths and return series -> segments -> points (axis units)."""
    _check_len("svg_line_plot", len(labels), len(xs_list), "x series")
    _check_len("svg_line_plot", len(labels), len(ys_list), "y series")
    series = []
    for k, (xs, ys) in enumerate(zip(xs_list, ys_list)):
        if len(xs) != len(ys):
            raise DataError(
                f"svg_line_plot: series {k} ({labels[k]!r}) has {len(xs)} x values and "
                f"{len(ys)} y values; expected the same number."
            )
        series.append(_segments(xs, ys, log_x, log_y))
    return series


class _Plot(NamedTuple):
    """Plot area (px) and the axis ranges (axis units) it shows."""

    left: float
    top: float
    pw: float  # plot area width
    ph: float  # plot area height
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float

    def px(self, x: float) -> float:
        """x in axis units -> px."""
        return self.left + (x - self.x_lo) / (self.x_hi - self.x_lo) * self.pw

    def py(self, y: float) -> float:
        """y in axis units -> px (upwards)."""
        return self.top + self.ph - (y - self.y_lo) / (self.y_hi - self.y_lo) * self.ph


def _axis_frame(
    plot: _Plot, x_ticks: list[float], y_ticks: list[float], log_x: bool, log_y: bool
) -> list[str]:
    """White plot area with a grid line and a label at every tick of both axes."""
    left, top, pw, ph = plot.left, plot.top, plot.pw, plot.ph
    parts = [
        f'<rect x="{_n(left)}" y="{_n(top)}" width="{_n(pw)}" height="{_n(ph)}" '
        'fill="#ffffff" stroke="#9ca3af" stroke-width="1"/>'
    ]
    for t in x_ticks:
        x = plot.px(t)
        parts.append(
            _grid_line(x, top, x, top + ph)
            + _tick_text(x, top + ph + 14, "middle", _tick_label(t, log_x))
        )
    for t in y_ticks:
        y = plot.py(t)
        parts.append(
            _grid_line(left, y, left + pw, y)
            + _tick_text(left - 5, y + 3.5, "end", _tick_label(t, log_y))
        )
    return parts


def _grid_line(x1: float, y1: float, x2: float, y2: float) -> str:
    """Light grid line from ``(x1, y1)`` to ``(x2, y2)`` (px)."""
    return (
        f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" '
        'stroke="#e5e7eb" stroke-width="1"/>'
    )


def _tick_text(x: float, y: float, anchor: str, text: str) -> str:
    """Tick label at ``(x, y)`` (px)."""
    return (
        f'<text x="{_n(x)}" y="{_n(y)}" font-size="10" text-anchor="{anchor}" '
        f'fill="#4b5563">{escape_text(text)}</text>'
    )


def _axis_labels(plot: _Plot, x_label: str, y_label: str, height: float) -> list[str]:
    """Axis titles: under the x axis, and rotated beside the y axis."""
    parts = []
    if x_label:
        parts.append(
            f'<text x="{_n(plot.left + plot.pw / 2)}" y="{_n(height - 8)}" font-size="11" '
            f'text-anchor="middle" fill="#1f2937">{escape_text(x_label)}</text>'
        )
    if y_label:
        cy = plot.top + plot.ph / 2
        parts.append(
            f'<text x="14" y="{_n(cy)}" font-size="11" text-anchor="middle" fill="#1f2937" '
            f'transform="rotate(-90 14 {_n(cy)})">{escape_text(y_label)}</text>'
        )
    return parts


def _series_lines(series: list[list[_Segment]], labels: Sequence[str], plot: _Plot) -> list[str]:
    """One polyline per segment, coloured per series; markers when a series has <= 60 points."""
    parts = []
    for k, segs in enumerate(series):
        colour = _PALETTE[k % len(_PALETTE)]
        name = escape_text(labels[k])
        n_points = sum(len(seg) for seg in segs)
        for seg in segs:
            coords = " ".join(f"{_n(plot.px(x))},{_n(plot.py(y))}" for x, y in seg)
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.8" '
                f'stroke-linejoin="round"><title>{name}</title></polyline>'
            )
            if n_points <= 60:
                parts.extend(
                    f'<circle cx="{_n(plot.px(x))}" cy="{_n(plot.py(y))}" r="2.5" fill="{colour}"/>'
                    for x, y in seg
                )
    return parts


def _legend_box(labels: Sequence[str], plot: _Plot) -> list[str]:
    """Legend in the top-right corner of the plot, for the series with a non-empty label."""
    shown = [(k, str(label)) for k, label in enumerate(labels) if str(label)]
    if not shown:
        return []
    font = 10.0
    box_w = max(_text_width(label, font) for _, label in shown) + 34
    box_w = min(box_w, plot.pw * 0.6)  # px; 34 = sample line plus padding
    max_chars = int((box_w - 34) / (font * _CHAR_WIDTH))
    bx, by = plot.left + plot.pw - box_w - 6, plot.top + 6
    parts = [
        f'<rect x="{_n(bx)}" y="{_n(by)}" width="{_n(box_w)}" '
        f'height="{_n(len(shown) * 15 + 6)}" fill="#ffffff" fill-opacity="0.9" '
        'stroke="#d1d5db" stroke-width="0.5"/>'
    ]
    for i, (k, label) in enumerate(shown):
        y = by + 12 + i * 15  # baseline of entry i, px
        colour = _PALETTE[k % len(_PALETTE)]
        parts.append(
            f'<line x1="{_n(bx + 6)}" y1="{_n(y - 3.5)}" x2="{_n(bx + 24)}" y2="{_n(y - 3.5)}" '
            f'stroke="{colour}" stroke-width="2"/>'
            f'<text x="{_n(bx + 28)}" y="{_n(y)}" font-size="{_n(font)}" fill="#1f2937">'
            f"{escape_text(_shorten(label, max_chars))}</text>"
        )
    return parts


def svg_line_plot(
    xs_list: Sequence[Sequence[float]],
    ys_list: Sequence[Sequence[float]],
    labels: Sequence[str],
    *,
    log_x: bool = False,
    log_y: bool = False,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    width: float = 560,
    height: float = 360,
    standalone: bool = False,
) -> str:
    """Draw one polyline per series, with optional logarithmic axes.

    Meant for curves such as the tail of the influence distribution (rank vs. score on log-log
    axes, where a power law is a straight line). Points that cannot be drawn (non-finite, or
    ``<= 0`` on a log axis) are skipped and break the line there. Series with at most 60 points
    also get markers.

    Args:
        xs_list: One sequence of x values per series.
        ys_list: One sequence of y values per series, each as long as its x values.
        labels: One legend label per series (an empty string hides it from the legend).
        log_x: Logarithmic x axis (ticks at whole decades).
        log_y: Logarithmic y axis (ticks at whole decades).
        title: Title drawn above the plot.
        x_label: Axis label under the x axis.
        y_label: Axis label beside the y axis.
        width: Width of the SVG in pixels.
        height: Height of the SVG in pixels.
        standalone: Add the SVG namespace so the string can be saved as an ``.svg`` file.

    Returns:
        The SVG markup (a "no data" placeholder when nothing can be drawn).

    Raises:
        DataError: If the numbers of series, labels, or x and y values disagree.

    Example:
        >>> svg = svg_line_plot([[1, 10, 100]], [[1.0, 0.1, 0.01]], ["tail"], log_x=True, log_y=True)
        >>> "<polyline" in svg
        True
    """
    series = _series_segments(xs_list, ys_list, labels, log_x, log_y)
    points = [p for segs in series for seg in segs for p in seg]
    if not points:
        return _empty_svg(title, width, standalone, "line-plot")

    x_lo, x_hi, x_ticks = _axis([p[0] for p in points], log_x)
    y_lo, y_hi, y_ticks = _axis([p[1] for p in points], log_y)
    left, right = 64.0, 14.0  # margins, px
    top = 28.0 if title else 12.0
    bottom = 44.0 if x_label else 28.0
    pw, ph = width - left - right, height - top - bottom
    plot = _Plot(left, top, pw, ph, x_lo, x_hi, y_lo, y_hi)

    parts = _open_svg(width, height, title, standalone, "line-plot")
    parts.append(_title_text(title, 2, 17))
    parts.extend(_axis_frame(plot, x_ticks, y_ticks, log_x, log_y))
    parts.extend(_axis_labels(plot, x_label, y_label, height))
    parts.extend(_series_lines(series, labels, plot))
    parts.extend(_legend_box(labels, plot))
    parts.append("</svg>")
    return "".join(parts)
