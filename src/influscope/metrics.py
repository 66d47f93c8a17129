"""Agreement metrics between predicted influence and counterfactual ground truth.

* :func:`pearson`, :func:`spearman` — correlation of two score vectors.
* :func:`lds_score` — the linear datamodeling score (Park et al. 2023, "TRAK", §2): for each
  query, the Spearman correlation over subsets ``S_j`` between the summed predicted scores
  ``Σ_{i∈S_j} τ_i`` and the measurement ``f(θ_{S_j})`` of a model retrained on ``S_j``.
* :func:`roc_auc`, :func:`found_at` — mislabel detection from a ranking.

Sign: influscope's scores are ``df/dε`` (positive = up-weighting the sequence increases ``f``),
so training on a subset changes ``f`` by about ``(1/N) Σ_{i∈S} τ_i`` minus a constant and the LDS
of a good estimator is *positive*.

A bottom-layer module (numpy, scipy and :mod:`influscope.errors` only): scoring, analysis,
evaluation, the applications and the benchmarks share it; :mod:`influscope.evaluation`
re-exports the public functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats

from influscope.errors import DataError

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _np(x).reshape(-1), _np(y).reshape(-1)
    if a.shape != b.shape or a.size < 2:
        raise DataError(
            f"Expected two vectors of the same length ≥ 2, received {a.size} and {b.size} values."
        )
    return a, b


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation; ``nan`` when either vector is constant."""
    a, b = _pair(x, y)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (average ranks for ties); ``nan`` for a constant vector."""
    a, b = _pair(x, y)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def rowwise(metric, x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """``metric`` applied to each row of two ``(Q, K)`` arrays: ``(Q,)``."""
    a, b = _np(x), _np(y)
    if a.ndim == 1:
        a, b = a[None], b[None]
    if a.shape != b.shape:
        raise DataError(f"Expected arrays of one shape, received {a.shape} and {b.shape}.")
    return np.array([metric(a[q], b[q]) for q in range(a.shape[0])])


def lds_score(scores: ArrayLike, masks: ArrayLike, measured: ArrayLike) -> np.ndarray:
    """Linear datamodeling score of each query.

    .. math:: \\mathrm{LDS}_q = \\rho_{\\mathrm{Spearman}}\\big(
              (\\textstyle\\sum_{i∈S_j} τ_{q,i})_{j=1}^m,\\; (f_q(θ_{S_j}))_{j=1}^m\\big)

    Args:
        scores: ``(Q, N)`` predicted influence ``τ`` (influscope's sign convention).
        masks: ``(m, N)`` 0/1 subset membership.
        measured: ``(m, Q)`` measurement of each query after retraining on each subset
            (averaged over seeds).

    Returns:
        ``(Q,)`` Spearman correlations (``nan`` for a query whose measurement never changes).
    """
    tau, s, f = _np(scores), _np(masks), _np(measured)
    if tau.ndim != 2 or s.ndim != 2 or f.ndim != 2:
        raise DataError(
            f"Expected scores (Q, N), masks (m, N), measured (m, Q); received shapes "
            f"{tau.shape}, {s.shape}, {f.shape}."
        )
    if tau.shape[1] != s.shape[1] or f.shape != (s.shape[0], tau.shape[0]):
        raise DataError(
            f"Shapes do not agree: scores {tau.shape} (Q, N), masks {s.shape} (m, N), measured "
            f"{f.shape} (m, Q)."
        )
    predicted = s @ tau.T  # (m, Q)
    return rowwise(spearman, predicted.T, f.T)


def roc_auc(scores: ArrayLike, positives: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for the 0/1 labels ``positives``.

    Computed as the Mann-Whitney statistic ``P(score_pos > score_neg) + ½ P(tie)``.
    """
    s, y = _pair(scores, positives)
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f"ROC-AUC needs positives and negatives, received {n_pos} positive and {n_neg} "
            "negative labels."
        )
    ranks = stats.rankdata(s)  # average ranks for ties
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def found_at(scores: ArrayLike, positives: ArrayLike, fraction: float) -> float:
    """Fraction of the positives among the ``ceil(fraction × N)`` highest scores.

    This is the share of flipped labels a person finds by inspecting the top ``fraction`` of
    the data ranked by ``scores`` (Koh & Liang 2017, Fig. 4).
    """
    s, y = _pair(scores, positives)
    if not 0 < fraction <= 1:
        raise DataError(f"fraction must be in (0, 1], received {fraction}.")
    pos = y > 0.5
    if not pos.any():
        raise DataError("found_at needs at least one positive label, received none.")
    k = int(np.ceil(fraction * s.size))
    top = np.argsort(-s, kind="stable")[:k]
    return float(pos[top].sum() / pos.sum())


def summary(values: ArrayLike) -> dict[str, float]:
    """Mean, standard error and count of finite values."""
    v = _np(values).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "sem": float("nan"), "n": 0}
    sem = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    return {"mean": float(v.mean()), "sem": sem, "n": int(v.size)}
