"""Counterfactual ground truth from retraining: leave-one-out, LDS and brittleness.

All three compare influscope's scores ``τ_{q,i} = df_q/dε_i`` with what retraining does:

* **Leave-one-out** — ``Δ_{q,m} = f_q(θ_{-m}) - f_q(θ)``; to first order
  ``Δ_{q,m} ≈ -τ_{q,m} / N`` (the objective is the mean over ``N`` sequences).
* **LDS** — ``m`` random subsets of size ``αN`` (:class:`~.config.LDSConfig`); predicted
  ``Σ_{i∈S_j} τ_{q,i}`` against measured ``f_q(θ_{S_j})``, Spearman over subsets, mean over
  queries (:func:`~.metrics.lds_score`).
* **Brittleness** (Ilyas et al. 2022; Park et al. 2023) — remove the ``k`` top proponents of a
  query (largest ``τ``), retrain, and compare ``Δf_q`` with removing ``k`` random sequences. A
  faithful estimator makes ``f_q`` drop much more than random removal does.

Retrains go through :class:`~.retrain.RetrainingHarness`, so they run in parallel, are stored,
and are shared between estimators: every estimator is evaluated on the very same retrains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from influscope.errors import DataError
from influscope.evaluation.config import BrittlenessConfig, LDSConfig
from influscope.evaluation.retrain import Job, RetrainingHarness
from influscope.metrics import lds_score, pearson, spearman, summary


def _scores(scores: torch.Tensor, n_train: int) -> np.ndarray:
    s = scores.pairwise if hasattr(scores, "pairwise") else scores
    arr = torch.as_tensor(s).detach().double().cpu().numpy()
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != n_train:
        raise DataError(
            f"Expected scores of shape (Q, {n_train}) over the whole training set, received "
            f"{tuple(arr.shape)}."
        )
    return arr


# ---------------------------------------------------------------------------- leave-one-out


@dataclass
class LOOResult:
    """Leave-one-out ground truth.

    Attributes:
        indices: The left-out training indices ``m``.
        base: ``(Q,)`` measurement of the full-data model(s).
        delta: ``(K, Q)`` ``f_q(θ_{-m}) - f_q(θ)``, averaged over seeds.
    """

    indices: list[int]
    base: torch.Tensor
    delta: torch.Tensor

    def agreement(self, scores: torch.Tensor, n_train: int) -> dict[str, float]:
        """Pearson / Spearman of ``-τ_{q,m}/N`` with ``Δ_{q,m}`` over all (query, m) pairs."""
        tau = _scores(scores, n_train)[:, self.indices]  # (Q, K)
        predicted = -tau.T / n_train  # (K, Q)
        truth = self.delta.numpy()
        return {
            "pearson": pearson(predicted, truth),
            "spearman": spearman(predicted, truth),
        }


def leave_one_out(
    harness: RetrainingHarness, indices: Sequence[int], seeds: Sequence[int] = (0,)
) -> LOOResult:
    """Retrain without each training index in ``indices`` (with each seed)."""
    n = harness.n_train
    everything = list(range(n))
    jobs = [Job.make(everything, s) for s in seeds]
    for m in indices:
        jobs += [Job.make([i for i in everything if i != m], s) for s in seeds]
    out = harness.measure_jobs(jobs)  # (J, Q)
    r = len(seeds)
    base = out[:r].mean(0)  # (Q,)
    removed = out[r:].view(len(indices), r, -1).mean(1)  # (K, Q)
    return LOOResult([int(i) for i in indices], base, removed - base)


# ---------------------------------------------------------------------------------- LDS


@dataclass
class LDSResult:
    """Linear datamodeling score of one or more estimators on shared retrains.

    Attributes:
        masks: ``(m, N)`` subset membership.
        measured: ``(m, Q)`` measurements, averaged over seeds.
        per_query: ``{estimator: (Q,)}`` Spearman correlation per query.
        config: The protocol.
    """

    masks: torch.Tensor
    measured: torch.Tensor
    per_query: dict[str, np.ndarray] = field(default_factory=dict)
    config: LDSConfig = field(default_factory=LDSConfig)

    def add(self, name: str, scores: torch.Tensor) -> float:
        """Score another estimator on the same retrains; returns its mean LDS."""
        tau = _scores(scores, self.masks.shape[1])
        self.per_query[name] = lds_score(tau, self.masks.numpy(), self.measured.numpy())
        return self.mean(name)

    def mean(self, name: str) -> float:
        """Mean LDS over queries (queries with constant measurements are skipped)."""
        return summary(self.per_query[name])["mean"]

    def table(self) -> dict[str, dict[str, float]]:
        """``{estimator: {"mean", "sem", "n"}}``."""
        return {name: summary(v) for name, v in self.per_query.items()}


def lds_subsets(n_train: int, config: LDSConfig) -> torch.Tensor:
    """The ``(m, N)`` 0/1 masks of the protocol's random subsets (deterministic in the seed)."""
    rng = np.random.default_rng(config.seed)
    size = max(1, round(config.fraction * n_train))
    masks = np.zeros((config.n_subsets, n_train), dtype=np.float64)
    for j in range(config.n_subsets):
        masks[j, rng.choice(n_train, size=size, replace=False)] = 1.0
    return torch.from_numpy(masks)


