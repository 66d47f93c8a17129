"""Damping chosen by measurement: re-damp one fitted operator and score at many ``λ``.

Every curvature operator applies ``(G_ℓ + λ_ℓ I)^{-1}``. K-FAC / EK-FAC store ``G_ℓ`` in an
eigenbasis, ``G_ℓ = (Q_S ⊗ Q_A) diag(vec Λ_ℓ) (Q_S ⊗ Q_A)^⊤``, so a new damping only changes
the divisor ``Λ_ℓ + λ``; the diagonal operator stores ``d_ℓ`` (divisor ``d_ℓ + λ``) and DataInf
its per-example gradients (``λ`` enters its Sherman–Morrison terms). Re-damping therefore
never refits. Two rules give ``λ_ℓ``:

* ``absolute``: ``λ_ℓ = v`` for every layer;
* ``relative``: ``λ_ℓ = v · mean(Λ_ℓ)`` — the mean eigenvalue of ``G_ℓ`` (``mean(d_ℓ)`` for
  the diagonal, ``(n d_ℓ)^{-1} Σ_i ‖g_i‖²`` for DataInf), the rule of
  ``FitConfig(damping_factor=v)``. The library default is ``relative 0.1``.

**One pass over the training data.** For ``K`` settings the preconditioned queries
``q̃^{(k)}_ℓ = (G_ℓ + λ^{(k)}_ℓ I)^{-1} ∇f_q`` are stacked into one ``(K·Q, out, in)`` set, so
each training batch's per-layer gradients are captured once and contracted with all ``K·Q``
rows (:func:`~influscope.scoring.pairwise.score_pass`). The query gradients are taken once
per setting (``K`` passes over the ``Q`` queries — small next to the training set); the
contraction costs ``K`` times that of one score.

**Criteria** (none needs retraining except LDS):

* *self-consistency* — pairs ``(query i, training position j)`` where query ``i`` is made from
  training sequence ``j``'s own text: fraction of pairs where ``j`` ranks first for ``i``, and
  the mean rank of ``j`` (1 = best);
* *planted check set* — for query ``i`` the set ``C_i`` of training positions that should rank
  top: top-1 = fraction of queries whose best-ranked sequence is in ``C_i``, recall@k =
  ``|top_k(i) ∩ C_i| / |C_i|`` averaged;
* *LDS* — given retrained-subset masks ``(m, N)`` and measurements ``(m, Q)``
  (:func:`influscope.metrics.lds_score`).

Against the reference setting each ``λ`` also reports the mean per-query Spearman correlation
of its scores and the mean top-k overlap ``|top_k ∩ top_k^{ref}| / k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from influscope.config import ScoreConfig
from influscope.curvature.base import CurvatureOperator
from influscope.curvature.datainf import DataInfOperator
from influscope.curvature.diagonal import DiagonalOperator
from influscope.curvature.eigen import KroneckerEigenOperator
from influscope.curvature.streamed import StreamedOperator
from influscope.errors import ConfigError
from influscope.modules.tracked import TrackedModel
from influscope.scoring.pairwise import score_pass
from influscope.scoring.queries import PreconditionedQueries, precondition_queries
from influscope.tasks.data import EncodedDataset

#: Default absolute grid: 1e-8 … 1e-2 (Kronfluence's default is 1e-8).
DEFAULT_ABSOLUTE = tuple(10.0**e for e in range(-8, -1))
#: Default relative grid (factor × mean eigenvalue): 1e-4 … 1 (influscope's default is 0.1).
DEFAULT_RELATIVE = (1e-4, 1e-3, 1e-2, 0.1, 1.0)
#: The library default, ``FitConfig(damping=None, damping_factor=0.1)``.
REFERENCE = ("relative", 0.1)

CRITERIA = ("lds", "check", "self_consistency")


def check_damping(value, what: str = "damping") -> float:
    """``value`` as a float, or ConfigError unless it is finite and ``≥ 0``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number ≥ 0, received {value!r}.") from None
    if not math.isfinite(v) or v < 0:
        raise ConfigError(
            f"{what} must be finite and ≥ 0, received {value!r}: λ is added to the curvature's "
            "eigenvalues, so a negative, NaN or infinite value gives no usable inverse."
        )
    return v


