"""Tests of the HTML report: escaping, colours, valid markup, self-containment, atomic writes."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from influscope.errors import DataError
from influscope.report import (
    QueryView,
    ReportView,
    Section,
    SequenceView,
    html_figure,
    html_table,
    render_html,
    svg_bar_chart,
    svg_heatmap,
    svg_line_plot,
    write_report,
)

EVIL_TOKEN = "<script>alert(1)</script>"
EVIL_PROMPT = 'Say "&<>" now'
EVIL_META = "</script><script>alert(2)</script>"

VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}


class StrictChecker(HTMLParser):
    """Collects tags and checks that every element is closed in order (a well-formedness check)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.start_tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.doctype = False

    def handle_decl(self, decl: str) -> None:
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.start_tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = True
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.start_tags.append((tag, dict(attrs)))  # <rect .../> in inline SVG

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def check_html(page: str) -> StrictChecker:
    checker = StrictChecker()
    checker.feed(page)
    checker.close()
    assert checker.doctype
    assert not checker.errors, checker.errors
    assert not checker.stack, f"unclosed elements: {checker.stack}"
    return checker


def seq(index: int, tokens: list[str], scores: list[float], **meta: str) -> SequenceView:
    return SequenceView(
        index=index, score=sum(scores), tokens=tokens, token_scores=scores, meta=meta
    )


@pytest.fixture
def report() -> ReportView:
    pro = seq(
        7,
        ["The", " capital", " is", " Paris", EVIL_TOKEN, "\n", "\tend"],
        [0.1, 0.2, 0.0, 1.5, 0.3, 0.05, -0.1],
        source="hamlet",
        fact_id="3",
        note=EVIL_META,
    )
    opp = seq(42, ["Lyon", " is", " big"], [-0.8, -0.1, 0.05], source="<wiki>")
    query = QueryView(
        name="capital <fr>",
        prompt=EVIL_PROMPT,
        completion=" Paris",
        proponents=[pro],
        opponents=[opp],
        layer_scores={"h.0.mlp<c_fc>": 0.7, "h.1.attn": -0.2, "h.1.mlp": 1.1},
        notes={"planted fact": "yes", "top-1 correct": "no"},
    )
    empty = QueryView(
        name="nothing",
        prompt="p",
        completion="c",
        proponents=[],
        opponents=[],
        layer_scores={},
        notes={},
    )
    section = Section(
        title="Sparsity <study>",
        html=html_table(["k", "share"], [["<top-1>", 0.5], ["top-10", 0.9]])
        + html_figure(
            svg_line_plot(
                [[1, 10, 100]],
                [[1.0, 0.1, 0.01]],
                ["tail"],
                log_x=True,
                log_y=True,
                title="tail",
                x_label="rank",
                y_label="|I|",
            )
        ),
    )
    return ReportView(
        title="influscope <report> & co",
        overview={"model": "gpt2 & <friends>", "n_train": "1000", "curvature": "ekfac"},
        queries=[query, empty],
        sections=[section],
        layer_heatmap=(["h.0", "h.1<x>"], ["#7", "#42"], [[0.4, -0.3], [1.1, -0.5]]),
    )


def test_escaping_of_tokens_prompts_and_meta(report: ReportView) -> None:
    page = render_html(report)
    assert EVIL_TOKEN not in page
    assert "alert(1)" in page  # the token is shown ...
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # ... escaped
    assert EVIL_PROMPT not in page
    assert "Say &quot;&amp;&lt;&gt;&quot; now" in page
    assert EVIL_META not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(2)" in page
    for raw in ("<wiki>", "<fr>", "<friends>", "<report>", "<study>", "<top-1>", "<c_fc>", "<x>"):
        assert raw not in page, raw
    checker = check_html(page)
    # Exactly one script element (ours), closed properly, with no markup inside.
    assert [t for t, _ in checker.start_tags].count("script") == 1
    assert len(checker.scripts) == 1 and "<" not in checker.scripts[0]


