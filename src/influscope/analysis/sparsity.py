"""Sparsity of influence: a power-law fit to the upper tail of each query's positive scores.

Grosse et al. (2023, §5.2) found that a query's influence is spread over many sequences with a
heavy, roughly power-law tail. For each query this study takes the positive influences
``x_1 ≥ x_2 ≥ … ≥ x_n > 0`` and fits the continuous power law

.. math:: p(x) = \\frac{α - 1}{x_{\\min}} \\left(\\frac{x}{x_{\\min}}\\right)^{-α},
    \\qquad x ≥ x_{\\min},

by maximum likelihood, ``α̂ = 1 + n_tail / Σ_{x_i ≥ x_min} ln(x_i / x_min)``, with ``x_min``
chosen to minimise the Kolmogorov–Smirnov distance ``D`` between the tail and the fit (Clauset,
Shalizi & Newman 2009, "Power-law distributions in empirical data", SIAM Review 51(4)). The
closed-form scan is done here (vectorised, so the bootstrap stays fast); the comparisons with
other tails use the maintained ``powerlaw`` package (Alstott et al. 2014) at the same ``x_min``.

Goodness of fit is the semi-parametric bootstrap of Clauset et al. §4.1: each of ``B`` synthetic
data sets keeps the size ``n``; each value comes with probability ``n_tail / n`` from the fitted
power law (inverse CDF ``x = x_min (1 - u)^{-1/(α-1)}``) and otherwise is drawn uniformly from the
observed values below ``x_min``; the synthetic set is refitted (``x_min`` included) and
``p = #{D_b ≥ D} / B``. A small ``p`` (< 0.1) rules the power law out.

Alternatives are compared by the normalised log-likelihood ratio ``R`` (Vuong's test) of the power
law against a lognormal and an exponential tail: ``R > 0`` favours the power law, and its
``p``-value says whether the sign is significant.

The share of total positive influence held by the top ``⌈f·N⌉`` of the ``N`` scored sequences
(``f = 1 %`` by default) is ``Σ_{i ≤ ⌈fN⌉} x_i / Σ_i x_i``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from influscope.analysis.base import as_matrix, clean, fmt
from influscope.errors import ConfigError, DataError
from influscope.report.html import html_figure, html_paragraph, html_table
from influscope.report.svg import svg_line_plot
from influscope.report.views import Section

__all__ = ["PowerLawFit", "SparsityConfig", "SparsityResult", "fit_power_law", "sparsity_study"]


@dataclass(frozen=True)
class SparsityConfig:
    """Settings of the sparsity study.

    Attributes:
        n_bootstrap: Synthetic data sets of the goodness-of-fit test (0 skips the test;
            Clauset et al. suggest ≥ 100 for a p-value accurate to about ±0.05).
        top_fraction: Fraction of the scored sequences whose share of positive influence is
            reported (default 1 %).
        min_positive: Fewest positive scores a query needs for a fit.
        min_tail: Fewest scores kept in the tail when scanning ``x_min``.
        seed: Seed of the bootstrap.
    """

    n_bootstrap: int = 100
    top_fraction: float = 0.01
    min_positive: int = 10
    min_tail: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_bootstrap < 0:
            raise ConfigError(f"n_bootstrap must be ≥ 0, received {self.n_bootstrap}.")
        if not 0 < self.top_fraction <= 1:
            raise ConfigError(f"top_fraction must be in (0, 1], received {self.top_fraction}.")
        if self.min_positive < 3:
            raise ConfigError(f"min_positive must be ≥ 3, received {self.min_positive}.")
        if not 2 <= self.min_tail <= self.min_positive:
            raise ConfigError(
                f"min_tail must be between 2 and min_positive ({self.min_positive}), received "
                f"{self.min_tail}."
            )


@dataclass(frozen=True)
class PowerLawFit:
    """The tail fit of one query's positive influences.

    Attributes:
        n_positive: Number of positive scores ``n``.
        top_share: Share of total positive influence held by the top ``top_fraction`` of all
            scored sequences.
        alpha: Exponent ``α`` of ``p(x) ∝ x^{-α}`` (NaN when not fitted).
        alpha_stderr: Its standard error ``(α - 1) / √n_tail``.
        xmin: Start of the tail.
        n_tail: Number of scores ``≥ x_min``.
        ks_distance: Kolmogorov–Smirnov distance ``D`` of the fit.
        p_value: Bootstrap goodness-of-fit p-value (NaN when not run).
        vs_lognormal: ``(R, p)`` of the power law against a lognormal tail.
        vs_exponential: ``(R, p)`` of the power law against an exponential tail.
        ccdf: ``(x, P(X ≥ x))`` of the positive scores (at most 200 points), for plotting.
        note: Why the fit was skipped, if it was.
    """

    n_positive: int
    top_share: float
    alpha: float = float("nan")
    alpha_stderr: float = float("nan")
    xmin: float = float("nan")
    n_tail: int = 0
    ks_distance: float = float("nan")
    p_value: float = float("nan")
    vs_lognormal: tuple[float, float] = (float("nan"), float("nan"))
    vs_exponential: tuple[float, float] = (float("nan"), float("nan"))
    ccdf: tuple[list[float], list[float]] = field(default=([], []), repr=False)
    note: str = ""

    @property
    def fitted(self) -> bool:
        return math.isfinite(self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return clean(
            {
                "n_positive": self.n_positive,
                "top_share": self.top_share,
                "alpha": self.alpha,
                "alpha_stderr": self.alpha_stderr,
                "xmin": self.xmin,
                "n_tail": self.n_tail,
                "ks_distance": self.ks_distance,
                "p_value": self.p_value,
                "vs_lognormal": {"R": self.vs_lognormal[0], "p": self.vs_lognormal[1]},
                "vs_exponential": {"R": self.vs_exponential[0], "p": self.vs_exponential[1]},
                "note": self.note,
            }
        )


def _scan_xmin(x: np.ndarray, min_tail: int) -> tuple[float, float, float]:
    """Clauset et al.'s fit: ``(α, x_min, D)`` minimising the KS distance over ``x_min``.

    For each candidate ``x_min = x_(j)`` (ascending order, keeping at least ``min_tail`` values)
    the MLE is ``α = 1 + n_t / Σ_{i ≥ j} ln(x_(i) / x_min)`` and the KS distance compares the
    tail's empirical CDF with ``F(x) = 1 − (x / x_min)^{1−α}``.
    """
    xs = np.sort(x)  # (n,) ascending
    n = len(xs)
    logs = np.log(xs)
    suffix = np.cumsum(logs[::-1])[::-1]  # Σ_{i ≥ j} ln x_(i)
    starts = np.flatnonzero(np.r_[True, xs[1:] > xs[:-1]])  # first index of each unique value
    starts = starts[starts <= n - min_tail]
    if len(starts) > 2000:  # bound the O(n²) scan on very long score vectors
        starts = starts[np.unique(np.linspace(0, len(starts) - 1, 2000).astype(int))]
    best = (float("nan"), float("nan"), float("inf"))
    for j in starts:
        n_t = n - j
        denom = suffix[j] - n_t * logs[j]
        if denom <= 0:
            continue
        alpha = 1.0 + n_t / denom
        tail = xs[j:]  # (n_t,)
        fitted = 1.0 - (tail / xs[j]) ** (1.0 - alpha)  # model CDF at the tail values
        upper = np.arange(1, n_t + 1) / n_t  # empirical CDF just after each value
        d = float(max(np.max(np.abs(upper - fitted)), np.max(np.abs(upper - 1 / n_t - fitted))))
        if d < best[2]:
            best = (float(alpha), float(xs[j]), d)
    return best


def _compare(x: np.ndarray, xmin: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Vuong's normalised log-likelihood ratios (R, p) against lognormal and exponential tails.

    ``powerlaw`` 2.0 bounds α to [0, 3] by default, which silently caps steep tails; the range
    is widened here so its α equals the closed-form MLE.
    """
    import powerlaw  # optional extra "studies"

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(
            x, xmin=xmin, verbose=False, parameter_ranges={"alpha": [1.0, _MAX_ALPHA]}
        )
        out = []
        for other in ("lognormal", "exponential"):
            r, p = fit.distribution_compare("power_law", other, normalized_ratio=True)
            out.append((float(r), float(p)))
    return out[0], out[1]


