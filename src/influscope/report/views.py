"""What a report shows: plain, frozen dataclasses, free of tensors.

The scoring and analysis stages turn their results into these views; :mod:`influscope.report.html`
renders them. Keeping the views plain Python (strings, floats, lists, dicts) lets the report be
built, tested and serialised without torch.

Sign convention, shared by every score in a view: a **positive** influence means that up-weighting
the training sequence *increases* the query's measurement ``log p(completion | prompt)``, i.e. the
sequence helps the completion (a *proponent*); a **negative** one means it lowers it (an
*opponent*).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from influscope.errors import DataError

__all__ = ["QueryView", "ReportView", "Section", "SequenceView"]


@dataclass(frozen=True)
class SequenceView:
    """One training sequence as shown under a query.

    Attributes:
        index: Position of the sequence in the training set.
        score: Its influence on the query (positive = helps the completion).
        tokens: Decoded tokens; any characters (including markup such as ``"<script>"``),
            they are escaped when rendered.
        token_scores: Per-token influence, same length as ``tokens`` and summing to ``score``.
            May be empty when per-token influence was not computed; the tokens are then shown
            uncoloured.
        meta: Free-form string metadata, e.g. ``{"source": "hamlet", "fact_id": "3"}``.
        sem: Standard error of ``score`` over ensemble members (``score`` is then their mean),
            or ``None`` without an ensemble.
        stable: In how many of the ``n_members`` members' own top-k the sequence appears, or
            ``None``.
        n_members: Ensemble size ``M``, or ``None``.
        text: The record's text as written in its file (``prompt + completion`` for a
            pair), shown where a one-line excerpt is wanted; ``""`` falls back to the tokens.

    Raises:
        DataError: If ``token_scores`` is neither empty nor as long as ``tokens``.
    """

    index: int
    score: float
    tokens: list[str]
    token_scores: list[float]
    meta: dict[str, str] = field(default_factory=dict)
    sem: float | None = None
    stable: int | None = None
    n_members: int | None = None
    text: str = ""

    @property
    def excerpt_text(self) -> str:
        """The record's text, or its tokens joined when the text was not given."""
        return self.text or "".join(self.tokens)

    def __post_init__(self) -> None:
        if self.token_scores and len(self.token_scores) != len(self.tokens):
            raise DataError(
                f"SequenceView {self.index}: expected one token score per token "
                f"({len(self.tokens)} tokens), received {len(self.token_scores)} scores. "
                "Pass the per-token terms of this sequence, or an empty list if they were "
                "not computed."
            )


@dataclass(frozen=True)
class QueryView:
    """One query (prompt + completion) and the training sequences that influence it.

    Attributes:
        name: Short name of the query (shown as the card title).
        prompt: The prompt text.
        completion: The completion whose log-probability is measured.
        contrast: For a contrastive query, the alternative answer: the measurement is then
            ``log p(completion | prompt) − log p(contrast | prompt)`` (else empty).
        proponents: Sequences with the highest scores, highest first.
        opponents: Sequences with the most negative scores, most negative first.
        layer_scores: Total influence of the top proponents split by layer name, in layer
            order (may be empty).
        notes: Short key facts, e.g. ``{"planted fact": "yes", "top-1 correct": "yes"}``.
    """

    name: str
    prompt: str
    completion: str
    proponents: list[SequenceView] = field(default_factory=list)
    opponents: list[SequenceView] = field(default_factory=list)
    layer_scores: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    contrast: str = ""


@dataclass(frozen=True)
class Section:
    """An extra study section appended to the report (sparsity, languages, ...).

    Attributes:
        title: Section title (plain text; escaped when rendered).
        html: An already-safe HTML fragment, built with this package's helpers
            (:func:`~influscope.report.html.html_table`,
            :func:`~influscope.report.html.html_paragraph`,
            :func:`~influscope.report.svg.svg_line_plot`, ...). It is inserted verbatim.
    """

    title: str
    html: str


@dataclass(frozen=True)
class ReportView:
    """Everything one HTML report shows.

    Attributes:
        title: Page title.
        overview: Key facts (model, curvature, n_train, n_queries, damping, ...).
        queries: One card per query.
        sections: Extra sections appended after the query cards.
        layer_heatmap: Optional ``(row_labels, col_labels, values)`` with rows = layers,
            columns = sequences and ``values[row][col]`` the influence of that layer's term.

    Raises:
        DataError: If ``layer_heatmap``'s values do not match its labels.
    """

    title: str
    overview: dict[str, str] = field(default_factory=dict)
    queries: list[QueryView] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    layer_heatmap: tuple[list[str], list[str], list[list[float]]] | None = None

    def __post_init__(self) -> None:
        if self.layer_heatmap is None:
            return
        rows, cols, values = self.layer_heatmap
        shape = [len(r) for r in values]
        if len(values) != len(rows) or any(n != len(cols) for n in shape):
            raise DataError(
                f"layer_heatmap: expected a {len(rows)} x {len(cols)} value matrix "
                f"(rows = layers, columns = sequences), received row lengths {shape}."
            )