def test_page_is_self_contained(report: ReportView) -> None:
    page = render_html(report)
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page
    checker = check_html(page)
    for tag, attrs in checker.start_tags:
        assert "src" not in attrs, tag
        if tag == "a":
            assert (attrs.get("href") or "").startswith("#")


def test_legend_states_sign_convention(report: ReportView) -> None:
    page = render_html(report)
    assert "log p(completion | prompt)" in page
    assert "up-weighting the training sequence" in page


def _rgb(style: str) -> tuple[int, int, int]:
    m = re.search(r"background:#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})", style)
    assert m, style
    return int(m[1], 16), int(m[2], 16), int(m[3], 16)


def test_token_colours(report: ReportView) -> None:
    checker = check_html(render_html(report))
    tokens = {}
    for tag, attrs in checker.start_tags:
        if tag == "span" and "tok" in (attrs.get("class") or "").split():
            tokens.setdefault(attrs.get("title"), attrs)
    # " Paris" (+1.5) is the strongest token of its sequence: full red, white text.
    paris = tokens["+1.5 (token 3)"]
    r, g, b = _rgb(paris["style"])
    assert r > 200 and r > b + 100 and r > g + 100
    assert "strong" in paris["class"]
    # A weak positive token is light red.
    r, g, b = _rgb(tokens["+0.1 (token 0)"]["style"])
    assert r > b and r > g and min(r, g, b) > 200
    # Negative tokens are blue-ish.
    r, g, b = _rgb(tokens["-0.8 (token 0)"]["style"])
    assert b > r + 100 and b > g
    r, g, b = _rgb(tokens["-0.1 (token 6)"]["style"])
    assert b > r and b > g
    # A zero-influence token gets no colour.
    assert "style" not in tokens["0 (token 2)"]


def test_whitespace_is_visible(report: ReportView) -> None:
    page = render_html(report)
    assert "↵\n" in page
    assert "⇥\tend" in page
    assert "white-space: pre-wrap" in page


def test_control_characters_are_made_visible() -> None:
    s = seq(0, ["a\x00b", "\x1b[31m", "\ud800", ""], [1.0, 0.5, 0.1, 0.0])
    q = QueryView("q", "p\x07", "c", [s], [], {}, {})
    page = render_html(ReportView("t", {}, [q], [], None))
    assert "\x00" not in page and "\x1b" not in page and "\x07" not in page
    assert "a␀b" in page and "␛[31m" in page and "p␇" in page
    page.encode("utf-8")  # no lone surrogates left
    check_html(page)


def test_svg_charts_are_valid_xml() -> None:
    bar = svg_bar_chart(["a<b", "c&d", 'e"f'], [1.0, -2.0, float("nan")], width=300, title="<t>")
    heat = svg_heatmap(
        ["r<1>", "r&2"], ["c'1", 'c"2', "c3"], [[1, -1, 0], [0.5, float("inf"), 2]], title="h & m"
    )
    line = svg_line_plot(
        [[1, 2, 3, 4], [0, 1, 10]],
        [[1e3, 1e2, 0.0, 1.0], [5, 4, 3]],
        ["power <law>", ""],
        log_x=True,
        log_y=True,
        title="tail & more",
        x_label="rank <k>",
        y_label="|I|",
    )
    lin = svg_line_plot([[0, 1, 2]], [[-1.0, 0.0, 3.0]], ["lin"], title="linear")
    for svg in (bar, heat, line, lin):
        root = ET.fromstring(svg)
        assert root.tag == "svg"
        assert "http" not in svg
    assert "a&lt;b" in bar and "c&amp;d" in bar and "<t>" not in bar
    assert "r&lt;1&gt;" in heat
    assert ET.fromstring(heat).findall(".//rect")  # cells drawn
    assert "power &lt;law&gt;" in line
    assert line.count("<polyline") >= 2  # the zero on the log axis splits the first series
    standalone = svg_bar_chart(["a"], [1.0], standalone=True, title="s")
    assert ET.fromstring(standalone).tag == "{http://www.w3.org/2000/svg}svg"


