"""SOURCE (Bae et al. 2024, arXiv 2405.12186) and TracIn-CP over a run's checkpoints.

**SOURCE.** The run is split into ``L`` segments (:mod:`influscope.trajectory.checkpoints`);
segment ``ℓ`` takes ``K_ℓ`` steps at mean learning rate ``η̄_ℓ`` and is treated as
*stationary*: a fixed damped curvature ``H_ℓ = G_ℓ + λ_ℓ I`` (EK-FAC fitted at the segment's
checkpoint θ_ℓ) and fixed training gradients ``∇L(z, θ_ℓ)``. Unrolling the linearised
gradient-descent recursion ``δ ← (I − ηH_ℓ) δ − η ε ∇L(z)`` over the segment gives, with
``(I − ηH)^K ≈ exp(−ηK H)``, the segment's own contribution ``−(I − S_ℓ) H_ℓ^{-1} ∇L(z, θ_ℓ)``
and the propagation ``S_ℓ = exp(−η̄_ℓ K_ℓ H_ℓ)`` of whatever earlier segments did. The
derivative of the final query measurement ``f(θ_T)`` is then

.. math:: I(z) = -∇f(θ_T)^⊤ \\sum_ℓ \\Big(\\prod_{ℓ' > ℓ} S_{ℓ'}\\Big) (I - S_ℓ) H_ℓ^{-1} ∇L(z, θ_ℓ),

in influscope's convention (:mod:`influscope.scoring.pairwise`): ``ε`` up-weights ``z`` in the
mean objective ``J = (1/N) Σ L + ε L(z)``, positive = helps. With one segment and
``η̄K → ∞`` (``stationary=True``) it is the ordinary EK-FAC influence ``-∇fᵀ H^{-1} ∇L``.

In the eigenbasis ``Q_S ⊗ Q_A`` of a layer's EK-FAC, both matrix functions are elementwise
on the ``(out, in)`` eigenvalue matrix: ``S = exp(−ηK(Λ+λ))`` and
``(I − S) H^{-1} = (1 − exp(−ηK(Λ+λ))) / (Λ+λ)``.

Approximations (beyond EK-FAC itself and SOURCE's stationarity within a segment):

* The product ``Π_{ℓ'>ℓ} S_{ℓ'}`` is applied *exactly* for the per-segment EK-FAC matrices:
  the query gradient is pushed back through ``S_L, S_{L−1}, …`` one segment at a time, each in
  its own segment's eigenbasis (rotate in, scale, rotate out). No shared eigenbasis is
  assumed; the matrices are block-diagonal over the tracked layers, so untracked parameters
  and cross-layer curvature are ignored, as in every EK-FAC score.
* The segment's curvature and training gradients are those at its *last* checkpoint θ_ℓ (the
  paper averages over the checkpoints inside a segment when it has several; with
  ``segments=L`` smaller than the number of checkpoints, each group's last checkpoint
  represents it and ``K``, ``η̄`` are summed / step-weighted over the group).
* The optimizer is treated as plain gradient descent with the schedule's learning rate: the
  AdamW preconditioner and momentum are not modelled. ``lr_scale`` multiplies every ``η̄K``
  (e.g. to account for Adam's effective step size) and is the one free knob.
* The damping λ of each EK-FAC enters ``S`` too (``S = exp(−ηK(G+λI))``), which also keeps the
  closed form finite on flat directions.
* ``∇f`` is taken at the last checkpoint (θ_T), or at ``final_model`` when given.

**TracIn-CP** (Pruthi et al. 2020): ``Σ_k η_k (−∇f(θ_k)^⊤ ∇L(z, θ_k))`` over the same
checkpoints, ``η_k`` the segment's learning rate (:func:`tracin_scores`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from influscope.analyzer import Influence
from influscope.config import FitConfig, ScoreConfig
from influscope.curvature import IdentityOperator
from influscope.curvature.eigen import KroneckerEigenOperator
from influscope.errors import ConfigError
from influscope.scoring.pairwise import Scores
from influscope.scoring.queries import PreconditionedQueries
from influscope.tasks.data import EncodedDataset
from influscope.trajectory.checkpoints import Trajectory, check_same_architecture, load_trajectory

__all__ = ["Segment", "segment_filters", "source_queries", "source_scores", "tracin_scores"]


class Segment:
    """A SOURCE segment: the checkpoint that represents it, ``K`` steps, mean rate ``η̄``."""

    def __init__(self, checkpoint, steps: int, lr: float) -> None:
        self.checkpoint, self.steps, self.lr = checkpoint, steps, lr

    @property
    def horizon(self) -> float:
        """``η̄ K``."""
        return self.lr * self.steps

    def __repr__(self) -> str:
        return f"Segment(step={self.checkpoint.step}, K={self.steps}, lr={self.lr:.3g})"


def make_segments(trajectory: Trajectory, segments: int | None = None) -> list[Segment]:
    """Group the checkpoints into ``segments`` contiguous segments (default: one each).

    Raises:
        ConfigError: More segments asked for than there are checkpoints.
    """
    n = len(trajectory)
    lengths = trajectory.segment_lengths()
    if segments is None:
        segments = n
    if not isinstance(segments, int) or segments < 1:
        raise ConfigError(f"segments must be a positive integer or None, received {segments!r}.")
    if segments > n:
        raise ConfigError(
            f"{segments} segments asked for, but the trajectory has {n} checkpoint(s) at steps "
            f"{trajectory.steps}; each segment needs its own checkpoint. Save more checkpoints "
            f"(train_lm(checkpoint_every=...), Trainer save_steps) or ask for segments ≤ {n}."
        )
    bounds = [round(i * n / segments) for i in range(segments + 1)]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        k = sum(lengths[lo:hi])
        lr = sum(lengths[i] * trajectory[i].lr for i in range(lo, hi)) / k
        out.append(Segment(trajectory[hi - 1], k, lr))
    return out


def segment_filters(
    eigenvalues: torch.Tensor, damping: float, horizon: float, stationary: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, (I − S) H^{-1})`` of one layer as elementwise factors on ``Λ + λ``.

    Returns:
        ``exp(−ηK(Λ+λ))`` and ``(1 − exp(−ηK(Λ+λ)))/(Λ+λ)``, both ``(out, in)``; with
        ``stationary`` (``ηK = ∞``): ``0`` and ``1/(Λ+λ)``.
    """
    lam = eigenvalues.double() + damping
    if stationary or horizon == float("inf"):
        return torch.zeros_like(lam), 1.0 / lam
    x = horizon * lam
    return torch.exp(-x), -torch.expm1(-x) / lam


