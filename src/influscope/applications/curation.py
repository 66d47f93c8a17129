"""Data curation: rank training data by total influence on a benchmark, drop the harmful k %.

For a benchmark set ``B`` of queries with measurements ``f_q`` (for causal LMs
``log p(completion | prompt)``, or ``-L`` of a text), the *total influence* of training
sequence ``z_m`` is

.. math:: T(z_m) = \\sum_{q ∈ B} I_q(z_m) = -\\Big(\\sum_q ∇f_q\\Big)^⊤ (G + λI)^{-1} ∇L(z_m)
          = \\frac{d}{dε} \\sum_q f_q ,

the first-order change of the benchmark's summed measurement when ``z_m`` is up-weighted
(Koh & Liang 2017; Grosse et al. 2023 for the EK-FAC estimator). Removing ``z_m`` (ε = −w/N)
changes it by about ``−(w/N) T(z_m)``, so the sequences with the **most negative** ``T`` are the
most harmful: removing them is predicted to raise the benchmark's log-likelihood most.
:func:`harmful_subset` picks the ``round(k N)`` most harmful; :func:`random_subset` and
:func:`highest_loss_subset` are the baselines a curation benchmark compares against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from influscope.config import FitConfig, ScoreConfig
from influscope.curvature.base import CurvatureOperator
from influscope.errors import ConfigError
from influscope.tasks import EncodedDataset, Task

__all__ = [
    "CurationRanking",
    "harmful_subset",
    "highest_loss_subset",
    "n_removed",
    "random_subset",
    "rank_by_influence",
]


@dataclass
class CurationRanking:
    """Total influence of each training sequence on a benchmark.

    Attributes:
        total: ``(N,)`` ``T(z_m) = Σ_q I_q(z_m)``; negative = harmful to the benchmark.
        per_query: ``(Q, N)`` the pairwise scores it sums.
    """

    total: torch.Tensor
    per_query: torch.Tensor

    @property
    def order(self) -> list[int]:
        """Training positions from most harmful (most negative total) to most helpful."""
        return torch.argsort(self.total, stable=True).tolist()


def n_removed(n: int, fraction: float) -> int:
    """``round(fraction · n)``, at least 1 (the size of a removed ``fraction``)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must be in (0, 1), received {fraction}.")
    return max(1, math.floor(fraction * n + 0.5))


def rank_by_influence(
    model: nn.Module,
    task: str | Task,
    train: EncodedDataset,
    benchmark: EncodedDataset,
    *,
    factors: CurvatureOperator | None = None,
    fit_data: EncodedDataset | None = None,
    fit_config: FitConfig | None = None,
    modules: str | Sequence[str] = "mlp",
    score_config: ScoreConfig | None = None,
) -> CurationRanking:
    """Score every training sequence against every benchmark query and sum over queries.

    Args:
        model: The trained model.
        task: Task or task name.
        train: The candidate training sequences to rank.
        benchmark: The benchmark queries (their measurement is what curation should raise).
        factors: Fitted curvature; otherwise fitted on ``fit_data`` (default ``train``).
        fit_data: The training objective's data when it differs from ``train`` (e.g. repeated
            records), for fitting the curvature.
        fit_config: How to fit (default EK-FAC).
        modules: Tracked modules.
        score_config: Scoring settings (default: full-rank query gradients).

    Returns:
        :class:`CurationRanking`.
    """
    from influscope.analyzer import Influence

    device = next(model.parameters()).device
    inf = Influence(model, task, modules=modules, device=device)
    if factors is None:
        factors = inf.fit(fit_data if fit_data is not None else train, fit_config or FitConfig())
    config = score_config or ScoreConfig(query_rank=None)
    scores = inf.score(benchmark, train, factors, config)
    pairwise = scores.pairwise.double().cpu()  # (Q, N)
    return CurationRanking(total=pairwise.sum(0), per_query=pairwise)


def harmful_subset(total: torch.Tensor, fraction: float) -> list[int]:
    """Positions of the ``round(fraction · N)`` sequences with the most negative total influence."""
    k = n_removed(total.numel(), fraction)
    return sorted(torch.argsort(total, stable=True)[:k].tolist())


def random_subset(n: int, fraction: float, seed: int) -> list[int]:
    """``round(fraction · n)`` positions drawn uniformly without replacement (seeded)."""
    k = n_removed(n, fraction)
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def highest_loss_subset(losses: torch.Tensor, fraction: float) -> list[int]:
    """Positions of the ``round(fraction · N)`` sequences with the highest loss (baseline)."""
    k = n_removed(losses.numel(), fraction)
    return sorted(torch.argsort(losses, descending=True, stable=True)[:k].tolist())