def test_svg_colours_and_empty_inputs() -> None:
    bar = svg_bar_chart(["up", "down"], [1.0, -1.0], title="x")
    fills = re.findall(r'<rect [^>]*fill="#([0-9a-f]{6})"', bar)
    (r1, _, b1), (r2, _, b2) = (tuple(int(f[i : i + 2], 16) for i in (0, 2, 4)) for f in fills)
    assert r1 > b1 and b2 > r2
    for svg in (
        svg_bar_chart([], [], title="empty"),
        svg_heatmap([], [], [], title="empty"),
        svg_line_plot([], [], [], title="empty"),
        svg_line_plot([[0, -1]], [[1, 2]], ["all dropped"], log_x=True),
    ):
        assert "no data" in svg
        ET.fromstring(svg)


def test_shape_errors_are_clear() -> None:
    with pytest.raises(DataError, match="expected 2 values"):
        svg_bar_chart(["a", "b"], [1.0])
    with pytest.raises(DataError, match="2 x 2"):
        svg_heatmap(["a", "b"], ["x", "y"], [[1.0, 2.0], [3.0]])
    with pytest.raises(DataError, match="same number"):
        svg_line_plot([[1, 2]], [[1]], ["s"])
    with pytest.raises(DataError, match="one token score per token"):
        SequenceView(0, 1.0, ["a", "b"], [1.0], {})
    with pytest.raises(DataError, match="layer_heatmap"):
        ReportView("t", {}, [], [], (["l"], ["s1", "s2"], [[1.0]]))


def test_heatmap_and_bar_chart_in_page(report: ReportView) -> None:
    page = render_html(report)
    assert page.count("<svg") == 3  # 1 layer chart (the empty query has none), heatmap, line plot
    assert "h.0.mlp&lt;c_fc&gt;" in page
    assert "Influence by layer and sequence" in page
    assert "Sparsity &lt;study&gt;" in page


def test_empty_lists_render() -> None:
    q = QueryView("q", "prompt", " completion", [], [], {}, {})
    page = render_html(ReportView("t", {}, [q], [], None))
    assert "No proponents." in page and "No opponents." in page
    check_html(page)
    check_html(render_html(ReportView("empty", {}, [], [], None)))
    # Tokens without per-token scores are shown uncoloured.
    s = SequenceView(1, 0.5, ["x", "y"], [], {})
    page = render_html(ReportView("t", {}, [QueryView("q", "p", "c", [s], [], {}, {})], [], None))
    toks = [a for t, a in check_html(page).start_tags if t == "span" and a.get("class") == "tok"]
    assert len(toks) == 2 and all("style" not in a for a in toks)


def test_write_report_is_atomic(tmp_path: Path, report: ReportView) -> None:
    dest = tmp_path / "sub" / "report.html"
    out = write_report(report, dest)
    assert out == dest and dest.read_text(encoding="utf-8") == render_html(report)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["report.html"]
    assert dest.stat().st_mode & 0o777 == 0o644

    # Overwrite: the new content replaces the old one in one step (a new inode, no temp left).
    old_inode = dest.stat().st_ino
    small = ReportView("second", {}, [], [], None)
    write_report(small, str(dest))
    assert "second" in dest.read_text(encoding="utf-8")
    assert dest.stat().st_ino != old_inode
    assert sorted(p.name for p in dest.parent.iterdir()) == ["report.html"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_report_honours_the_umask(tmp_path: Path, report: ReportView, umask, mode) -> None:
    old = os.umask(umask)
    try:
        dest = write_report(report, tmp_path / f"r{umask:o}.html")
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == mode


def test_write_report_failure_keeps_old_file(
    tmp_path: Path, report: ReportView, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "report.html"
    write_report(report, dest)
    before = dest.read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_report(ReportView("other", {}, [], [], None), dest)
    assert dest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