_MAX_ALPHA = 50.0


def _bootstrap_p(
    x: np.ndarray, alpha: float, xmin: float, d_obs: float, config: SparsityConfig, seed: int
) -> float:
    """Semi-parametric bootstrap p-value of Clauset et al. (2009, §4.1)."""
    rng = np.random.default_rng(seed)
    below = x[x < xmin]
    n, n_tail = len(x), int((x >= xmin).sum())
    exceed = 0
    for _ in range(config.n_bootstrap):
        k = int(rng.binomial(n, n_tail / n)) if len(below) else n
        u = rng.random(k)
        tail = xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))  # inverse CDF of the fitted law
        body = rng.choice(below, n - k, replace=True) if len(below) else np.empty(0)
        d = _scan_xmin(np.concatenate([tail, body]), config.min_tail)[2]
        exceed += d >= d_obs
    return exceed / config.n_bootstrap


def _ccdf(x: np.ndarray, max_points: int = 200) -> tuple[list[float], list[float]]:
    xs = np.sort(x)[::-1]  # descending
    ps = np.arange(1, len(xs) + 1) / len(xs)  # P(X ≥ x_i)
    keep = np.unique(np.geomspace(1, len(xs), min(max_points, len(xs))).astype(int) - 1)
    return xs[keep].tolist(), ps[keep].tolist()


