"""Shared pieces of the studies: score matrices, rank correlations, and the result protocol.

Every study in :mod:`influscope.analysis` takes plain inputs (a ``(Q, N)`` score matrix, records,
texts) and returns a frozen result dataclass with two methods:

- ``to_dict()`` — JSON-serialisable numbers and strings (saved beside a run, printed by the
  benchmark);
- ``to_section()`` — a :class:`~influscope.report.views.Section` for the HTML report, built only
  with the report's escaping helpers.

Sign convention (as everywhere in influscope): a positive score means up-weighting the training
sequence *increases* the query's measurement ``log p(completion | prompt)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from influscope import metrics
from influscope.errors import DataError
from influscope.report.views import Section
from influscope.scoring.pairwise import Scores

__all__ = ["StudyResult", "as_matrix", "check_records", "pearson", "spearman"]


class StudyResult(Protocol):
    """What every study returns."""

    def to_dict(self) -> dict[str, Any]: ...

    def to_section(self) -> Section: ...


def as_matrix(scores: Scores | torch.Tensor | np.ndarray) -> np.ndarray:
    """Return the pairwise influence as a float64 ``(Q, N)`` array.

    Args:
        scores: A :class:`~influscope.scoring.pairwise.Scores`, or a ``(Q, N)`` / ``(N,)``
            tensor or array (a vector is one query).

    Raises:
        DataError: If the scores are not 1-D or 2-D, are empty, or hold NaN/Inf.
    """
    if isinstance(scores, Scores):
        scores = scores.pairwise
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(
            f"Expected a non-empty (queries, training sequences) score matrix, received shape "
            f"{tuple(arr.shape)}. Pass Scores.pairwise or a (Q, N) tensor."
        )
    if not np.isfinite(arr).all():
        raise DataError(
            f"The score matrix holds {int((~np.isfinite(arr)).sum())} NaN/Inf values. Recompute "
            "the scores (check the curvature damping) before running a study."
        )
    return arr


def check_records(records: Sequence[dict[str, Any]], n: int, what: str) -> None:
    """Raise :class:`DataError` unless there is one record per score row/column."""
    if len(records) != n:
        raise DataError(
            f"Expected {n} {what} records (one per score {'row' if what == 'query' else 'column'}),"
            f" received {len(records)}. Pass the records in the order they were scored."
        )


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation (:func:`influscope.metrics.pearson`); NaN when either
    vector is constant or has fewer than two values."""
    return metrics.pearson(x, y) if np.size(x) >= 2 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties
    (:func:`influscope.metrics.spearman`); NaN as for :func:`pearson`."""
    return metrics.spearman(x, y) if np.size(x) >= 2 else float("nan")


def fmt(value: float, digits: int = 3) -> str:
    """A number for a report table: ``"–"`` for NaN/None, else ``digits`` significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when there are none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def finite_median(values: Sequence[float]) -> float:
    """Median of the finite values (NaN when there are none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(vals)) if vals else float("nan")


def clean(value: Any) -> Any:
    """Make a value JSON-safe: NaN/Inf become ``None``, numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fact_groups(
    train_records: Sequence[dict[str, Any]], key: str
) -> dict[str, dict[str, list[int]]]:
    """Positions of each fact's training sequences, grouped by ``record[key]``.

    Returns:
        ``{fact_id: {group: [column, ...]}}`` over records with a ``fact_id``.
    """
    out: dict[str, dict[str, list[int]]] = {}
    for m, rec in enumerate(train_records):
        fact = rec.get("fact_id")
        if fact is None:
            continue
        out.setdefault(str(fact), {}).setdefault(str(rec.get(key)), []).append(m)
    return out


def percentile(row: np.ndarray, columns: Sequence[int]) -> float:
    """Mean over ``columns`` of each score's percentile rank in the row.

    The percentile of a score is its 0-based average rank (ties share the mean rank) divided by
    ``N − 1``: 1.0 means the top of the ranking, 0.5 the middle, 0.0 the bottom.
    """
    srt = np.sort(row)
    values = row[list(columns)]
    lo = np.searchsorted(srt, values, side="left")
    hi = np.searchsorted(srt, values, side="right")
    return float(np.mean((lo + hi - 1) / 2 / max(len(row) - 1, 1)))


def safe_ratio(num: float, den: float) -> float:
    """``num / den`` when ``den > 0``, else NaN (a ratio to a non-positive baseline is undefined)."""
    return num / den if den > 0 else float("nan")