def mean_eigenvalues(op: CurvatureOperator) -> dict[str, float]:
    """``{layer: mean eigenvalue of G_ℓ}`` from what the operator stores.

    Raises:
        ConfigError: For an operator storing no curvature (identity) or an unknown kind.
    """
    if isinstance(op, StreamedOperator):  # one layer loaded at a time
        return {
            k: v for name in op.layer_names for k, v in mean_eigenvalues(op.layer(name)).items()
        }
    if isinstance(op, KroneckerEigenOperator):
        return {k: float(v.double().mean()) for k, v in op.eigenvalues.items()}
    if isinstance(op, DiagonalOperator):
        return {k: float(v.double().mean()) for k, v in op.diag.items()}
    if isinstance(op, DataInfOperator):
        return {k: float(op.sq_norms[k].mean()) / g[0].numel() for k, g in op.grads.items()}
    raise ConfigError(
        f"Cannot re-damp a {op.name!r} operator: it stores no curvature to add λ to "
        "(identity ignores damping). Fit 'ekfac', 'kfac', 'diagonal' or 'datainf'."
    )


def redamp(
    op: CurvatureOperator, damping: float | None = None, damping_factor: float | None = None
) -> CurvatureOperator:
    """A copy of ``op`` (sharing its tensors) with a new damping.

    Args:
        op: A fitted operator.
        damping: Absolute ``λ`` for every layer, or ``None``.
        damping_factor: ``λ_ℓ = factor × mean eigenvalue of G_ℓ``, or ``None``.
            Exactly one of the two must be given.

    Raises:
        ConfigError: Both or neither given, a negative / non-finite value, or an operator
            that cannot be re-damped.
    """
    if (damping is None) == (damping_factor is None):
        raise ConfigError(
            "Give exactly one of damping (absolute λ) and damping_factor (λ = factor × mean "
            f"eigenvalue per layer); received damping={damping!r}, "
            f"damping_factor={damping_factor!r}."
        )
    means = mean_eigenvalues(op)
    if damping is not None:
        lam = {k: check_damping(damping) for k in means}
    else:
        f = check_damping(damping_factor, "damping_factor")
        lam = {k: f * m for k, m in means.items()}
    if isinstance(op, DataInfOperator) and not all(v > 0 for v in lam.values()):
        raise ConfigError(f"curvature='datainf' divides by λ, which must be > 0; received {lam}.")
    if isinstance(op, StreamedOperator):  # the same files, another λ (nothing read)
        return op.with_damping(lam)
    if isinstance(op, DataInfOperator):
        out = DataInfOperator.__new__(DataInfOperator)
        out.__dict__.update(op.__dict__)
        out.damping = lam
        return out
    return type(op).from_tensors(op.tensors(), lam)


@dataclass
class DampingSetting:
    """One damping: ``rule`` (``"absolute"`` | ``"relative"``), ``value``, and the per-layer
    absolute ``λ_ℓ`` it gives."""

    rule: str
    value: float
    per_layer: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.rule} {self.value:.3g}"


@dataclass
class DampingRow:
    """Scores and criteria at one damping (``None``: criterion not given).

    Attributes:
        setting: The damping.
        top: ``(Q, k)`` training positions, best first, per query.
        spearman_vs_reference: Mean over queries of Spearman(scores, reference scores).
        overlap_vs_reference: Mean over queries of ``|top_k ∩ top_k^{ref}| / k``.
        self_top1: Fraction of self pairs whose training sequence ranks first.
        self_mean_rank: Mean rank (1 = best) of the paired training sequence.
        check_top1: Fraction of queries whose top-ranked sequence is in its check set.
        check_recall: Mean recall@k of the check sets.
        lds: Mean LDS over queries (NaN queries ignored).
    """

    setting: DampingSetting
    top: list[list[int]]
    spearman_vs_reference: float
    overlap_vs_reference: float
    self_top1: float | None = None
    self_mean_rank: float | None = None
    check_top1: float | None = None
    check_recall: float | None = None
    lds: float | None = None


@dataclass
class DampingSweep:
    """Result of :func:`damping_sweep`.

    Attributes:
        rows: One per damping, in the order scored.
        reference: Index into ``rows`` of the reference damping.
        k: The ``k`` of top-k, overlap and recall.
        criterion: Criterion used to recommend (``"lds"``, ``"check"``, ``"self_consistency"``)
            or ``None`` when none was given.
        best: Index into ``rows`` of the recommended damping, or ``None``.
        scores: ``{label: (Q, N) pairwise scores}`` (not in :meth:`to_dict`).
    """

    rows: list[DampingRow]
    reference: int
    k: int
    criterion: str | None
    best: int | None
    scores: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def recommended(self) -> DampingSetting | None:
        return None if self.best is None else self.rows[self.best].setting

    def to_dict(self) -> dict:
        """JSON-serialisable summary (without the score matrices)."""
        return {
            "rows": [asdict(r) for r in self.rows],
            "reference": self.reference,
            "k": self.k,
            "criterion": self.criterion,
            "best": self.best,
        }