def lds(
    harness: RetrainingHarness,
    scores: Mapping[str, torch.Tensor] | None = None,
    config: LDSConfig | None = None,
) -> LDSResult:
    """Retrain on the protocol's subsets and score each estimator.

    Args:
        harness: The retraining harness.
        scores: ``{estimator name: (Q, N) scores or Scores}``; more can be added later with
            :meth:`LDSResult.add` without retraining.
        config: The protocol (defaults: ``m = 100``, ``α = 0.5``, one seed).

    Returns:
        The :class:`LDSResult`.
    """
    config = config or LDSConfig()
    masks = lds_subsets(harness.n_train, config)
    jobs = [
        Job.make(np.flatnonzero(masks[j].numpy()).tolist(), s)
        for j in range(config.n_subsets)
        for s in range(config.n_seeds)
    ]
    out = harness.measure_jobs(jobs)  # (m·r, Q)
    measured = out.view(config.n_subsets, config.n_seeds, -1).mean(1)  # (m, Q)
    result = LDSResult(masks, measured, config=config)
    for name, s in (scores or {}).items():
        result.add(name, s)
    return result


# --------------------------------------------------------------------------- brittleness


@dataclass
class BrittlenessResult:
    """Change of each query's measurement after removing ``k`` training sequences.

    Attributes:
        ks: Removal sizes.
        top: ``(len(ks), Q)`` ``f_q(θ_{-top k}) - f_q(θ)``.
        random: ``(len(ks), Q)`` the same with ``k`` random sequences removed.
    """

    ks: tuple[int, ...]
    top: torch.Tensor
    random: torch.Tensor

    def table(self) -> list[dict[str, float]]:
        """Per ``k``: mean change (top, random) and the share of queries where top < random."""
        rows = []
        for i, k in enumerate(self.ks):
            rows.append(
                {
                    "k": k,
                    "delta_top": float(self.top[i].mean()),
                    "delta_random": float(self.random[i].mean()),
                    "top_below_random": float((self.top[i] < self.random[i]).double().mean()),
                }
            )
        return rows


def brittleness(
    harness: RetrainingHarness, scores: torch.Tensor, config: BrittlenessConfig | None = None
) -> BrittlenessResult:
    """Remove each query's top-``k`` proponents (and ``k`` random sequences) and retrain.

    All retrains are submitted to the harness at once (so they run in parallel). The random
    removals depend only on ``config.seed`` (one draw per ``(k, query)``), so two estimators
    evaluated with the same config share them — and their retrains.

    Args:
        harness: The retraining harness.
        scores: ``(Q, N)`` influence scores of the estimator under test; row ``q`` belongs to
            the harness's query ``q`` (the harness may measure more queries than ``Q``).
        config: Removal sizes and seeds.
    """
    config = config or BrittlenessConfig()
    n = harness.n_train
    tau = _scores(scores, n)
    if max(config.ks) >= n:
        raise DataError(f"Every k must be below N = {n}, received ks = {config.ks}.")
    rng = np.random.default_rng(config.seed)
    seeds = list(range(config.n_seeds))
    everything = np.arange(n)
    q_count, r = tau.shape[0], len(seeds)
    # Every removal of every (k, query), top then random; the random draws depend only on
    # ``config.seed``, so two estimators evaluated with the same config share them.
    removals = []
    for k in config.ks:
        for q in range(q_count):
            removals.append(np.argsort(-tau[q], kind="stable")[:k])
            removals.append(rng.choice(n, size=k, replace=False))
    jobs = [Job.make(range(n), s) for s in seeds]
    for drop in removals:
        keep = np.setdiff1d(everything, drop).tolist()
        jobs += [Job.make(keep, s) for s in seeds]
    out = harness.measure_jobs(jobs)  # (r + 2·|ks|·Q·r, W), all retrains at once (parallel)
    if out.shape[1] < q_count:
        raise DataError(
            f"Scores have {q_count} query rows but the harness measures {out.shape[1]} queries; "
            "row q of the scores must be the harness's query q."
        )
    base = out[:r, :q_count].mean(0)  # (Q,)
    removed = out[r:, :q_count].reshape(len(config.ks), q_count, 2, r, q_count).mean(3)
    rows = torch.arange(q_count)
    delta = removed[:, rows, :, rows] - base[:, None, None]  # (Q, K, 2): own query's Δf
    return BrittlenessResult(config.ks, delta[..., 0].T.contiguous(), delta[..., 1].T.contiguous())