def source_queries(
    query_grads: dict[str, torch.Tensor],
    operators: Sequence[KroneckerEigenOperator],
    horizons: Sequence[float],
    stationary: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Per segment, ``v_ℓ = (I − S_ℓ) H_ℓ^{-1} S_{ℓ+1} ⋯ S_L ∇f`` for every layer.

    Args:
        query_grads: ``{layer: (Q, out, in)}`` raw query gradients ``∇f(θ_T)``.
        operators: Each segment's EK-FAC (or K-FAC), first segment first.
        horizons: Each segment's ``η̄ K``.
        stationary: ``ηK = ∞`` in every segment (then only the last segment contributes).

    Returns:
        One ``{layer: (Q, out, in)}`` per segment, in segment order. ``I(z) = Σ_ℓ −v_ℓ ·
        ∇L(z, θ_ℓ)`` (the symmetric matrices commute with the transpose).
    """
    out: list[dict[str, torch.Tensor]] = [{} for _ in operators]
    for name, g in query_grads.items():
        u = g.double()  # (Q, out, in), ∇f pushed back through the later segments' S
        for ell in range(len(operators) - 1, -1, -1):
            op = operators[ell]
            decay, gain = segment_filters(
                op.eigenvalues[name], op.damping[name], horizons[ell], stationary
            )
            q_s = op.q_s[name].to(u.device, u.dtype)  # (out, out)
            q_a = op.q_a[name].to(u.device, u.dtype)  # (in, in)
            rotated = q_s.t() @ u @ q_a  # (Q, out, in)
            out[ell][name] = q_s @ (rotated * gain.to(u)) @ q_a.t()
            u = q_s @ (rotated * decay.to(u)) @ q_a.t()
    return out


def _trajectory(checkpoints, **kwargs) -> Trajectory:
    return load_trajectory(checkpoints, **kwargs)


def source_scores(
    checkpoints,
    task,
    modules,
    train: EncodedDataset,
    queries: EncodedDataset,
    fit_config: FitConfig | None = None,
    *,
    segments: int | None = None,
    stationary: bool = False,
    lr_scale: float = 1.0,
    final_model: nn.Module | None = None,
    fit_train: EncodedDataset | None = None,
    batch_size: int = 8,
    device=None,
    return_segments: bool = False,
    **load_kwargs,
) -> Scores | tuple[Scores, list[Scores]]:
    """SOURCE influence of every training sequence on every query (see the module docstring).

    Args:
        checkpoints: Anything :func:`~influscope.trajectory.load_trajectory` takes (a
            Trajectory, a Trainer ``output_dir``, ``train_lm`` checkpoints with ``config=``,
            models with ``steps=`` / ``lrs=``).
        task: Task or task name.
        modules: Tracked modules (same at every checkpoint).
        train: Training sequences to score.
        queries: Queries; ``∇f`` is taken at the last checkpoint (or ``final_model``).
        fit_config: Curvature settings; ``curvature`` must be ``"ekfac"`` or ``"kfac"``.
        segments: Number of segments (default: one per checkpoint).
        stationary: ``η̄K = ∞`` in every segment (the last segment's ordinary influence).
        lr_scale: Multiplies every ``η̄K`` (e.g. for an adaptive optimizer's step size).
        final_model: The model whose queries are attributed, if not the last checkpoint.
        fit_train: Data the curvature is fitted on (default ``train``).
        batch_size: Examples per pass when scoring.
        return_segments: Also return each segment's Scores (they sum to the total).
        **load_kwargs: Passed to :func:`load_trajectory` (``config=``, ``steps=``, ``lrs=``).

    Raises:
        ConfigError: A curvature without an eigenbasis, ``lr_scale ≤ 0``, too many segments,
            or checkpoints of different architectures.
    """
    fit_config = fit_config or FitConfig()
    if fit_config.curvature not in ("ekfac", "kfac"):
        raise ConfigError(
            f"SOURCE needs a Kronecker eigenbasis curvature ('ekfac' or 'kfac'); received "
            f"{fit_config.curvature!r}. Use FitConfig(curvature='ekfac')."
        )
    if not lr_scale > 0:
        raise ConfigError(f"lr_scale must be > 0, received {lr_scale}.")
    traj = _trajectory(checkpoints, **load_kwargs)
    segs = make_segments(traj, segments)
    models = [s.checkpoint.load() for s in segs]
    final = final_model if final_model is not None else models[-1]
    check_same_architecture(
        [*models, final], [*(s.checkpoint.name for s in segs), "the final model"]
    )
    infs = [Influence(m, task, modules=modules, device=device) for m in models]
    inf_final = Influence(final, task, modules=modules, device=device)
    ops = [inf.fit(fit_train if fit_train is not None else train, fit_config) for inf in infs]
    cfg = ScoreConfig(query_rank=None, batch_size=batch_size)
    raw = inf_final.precondition(
        queries, IdentityOperator(dict.fromkeys(inf_final.layer_names, 0.0)), cfg
    )
    grads = {n: raw.matrix(n) for n in raw.layer_names}
    vs = source_queries(grads, ops, [lr_scale * s.horizon for s in segs], stationary)
    parts = []
    for inf, op, v in zip(infs, ops, vs):
        pq = PreconditionedQueries(raw.layer_names, v, {}, raw.measurements, None)
        parts.append(inf.score(pq, train, op, cfg))
    total = Scores(
        pairwise=sum(p.pairwise for p in parts),
        layer_names=raw.layer_names,
        train_indices=list(train.indices),
        measurements=raw.measurements,
    )
    return (total, parts) if return_segments else total


def tracin_scores(
    checkpoints,
    task,
    modules,
    train: EncodedDataset,
    queries: EncodedDataset,
    *,
    batch_size: int = 8,
    device=None,
    **load_kwargs,
) -> Scores:
    """TracIn-CP ``Σ_k η_k (−∇f(θ_k)^⊤ ∇L(z, θ_k))`` over a trajectory's checkpoints.

    ``η_k`` is the checkpoint's segment learning rate (:class:`TrajectoryCheckpoint.lr`);
    the checkpoints come from anything :func:`load_trajectory` takes.
    """
    from influscope.evaluation.baselines import tracin

    traj = _trajectory(checkpoints, **load_kwargs)
    models = [c.load() for c in traj]
    check_same_architecture(models, [c.name for c in traj])
    return tracin(
        [(m, c.lr) for m, c in zip(models, traj)],
        lambda m: Influence(m, task, modules=modules, device=device),
        queries,
        train,
        batch_size,
    )
