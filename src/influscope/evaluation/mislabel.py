"""Mislabeled-data detection: flip labels, rank by self-influence, measure what is found.

Koh & Liang (2017, §5.4): a training example whose label is wrong is hard to fit, so its
self-influence ``∇L(z)^⊤ (G + λI)^{-1} ∇L(z)`` is large. Rank the training set by it and
inspect from the top; report

* ``auc`` — ROC-AUC of the ranking for "flipped vs. clean",
* ``found@p`` — the share of flipped examples among the top ``p`` of the ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from influscope.errors import DataError
from influscope.evaluation.config import MislabelConfig
from influscope.metrics import found_at, roc_auc


def flip_labels(
    labels: Sequence[int] | torch.Tensor, n_classes: int, config: MislabelConfig | None = None
) -> tuple[list[int], np.ndarray]:
    """Flip ``round(p N)`` labels to a different class chosen uniformly at random.

    Args:
        labels: ``N`` class labels in ``0 … n_classes-1``.
        n_classes: Number of classes ``C ≥ 2``.
        config: ``fraction`` and ``seed``.

    Returns:
        ``(new labels, flipped)`` where ``flipped`` is an ``(N,)`` bool mask.
    """
    config = config or MislabelConfig()
    y = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    if n_classes < 2 or y.size == 0 or y.min() < 0 or y.max() >= n_classes:
        raise DataError(
            f"Expected labels in [0, {n_classes}) with n_classes ≥ 2; received {y.size} labels "
            f"in [{y.min() if y.size else None}, {y.max() if y.size else None}]."
        )
    rng = np.random.default_rng(config.seed)
    n_flip = max(1, round(config.fraction * y.size))
    chosen = rng.choice(y.size, size=n_flip, replace=False)
    new = y.copy()
    shift = rng.integers(1, n_classes, size=n_flip)  # never 0: always a different class
    new[chosen] = (y[chosen] + shift) % n_classes
    flipped = np.zeros(y.size, dtype=bool)
    flipped[chosen] = True
    return new.tolist(), flipped


@dataclass
class MislabelReport:
    """Detection quality of one ranking.

    Attributes:
        auc: ROC-AUC of the scores for the flipped examples.
        found: ``{p: share of the flipped examples in the top p of the ranking}``.
        n_flipped: Number of flipped examples.
    """

    auc: float
    found: dict[float, float]
    n_flipped: int

    def row(self) -> dict[str, float]:
        return {"auc": self.auc, **{f"found@{int(p * 100)}%": v for p, v in self.found.items()}}


def detection_report(
    scores: torch.Tensor | np.ndarray,
    flipped: np.ndarray | torch.Tensor,
    config: MislabelConfig | None = None,
) -> MislabelReport:
    """AUC and ``found@p`` of a ranking (higher score = inspect first).

    Args:
        scores: ``(N,)`` e.g. self-influence of each training example.
        flipped: ``(N,)`` bool, which labels were flipped.
        config: The inspected fractions.
    """
    config = config or MislabelConfig()
    s = torch.as_tensor(scores).detach().double().cpu().numpy().reshape(-1)
    f = np.asarray(torch.as_tensor(flipped).cpu(), dtype=np.float64).reshape(-1)
    if not np.isfinite(s).all():
        raise DataError("Scores contain NaN/Inf; a ranking needs finite scores.")
    return MislabelReport(
        auc=roc_auc(s, f),
        found={p: found_at(s, f, p) for p in config.inspect},
        n_flipped=int(f.sum()),
    )