def fit_power_law(
    scores: np.ndarray, config: SparsityConfig | None = None, *, seed_offset: int = 0
) -> PowerLawFit:
    """Fit a power law to the positive part of one query's influence scores.

    Args:
        scores: ``(N,)`` influence of every scored training sequence on one query.
        config: Study settings.
        seed_offset: Added to ``config.seed`` (one stream per query).

    Returns:
        The fit; ``alpha`` is NaN (with a ``note``) when there are fewer than
        ``config.min_positive`` positive scores.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> fit = fit_power_law((rng.pareto(1.5, 500) + 1.0), SparsityConfig(n_bootstrap=0))
        >>> 2.0 < fit.alpha < 3.0
        True
    """
    config = config or SparsityConfig()
    row = as_matrix(scores)
    if row.shape[0] != 1:
        raise DataError(f"fit_power_law takes one query's scores (N,), received {row.shape}.")
    row = row[0]
    pos = row[row > 0]
    k = max(1, math.ceil(config.top_fraction * len(row)))
    total = float(pos.sum())
    top_share = float(np.sort(pos)[::-1][:k].sum() / total) if total > 0 else float("nan")
    if len(pos) < config.min_positive:
        return PowerLawFit(
            n_positive=len(pos),
            top_share=top_share,
            ccdf=_ccdf(pos) if len(pos) else ([], []),
            note=f"only {len(pos)} positive scores (need {config.min_positive})",
        )
    alpha, xmin, d = _scan_xmin(pos, config.min_tail)
    if not math.isfinite(alpha):
        return PowerLawFit(
            n_positive=len(pos), top_share=top_share, ccdf=_ccdf(pos), note="no tail could be fit"
        )
    n_tail = int((pos >= xmin).sum())
    p = float("nan")
    if config.n_bootstrap > 0:
        p = _bootstrap_p(pos, alpha, xmin, d, config, config.seed + seed_offset)
    vs_lognormal, vs_exponential = _compare(pos, xmin)
    return PowerLawFit(
        n_positive=len(pos),
        top_share=top_share,
        alpha=alpha,
        alpha_stderr=(alpha - 1.0) / math.sqrt(n_tail) if n_tail else float("nan"),
        xmin=xmin,
        n_tail=n_tail,
        ks_distance=d,
        p_value=p,
        vs_lognormal=vs_lognormal,
        vs_exponential=vs_exponential,
        ccdf=_ccdf(pos),
    )