def settings_from(
    values: Sequence[float] | None, relative: Sequence[float] | None
) -> list[tuple[str, float]]:
    """``[(rule, value)]``; both ``None`` → the default grids; the reference is always added."""
    if values is None and relative is None:
        values, relative = DEFAULT_ABSOLUTE, DEFAULT_RELATIVE
    out = [("absolute", check_damping(v)) for v in values or ()]
    out += [("relative", check_damping(v, "damping_factor")) for v in relative or ()]
    if not out:
        raise ConfigError(
            "The damping sweep needs at least one value: give values (absolute λ) and/or "
            "relative (factors × mean eigenvalue), or leave both None for the default grids."
        )
    if REFERENCE not in out:
        out.append(REFERENCE)
    return list(dict.fromkeys(out))


def _ranks(row: torch.Tensor) -> torch.Tensor:
    """Rank of each entry, 1 = highest score: ``(N,)``."""
    order = torch.argsort(row, descending=True, stable=True)
    r = torch.empty_like(order)
    r[order] = torch.arange(1, row.numel() + 1, device=row.device)
    return r


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a).double(), _ranks(b).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def self_consistency(
    pairwise: torch.Tensor, pairs: Sequence[tuple[int, int]]
) -> tuple[float, float]:
    """``(fraction ranked first, mean rank)`` of training position ``j`` for query ``i``.

    Args:
        pairwise: ``(Q, N)`` scores.
        pairs: ``[(query i, training position j)]``.
    """
    if not pairs:
        raise ConfigError("self-consistency needs at least one (query, training position) pair.")
    ranks = []
    for i, j in pairs:
        if not (0 <= i < pairwise.shape[0] and 0 <= j < pairwise.shape[1]):
            raise ConfigError(
                f"pair ({i}, {j}) is out of range for {pairwise.shape[0]} queries × "
                f"{pairwise.shape[1]} training sequences."
            )
        ranks.append(int(_ranks(pairwise[i])[j]))
    return sum(r == 1 for r in ranks) / len(ranks), sum(ranks) / len(ranks)


def check_set_metrics(
    pairwise: torch.Tensor, check: Sequence[Sequence[int]], k: int
) -> tuple[float, float]:
    """``(top-1, mean recall@k)`` of the check sets (one per query; empty sets skipped)."""
    if len(check) != pairwise.shape[0]:
        raise ConfigError(
            f"check must hold one set of training positions per query: {pairwise.shape[0]} "
            f"queries, received {len(check)} sets."
        )
    top1, recall = [], []
    for i, c in enumerate(check):
        c = set(int(x) for x in c)
        if not c:
            continue
        top = torch.topk(pairwise[i], min(k, pairwise.shape[1])).indices.tolist()
        top1.append(float(top[0] in c))
        recall.append(len(c.intersection(top)) / len(c))
    if not top1:
        raise ConfigError("every check set is empty.")
    return sum(top1) / len(top1), sum(recall) / len(recall)


def _stack(pqs: list[PreconditionedQueries]) -> PreconditionedQueries:
    """Concatenate preconditioned queries along the query axis: ``(K·Q, ...)``."""
    first = pqs[0]
    return PreconditionedQueries(
        first.layer_names,
        {k: torch.cat([p.dense[k] for p in pqs]) for k in first.dense},
        {
            k: (
                torch.cat([p.factors[k][0] for p in pqs]),
                torch.cat([p.factors[k][1] for p in pqs]),
            )
            for k in first.factors
        },
        None if first.measurements is None else torch.cat([p.measurements for p in pqs]),
        None,
    )


