"""Score a stored attribution against a validation bank (:mod:`.bank`).

**LDS per drop fraction.** For query ``q`` and the ``m`` subsets ``D_j`` of one fraction, the
attribution ``τ_{q,i}`` (influscope's sign: ``df_q/dε``, positive = up-weighting row ``i``
raises ``f_q``) predicts the change of removing ``D_j`` as

.. math:: \\hat Δ_{q,j} = −\\textstyle\\sum_{i∈D_j} τ_{q,i}

(first order in the removal: ``f_q(θ_{−D}) − f_q(θ) ≈ −(1/N) Σ_{i∈D} τ_{q,i}``; the ``1/N``
and the sign convention of "kept" vs "dropped" do not matter to a rank correlation:
``Σ_{i∉D} τ = Σ_i τ − Σ_{i∈D} τ`` differs from ``\\hat Δ`` by a per-query constant). Then

.. math:: \\mathrm{LDS}_q = ρ_{\\mathrm{Spearman}}\\big((\\hat Δ_{q,j})_j,\\; (f_q(θ_{−D_j}))_j\\big)

and the bank reports ``mean ± s.e.m.`` of ``LDS_q`` over the queries whose correlation is
defined. A query whose measured values are the same on every subset (e.g. a fine-tune of zero
steps, where every retrain equals the full run) has no defined rank correlation: its
``LDS_q`` is ``NaN``, it is counted in :attr:`FractionLDS.constant_queries`, and it is left out of
the mean; when every query is constant the mean and s.e.m. are ``NaN`` and ``n = 0``.

**Top-k removal test.** Per query, retrain without its ``k`` highest-scored training rows
(its top proponents) and, separately, without ``k`` rows drawn at random (from
``default_rng([seed, k, q])``, the same for every attribution scored), and report
``Δ_top = f_q(θ_{−top k}) − f_q(θ)`` and ``Δ_random``. A useful attribution gives
``Δ_top`` well below ``Δ_random``. The retrains are kept in ``BANK/removals`` (a
:class:`~.retrain.RetrainingHarness` store keyed by the removed rows), so a killed test
resumes and a second attribution reuses the random removals; under ``torchrun`` rank ``r``
trains the removals ``j ≡ r (mod world)``.

Before anything is computed, the scores are checked against the bank: their shape must be
``(Q, N)``; the data and query fingerprints a scores stage records must equal the bank's;
and the scores' stored query measurements ``f_q(θ)`` must equal the bank's full run (to
``measurement_rtol``): scores computed on another model are refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influscope.config import Settings, require
from influscope.engine.distributed import barrier, rank_and_world
from influscope.errors import ConfigError, DataError, StaleArtifactError
from influscope.evaluation.bank import KIND, Bank, Measure, WeightedRecipe
from influscope.evaluation.retrain import Job, RetrainingHarness
from influscope.metrics import rowwise, spearman, summary

__all__ = [
    "BankScore",
    "FractionLDS",
    "RemovalRow",
    "ScoreBankConfig",
    "check_scores",
    "score_bank",
]


@dataclass(frozen=True)
class ScoreBankConfig(Settings):
    """How an attribution is scored against a bank.

    Attributes:
        top_k: Removal sizes of the top-k test (empty: LDS only, no retraining). Default none.
        removal_queries: Run the removal test on the first this many queries (``None``: all).
        seed: Seed of the random removals.
        measurement_rtol: Relative tolerance between the scores' stored query measurements and
            the bank's full run (default 1e-3: float32 on another device still passes, another
            model does not).
    """

    top_k: tuple[int, ...] = ()
    removal_queries: int | None = None
    seed: int = 0
    measurement_rtol: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "top_k", tuple(int(k) for k in self.top_k))
        require(all(k >= 1 for k in self.top_k), f"top_k must be ≥ 1, received {self.top_k}.")
        require(
            self.removal_queries is None or self.removal_queries >= 1,
            f"removal_queries must be ≥ 1 or None, received {self.removal_queries}.",
        )
        require(
            self.measurement_rtol > 0,
            f"measurement_rtol must be > 0, received {self.measurement_rtol}.",
        )


@dataclass
class FractionLDS:
    """LDS of one drop fraction.

    Attributes:
        fraction: The drop fraction ``k``.
        n_dropped: Rows dropped per subset.
        subsets: ``m``.
        mean: Mean ``LDS_q`` over the queries with a defined correlation (``NaN`` if none).
        sem: Its standard error (``NaN`` with fewer than two such queries).
        n: Queries in the mean.
        constant_queries: Queries whose measurement is the same on every subset (``LDS_q``
            undefined).
        per_query: ``LDS_q`` for every query (``NaN`` where undefined).
        subset_se: Bootstrap standard error of ``mean`` over the subsets (resampling the ``m``
            subsets; the queries share them, so this is often the larger uncertainty).
    """

    fraction: float
    n_dropped: int
    subsets: int
    mean: float
    sem: float
    n: int
    constant_queries: int
    per_query: list[float]
    subset_se: float = float("nan")


@dataclass
class RemovalRow:
    """The top-k removal test at one ``k``.

    Attributes:
        k: Rows removed.
        queries: Queries tested.
        delta_top: Mean ``f_q(θ_{−top k}) − f_q(θ)`` over the queries.
        delta_top_sem: Its standard error.
        delta_random: Mean ``f_q(θ_{−random k}) − f_q(θ)``.
        delta_random_sem: Its standard error.
        top_below_random: Share of queries with ``Δ_top < Δ_random``.
        per_query_top: ``Δ_top`` of each query.
        per_query_random: ``Δ_random`` of each query.
    """

    k: int
    queries: int
    delta_top: float
    delta_top_sem: float
    delta_random: float
    delta_random_sem: float
    top_below_random: float
    per_query_top: list[float]
    per_query_random: list[float]


@dataclass
class BankScore:
    """An attribution scored against a bank.

    Attributes:
        scores: Name (or description) of the scored attribution.
        bank: The bank's fingerprints.
        lds: One :class:`FractionLDS` per fraction, in the bank's order.
        removal: One :class:`RemovalRow` per ``k`` (empty when not run).
        config: The scoring settings.
    """

    scores: str
    bank: dict[str, Any]
    lds: list[FractionLDS]
    removal: list[RemovalRow] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (``NaN`` becomes ``null``)."""
        return _clean(asdict(self))

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` atomically."""
        from influscope.storage.atomic import atomic_write_json

        atomic_write_json(Path(path), self.to_json())
        return Path(path)

    @staticmethod
    def load(path: str | Path) -> BankScore:
        """Read a result written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        nan = float("nan")

        def num(x):
            return nan if x is None else x

        lds = [
            FractionLDS(
                **{
                    **r,
                    "mean": num(r["mean"]),
                    "sem": num(r["sem"]),
                    "subset_se": num(r.get("subset_se")),
                    "per_query": [num(v) for v in r["per_query"]],
                }
            )
            for r in data["lds"]
        ]
        removal = [
            RemovalRow(**{k: num(v) if not isinstance(v, list) else v for k, v in r.items()})
            for r in data.get("removal", [])
        ]
        return BankScore(data["scores"], data["bank"], lds, removal, data.get("config", {}))


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _pairwise(scores: Any) -> torch.Tensor:
    tau = getattr(scores, "pairwise", scores)
    tau = torch.as_tensor(tau).detach().double().cpu()
    return tau[None] if tau.ndim == 1 else tau  # (Q, N)


def check_scores(
    bank: Bank, scores: Any, meta: dict[str, Any] | None = None, rtol: float = 1e-3
) -> torch.Tensor:
    """The ``(Q, N)`` float64 scores, after checking they belong to the bank's fine-tune.

    Args:
        bank: The bank.
        scores: :class:`~influscope.scoring.pairwise.Scores` or a ``(Q, N)`` tensor.
        meta: The scores stage's ``meta.json`` (``data`` and ``queries`` fingerprints), if any.
        rtol: Tolerance of the measurement check.

    Raises:
        DataError: The shape is not the bank's ``(Q, N)``.
        StaleArtifactError: Another training set, other queries, or another model (the
            stored measurements differ from the bank's full run).
    """
    tau = _pairwise(scores)
    if tau.ndim != 2 or tuple(tau.shape) != (bank.n_queries, bank.n_train):
        raise DataError(
            f"The bank holds {bank.n_queries} queries × {bank.n_train} training rows, the scores "
            f"have shape {tuple(tau.shape)}. Score the same queries against the same training "
            "file the bank was built from (influscope score --queries … --train …)."
        )
    fix = (
        "Score the model the bank's full run produced (influscope validate build saves it "
        "under BANK/model) on the bank's training file and queries, or build a bank for this "
        "model and data."
    )
    for key in ("data", "queries"):
        stored = (meta or {}).get(key)
        if stored is not None and stored != bank.fingerprints.get(key):
            raise StaleArtifactError(
                f"The scores were computed on other {key} than the bank was built for "
                f"(fingerprint {stored!r}, bank {bank.fingerprints.get(key)!r}). {fix}"
            )
    measured = getattr(scores, "measurements", None)
    if measured is not None:
        got = torch.as_tensor(measured).detach().double().cpu().reshape(-1)  # (Q,)
        if got.shape != bank.full.shape or not torch.allclose(got, bank.full, rtol=rtol, atol=rtol):
            gap = float((got - bank.full).abs().max()) if got.shape == bank.full.shape else None
            raise StaleArtifactError(
                "The scores were computed on another model than the bank's full fine-tune: "
                f"their query measurements f_q(θ) differ from the bank's by up to {gap} "
                f"(tolerance {rtol}, relative). {fix}"
            )
    if not torch.isfinite(tau).all():
        raise DataError("The scores contain NaN or Inf; rescore before validating them.")
    return tau


def lds_per_fraction(bank: Bank, tau: torch.Tensor) -> list[FractionLDS]:
    """``LDS_q`` of every fraction (see the module docstring for the definitions)."""
    out = []
    for f, fraction in enumerate(bank.config.fractions):
        dropped, measured = bank.of_fraction(f)  # (m, N), (m, Q)
        predicted = -(dropped @ tau.T)  # (m, Q)
        per_query = rowwise(spearman, predicted.T, measured.T)  # (Q,)
        constant = int((measured.max(0).values == measured.min(0).values).sum())
        s = summary(per_query)
        boot = _subset_bootstrap(predicted.numpy(), measured.numpy())
        out.append(
            FractionLDS(
                fraction=float(fraction),
                n_dropped=int(dropped[0].sum()),
                subsets=int(dropped.shape[0]),
                mean=s["mean"],
                sem=s["sem"],
                n=int(s["n"]),
                constant_queries=constant,
                per_query=[float(v) for v in per_query],
                subset_se=boot,
            )
        )
    return out


def _column_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column pair of two ``(m, Q)`` arrays: ``(Q,)`` (NaN where
    a column is constant); average ranks for ties, like :func:`influscope.metrics.spearman`."""
    from scipy.stats import rankdata

    rx = rankdata(x, axis=0) - (x.shape[0] + 1) / 2  # (m, Q)
    ry = rankdata(y, axis=0) - (y.shape[0] + 1) / 2  # (m, Q)
    den = np.sqrt((rx**2).sum(0) * (ry**2).sum(0))  # (Q,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(0) / den, np.nan)


def _subset_bootstrap(predicted: np.ndarray, measured: np.ndarray, draws: int = 200) -> float:
    """Standard deviation of the mean LDS over ``draws`` resamples of the subsets.

    The s.e.m. over queries treats the queries as independent, but every query is measured on
    the same ``m`` subsets, so a few unusual subsets move all of them together; resampling the
    subsets (with replacement, ``default_rng(0)``) shows that part of the uncertainty.
    ``NaN`` when no resample has a defined mean.
    """
    m = predicted.shape[0]
    rng = np.random.default_rng(0)
    means = []
    for _ in range(draws):
        rows = rng.integers(0, m, size=m)
        lds = _column_spearman(predicted[rows], measured[rows])  # (Q,)
        if np.isfinite(lds).any():
            means.append(float(np.nanmean(lds)))
    return float(np.std(means, ddof=1)) if len(means) > 1 else float("nan")


def removal_test(
    bank: Bank,
    tau: torch.Tensor,
    recipe: WeightedRecipe,
    measure: Measure,
    config: ScoreBankConfig,
    bank_dir: str | Path | None = None,
) -> list[RemovalRow]:
    """The top-k removal test (module docstring); retrains stored under ``BANK/removals``."""
    n, q_all = bank.n_train, bank.n_queries
    q_count = min(q_all, config.removal_queries or q_all)

    def train(keep, seed):  # the harness's (indices, seed) → model; the bank's recipe is seeded
        weights = torch.zeros(n, dtype=torch.float64)
        weights[list(keep)] = 1.0
        return recipe(weights)

    tag = json.dumps({k: bank.fingerprints[k] for k in sorted(bank.fingerprints)}, sort_keys=True)
    out_dir = Path(bank_dir) / KIND / "removals" if bank_dir is not None else None
    harness = RetrainingHarness(train, measure, n, out_dir=out_dir, tag=tag)
    everything = np.arange(n)
    jobs, keys = [], []
    for k in config.top_k:
        for q in range(q_count):
            top = np.argsort(-tau[q].numpy(), kind="stable")[:k]
            rand = np.random.default_rng([config.seed, k, q]).choice(n, size=k, replace=False)
            for drop in (top, rand):
                jobs.append(Job.make(np.setdiff1d(everything, drop).tolist(), 0))
            keys.append((k, q))
    rank, world = rank_and_world()
    if world > 1:
        if out_dir is None:
            raise ConfigError(
                "The removal test under torchrun needs a bank directory to share retrains "
                "between ranks; pass bank_dir."
            )
        harness.measure_jobs([j for i, j in enumerate(jobs) if i % world == rank])
        barrier()
    measured = harness.measure_jobs(jobs)  # (2·|ks|·Q, Q_all): loaded where already trained
    rows = []
    for i, k in enumerate(config.top_k):
        top, rand = [], []
        for q in range(q_count):
            j = 2 * (i * q_count + q)
            top.append(float(measured[j, q] - bank.full[q]))
            rand.append(float(measured[j + 1, q] - bank.full[q]))
        st, sr = summary(top), summary(rand)
        rows.append(
            RemovalRow(
                k=k,
                queries=q_count,
                delta_top=st["mean"],
                delta_top_sem=st["sem"],
                delta_random=sr["mean"],
                delta_random_sem=sr["sem"],
                top_below_random=float(np.mean([a < b for a, b in zip(top, rand)])),
                per_query_top=top,
                per_query_random=rand,
            )
        )
    return rows


def score_bank(
    bank: Bank,
    scores: Any,
    meta: dict[str, Any] | None = None,
    config: ScoreBankConfig | None = None,
    recipe: WeightedRecipe | None = None,
    measure: Measure | None = None,
    bank_dir: str | Path | None = None,
    name: str = "scores",
) -> BankScore:
    """Score an attribution against a bank: LDS per fraction and, with ``top_k``, removals.

    Args:
        bank: A built bank (:func:`~.bank.build_bank` or :func:`~.bank.load_bank`).
        scores: :class:`~influscope.scoring.pairwise.Scores` (e.g. from
            :func:`influscope.analysis.runs.load_scores`) or a ``(Q, N)`` tensor.
        meta: The scores stage's metadata (checked against the bank's fingerprints).
        config: Scoring settings (default: LDS only).
        recipe: The bank's recipe, needed for the removal test (``config.top_k``).
        measure: The bank's measure, likewise.
        bank_dir: Where the removal retrains are kept (resumable).
        name: Name of the attribution, for the result.

    Raises:
        DataError, StaleArtifactError: See :func:`check_scores` (before any retraining).
        ConfigError: ``top_k`` without a recipe and measure, or ``k`` not below ``N``.
    """
    config = config or ScoreBankConfig()
    tau = check_scores(bank, scores, meta, config.measurement_rtol)
    if config.top_k:
        if recipe is None or measure is None:
            raise ConfigError(
                "The top-k removal test retrains the fine-tune: pass the bank's recipe and "
                "measure (CLI: the same model and recipe options as `validate build`), or "
                "leave top_k empty for the LDS alone."
            )
        if max(config.top_k) >= bank.n_train:
            raise ConfigError(
                f"Every top-k must be below N = {bank.n_train} (something must be left to "
                f"train on), received {config.top_k}."
            )
    lds = lds_per_fraction(bank, tau)
    removal = (
        removal_test(bank, tau, recipe, measure, config, bank_dir)  # type: ignore[arg-type]
        if config.top_k
        else []
    )
    return BankScore(name, dict(bank.fingerprints), lds, removal, config.to_dict())