@dataclass(frozen=True)
class SparsityResult:
    """Power-law fits of every query.

    Attributes:
        fits: One :class:`PowerLawFit` per query.
        query_names: One label per query.
        config: The settings used.
    """

    fits: list[PowerLawFit]
    query_names: list[str]
    config: SparsityConfig

    def summary(self) -> dict[str, Any]:
        """Medians over the fitted queries."""
        fitted = [f for f in self.fits if f.fitted]

        def med(values: list[float]) -> float:
            vals = [v for v in values if math.isfinite(v)]
            return float(np.median(vals)) if vals else float("nan")

        return clean(
            {
                "n_queries": len(self.fits),
                "n_fitted": len(fitted),
                "median_alpha": med([f.alpha for f in fitted]),
                "median_p_value": med([f.p_value for f in fitted]),
                "fraction_p_above_0.1": (
                    float(np.mean([f.p_value >= 0.1 for f in fitted if math.isfinite(f.p_value)]))
                    if any(math.isfinite(f.p_value) for f in fitted)
                    else float("nan")
                ),
                "median_top_share": med([f.top_share for f in self.fits]),
                "fraction_lognormal_preferred": (
                    float(np.mean([f.vs_lognormal[0] < 0 for f in fitted]))
                    if fitted
                    else float("nan")
                ),
                "fraction_exponential_preferred": (
                    float(np.mean([f.vs_exponential[0] < 0 for f in fitted]))
                    if fitted
                    else float("nan")
                ),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": "sparsity",
            "config": clean(vars(self.config)),
            "summary": self.summary(),
            "queries": [
                {"query": name, **fit.to_dict()} for name, fit in zip(self.query_names, self.fits)
            ],
        }

    def to_section(self, max_plotted: int = 4) -> Section:
        s = self.summary()
        pct = f"{100 * self.config.top_fraction:g}%"
        rows = [
            [
                name,
                f.n_positive,
                fmt(f.alpha),
                fmt(f.xmin),
                f.n_tail,
                fmt(f.p_value, 2),
                f"{fmt(f.vs_lognormal[0])} (p {fmt(f.vs_lognormal[1], 2)})",
                f"{fmt(f.vs_exponential[0])} (p {fmt(f.vs_exponential[1], 2)})",
                fmt(f.top_share),
                f.note,
            ]
            for name, f in zip(self.query_names, self.fits)
        ]
        table = html_table(
            [
                "query",
                "n > 0",
                "α",
                "x_min",
                "n tail",
                "GoF p",
                "R vs lognormal",
                "R vs exponential",
                f"top-{pct} share",
                "note",
            ],
            rows,
            caption="Power-law fit p(x) ∝ x^-α of each query's positive influences above x_min "
            f"(GoF p: bootstrap over {self.config.n_bootstrap} synthetic sets; p < 0.1 rules the "
            "power law out; R > 0 favours the power law over the alternative).",
        )
        plotted = [(n, f) for n, f in zip(self.query_names, self.fits) if f.ccdf[0]][:max_plotted]
        xs, ys, labels = [], [], []
        for name, f in plotted:
            xs.append(f.ccdf[0])
            ys.append(f.ccdf[1])
            labels.append(name)
            if f.fitted:  # fitted CCDF: P(X ≥ x) = (n_tail / n) (x / x_min)^{1-α}
                grid = np.geomspace(f.xmin, max(f.ccdf[0]), 20)
                xs.append(grid.tolist())
                ys.append(((f.n_tail / f.n_positive) * (grid / f.xmin) ** (1 - f.alpha)).tolist())
                labels.append(f"{name} fit α={f.alpha:.2f}")
        plot = ""
        if xs:
            svg = svg_line_plot(
                xs,
                ys,
                labels,
                log_x=True,
                log_y=True,
                x_label="positive influence x",
                y_label="P(X ≥ x)",
            )
            plot = html_figure(svg, "Tail of the influence distribution (log-log) with the fit.")
        text = html_paragraph(
            f"{s['n_fitted']} of {s['n_queries']} queries fitted; median α = "
            f"{fmt(s['median_alpha'])}, median goodness-of-fit p = {fmt(s['median_p_value'], 2)}; "
            f"the top {pct} of sequences hold a median {fmt(s['median_top_share'])} of the "
            "positive influence."
        )
        return Section("Sparsity: power-law tail of influence", text + table + plot)


def sparsity_study(
    scores: Any,
    config: SparsityConfig | None = None,
    query_names: list[str] | None = None,
) -> SparsityResult:
    """Fit the tail of every query's positive influences.

    Args:
        scores: ``(Q, N)`` scores (a :class:`~influscope.scoring.pairwise.Scores`, tensor or
            array).
        config: Study settings.
        query_names: One label per query (default ``"query 0"``, …).

    Returns:
        The per-query fits.
    """
    config = config or SparsityConfig()
    mat = as_matrix(scores)
    names = query_names or [f"query {q}" for q in range(mat.shape[0])]
    if len(names) != mat.shape[0]:
        raise DataError(f"Expected {mat.shape[0]} query names, received {len(names)}.")
    fits = [fit_power_law(mat[q], config, seed_offset=q) for q in range(mat.shape[0])]
    return SparsityResult(fits=fits, query_names=list(names), config=config)