def damping_sweep(
    tracked: TrackedModel,
    operator: CurvatureOperator,
    queries: EncodedDataset,
    train: EncodedDataset,
    values: Sequence[float] | None = None,
    relative: Sequence[float] | None = None,
    config: ScoreConfig | None = None,
    k: int = 10,
    pairs: Sequence[tuple[int, int]] | None = None,
    check: Sequence[Sequence[int]] | None = None,
    lds: tuple | None = None,
) -> DampingSweep:
    """Score ``queries`` at every damping with one pass over ``train``.

    Args:
        tracked: The model, its task and the tracked layers.
        operator: One fitted operator (its own damping is ignored).
        queries: ``Q`` encoded queries.
        train: ``N`` encoded training sequences.
        values: Absolute ``λ`` values.
        relative: Factors of the mean eigenvalue per layer. Both ``None``: default grids
            (:data:`DEFAULT_ABSOLUTE`, :data:`DEFAULT_RELATIVE`). The reference (relative 0.1,
            the library default) is always scored.
        config: Score settings; ``normalize="relatif"`` and score-time damping are refused.
        k: ``k`` for top-k, overlap and recall.
        pairs: Self-consistency pairs ``(query i, training position j)``.
        check: Per query, the training positions that should rank top.
        lds: ``(masks (m, N), measured (m, Q))`` from retrained subsets.

    Returns:
        :class:`DampingSweep`; ``best`` maximises the first criterion given among LDS, check
        top-1 (ties: recall), self-consistency top-1 (ties: lower mean rank).

    Raises:
        ConfigError: Invalid damping values, ``k < 1``, an operator without curvature, or
            malformed criteria.
    """
    config = config or ScoreConfig()
    if config.normalize is not None:
        raise ConfigError("damping_sweep scores unnormalised influence; use normalize=None.")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an integer ≥ 1, received {k!r}.")
    config = replace(config, damping=None, damping_factor=None)
    chosen = settings_from(values, relative)
    ops = [
        redamp(operator, damping=v) if rule == "absolute" else redamp(operator, damping_factor=v)
        for rule, v in chosen
    ]
    # K passes over the (few) queries, then ONE pass over the training data for all K·Q rows.
    pqs = [precondition_queries(tracked, op, queries, config) for op in ops]
    n_q = pqs[0].n_queries
    stacked = score_pass(tracked, _stack(pqs), train, config)
    blocks = stacked.pairwise.reshape(len(ops), n_q, -1)  # (K, Q, N)
    ref = chosen.index(REFERENCE)
    kk = min(k, blocks.shape[-1])
    tops = torch.topk(blocks, kk, dim=-1).indices  # (K, Q, kk)
    rows = []
    for i, ((rule, v), op) in enumerate(zip(chosen, ops, strict=True)):
        s = blocks[i]  # (Q, N)
        row = DampingRow(
            setting=DampingSetting(rule, v, dict(op.damping)),
            top=tops[i].tolist(),
            spearman_vs_reference=float(
                np.nanmean([_spearman(s[q], blocks[ref, q]) for q in range(n_q)])
            ),
            overlap_vs_reference=float(
                np.mean(
                    [
                        len(set(tops[i, q].tolist()) & set(tops[ref, q].tolist())) / kk
                        for q in range(n_q)
                    ]
                )
            ),
        )
        if pairs is not None:
            row.self_top1, row.self_mean_rank = self_consistency(s, pairs)
        if check is not None:
            row.check_top1, row.check_recall = check_set_metrics(s, check, kk)
        if lds is not None:
            from influscope.metrics import lds_score

            row.lds = float(np.nanmean(lds_score(s.double().cpu().numpy(), *lds)))
        rows.append(row)
    criterion, best = _recommend(rows)
    labels = [r.setting.label for r in rows]
    return DampingSweep(rows, ref, kk, criterion, best, dict(zip(labels, blocks, strict=True)))


def _recommend(rows: list[DampingRow]) -> tuple[str | None, int | None]:
    """The first available criterion and the row maximising it (first on ties)."""
    keys = {
        "lds": lambda r: (r.lds,),
        "check": lambda r: (r.check_top1, r.check_recall),
        "self_consistency": lambda r: (r.self_top1, -r.self_mean_rank),
    }
    present = {
        "lds": rows[0].lds,
        "check": rows[0].check_top1,
        "self_consistency": rows[0].self_top1,
    }
    for name in CRITERIA:
        if present[name] is not None:
            key = keys[name]
            best = max(
                range(len(rows)),
                key=lambda i: tuple(-math.inf if math.isnan(x) else x for x in key(rows[i])),
            )
            return name, best
    return None, None


def score_damping(op: CurvatureOperator, config: ScoreConfig) -> CurvatureOperator:
    """``op`` re-damped by ``config.damping`` / ``config.damping_factor``, or ``op`` itself."""
    if config.damping is None and config.damping_factor is None:
        return op
    return redamp(op, config.damping, config.damping_factor)


def damping_range(op: CurvatureOperator) -> str:
    """``λ`` over the layers in one phrase: ``"λ 1e-05 … 0.003 (mean 0.0004) over 90 layers"``."""
    lam = list(op.damping.values())
    if not lam:
        return "no layers"
    if min(lam) == max(lam):
        return f"λ {min(lam):.3g} over {len(lam)} layers"
    mean = sum(lam) / len(lam)
    return f"λ {min(lam):.3g} … {max(lam):.3g} (mean {mean:.3g}) over {len(lam)} layers"


def describe_damping(op: CurvatureOperator, config: ScoreConfig | None = None) -> str:
    """One line stating the damping used: its rule and the range of ``λ_ℓ`` over layers.

    Args:
        op: The operator scores were computed with (already re-damped, if at all).
        config: The score settings, whose ``damping`` / ``damping_factor`` name the rule.
    """
    span = damping_range(op)
    if config is not None and config.damping is not None:
        return f"absolute {config.damping:.3g} (score-time override); {span}"
    if config is not None and config.damping_factor is not None:
        return (
            f"relative {config.damping_factor:.3g} × mean eigenvalue per layer "
            f"(score-time override); {span}"
        )
    if op.name == "identity":
        return "none (identity curvature)"
    return f"as fitted; {span}"
