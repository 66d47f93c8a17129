"""Influence-based unlearning: remove training sequences with one or iterated Newton steps.

The trained parameters minimise ``J(θ) = (1/N) Σ_i w_i L(z_i, θ)``. Removing a set ``D_f`` (each
sequence with weight ``w``, usually 1) moves the minimiser, to first order (Koh & Liang 2017;
Grosse et al. 2023, §2), by

.. math:: θ' - θ ≈ \\frac{w}{N} (G + λI)^{-1} \\sum_{z ∈ D_f} ∇_θ L(z, θ)

with ``G`` the Gauss-Newton Hessian of ``J``. influscope applies this step with its block-diagonal
(per tracked layer) EK-FAC / K-FAC curvature: for layer ℓ with ``g_ℓ = Σ_{z∈D_f} ∇_{W_ℓ} L(z)``
in the ``(out, in[+1])`` layout,

.. math:: ΔW_ℓ = s · \\frac{w}{N} (G_ℓ + λ_ℓ I)^{-1} g_ℓ

(``s`` = ``scale``; ``s = 1`` is the Newton step). **Biases**: a tracked layer's bias is folded in
as the last input column ``ā = [a; 1]``, so its curvature and its step cover ``[W b]`` — biases of
tracked layers are edited; untracked parameters (embeddings, LayerNorm, layers outside
``modules``) are not.

**Layer restriction.** The step's first-order increase of the forget set's summed loss is
``∇L_fᵀ Δθ = s (w/N) Σ_ℓ g_ℓᵀ (G_ℓ + λ_ℓ I)^{-1} g_ℓ``; layer ℓ's term divided by the total is its
*share* of the forget set's influence (the self-influence of ``D_f`` as one sequence, per layer).
``top_layers = k`` keeps the ``k`` layers with the largest shares (the "most salient layers" of the
design notes); ``top_layers = "auto"`` keeps the fewest layers whose shares add up to
``coverage`` (:func:`auto_layer_count`); ``layers`` names them explicitly.

**Iterative.** ``method="iterative"`` repeats damped Newton steps from where the last one ended,
with the curvature refitted at the current parameters, an optional retain term and a line search
(:mod:`influscope.applications.unlearn_iterative`).

Example:
    >>> result = unlearn(model, "causal_lm", train, forget=[3, 17], fit_config=FitConfig())  # doctest: +SKIP
    >>> result.model.save_pretrained("runs/edited")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from influscope.config import FitConfig
from influscope.curvature.base import CurvatureOperator
from influscope.errors import ConfigError, DataError
from influscope.modules.passes import eval_mode, layer_passes
from influscope.modules.tracked import TrackedModel
from influscope.tasks import EncodedDataset, Task

__all__ = [
    "METHODS",
    "UnlearnConfig",
    "UnlearnReport",
    "UnlearnResult",
    "apply_step",
    "auto_layer_count",
    "forget_gradients",
    "layer_shares",
    "newton_step",
    "sequence_losses",
    "unlearn",
]


METHODS = ("newton", "iterative")


@dataclass(frozen=True)
class UnlearnConfig:
    """Settings of Newton unlearning (one step, or iterated with refitted curvature).

    Attributes:
        method: ``"newton"`` — one step ``s (w/N) (G + λI)^{-1} g_f``; ``"iterative"`` —
            ``rounds`` damped Newton steps, each with the forget (and retain) gradient at the
            current parameters and the curvature refitted there every ``refit_every`` rounds,
            with a backtracking line search (see :mod:`influscope.applications.unlearn_iterative`).
        scale: Multiplier ``s`` of the Newton step (1 = the first-order removal); with
            ``"iterative"`` the first step size tried in every round.
        layers: Explicit tracked layer names to edit (``None``: see ``top_layers``).
        top_layers: Edit only the ``k`` layers with the largest share of the forget set's
            influence; ``"auto"``: the smallest such set whose shares add up to
            ``coverage``; ``None``: every tracked layer. Exclusive with ``layers``.
        coverage: Share of the forget set's influence that ``top_layers="auto"`` must cover.
        forget_weight: Weight ``w`` of each forget sequence in the training objective (e.g. the
            number of times it was visited per epoch when records were repeated).
        n_train: ``N`` of the objective ``(1/N) Σ_i w_i L(z_i)``; ``None``: the number of
            training sequences given.
        batch_size: Sequences per pass when computing gradients and losses.
        rounds: Iterative only: the largest number of Newton steps (``0`` leaves the model as
            it is).
        refit_every: Iterative only: refit the curvature at the current parameters before
            every ``k``-th round (round 0 uses the given / first fit); ``0`` keeps the first fit.
        retain_weight: Iterative only: weight ``β`` of the retain term; each round ascends
            ``mean_f L − β mean_r L`` (``0``: forget term only).
        forget_target: Iterative only: stop once the forget set's mean loss per sequence rose
            by this many nats (``None``: run all rounds).
        stop_retain_increase: Iterative only: with ``forget_target``, stop only once the
            retain set's mean loss is also within this many nats of the original (the retain
            term gets the rounds to repair it); ``None``: the forget target alone.
        max_retain_increase: Iterative only: a step is accepted only if the retain set's mean
            loss per sequence stays within this many nats of the original (``None``: no bound).
        max_halvings: Iterative only: how many times the line search halves a rejected step
            before it stops.
    """

    method: str = "newton"
    scale: float = 1.0
    layers: tuple[str, ...] | None = None
    top_layers: int | str | None = None
    coverage: float = 0.8
    forget_weight: float = 1.0
    n_train: int | None = None
    batch_size: int = 8
    rounds: int = 5
    refit_every: int = 1
    retain_weight: float = 0.0
    forget_target: float | None = None
    stop_retain_increase: float | None = None
    max_retain_increase: float | None = None
    max_halvings: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"Unknown unlearning method {self.method!r}. Supported: {METHODS} (one Newton "
                "step, or iterated steps with refitted curvature)."
            )
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"scale must be a finite number > 0, received {self.scale}.")
        if self.layers is not None and self.top_layers is not None:
            raise ConfigError(
                "Give either layers (explicit names) or top_layers (k most salient), not both; "
                f"received layers={self.layers}, top_layers={self.top_layers}."
            )
        if self.layers is not None:
            if isinstance(self.layers, str) or not self.layers:
                raise ConfigError(
                    f"layers must be a non-empty tuple of layer names, received {self.layers!r}."
                )
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.top_layers, str):
            if self.top_layers != "auto":
                raise ConfigError(
                    f"top_layers must be None, an integer ≥ 1 or 'auto', received "
                    f"{self.top_layers!r}."
                )
        elif self.top_layers is not None and (
            isinstance(self.top_layers, bool)
            or not isinstance(self.top_layers, int)
            or self.top_layers < 1
        ):
            raise ConfigError(
                f"top_layers must be None, an integer ≥ 1 or 'auto', received {self.top_layers!r}."
            )
        if not 0 < self.coverage <= 1:
            raise ConfigError(f"coverage must be in (0, 1], received {self.coverage}.")
        if not (math.isfinite(self.forget_weight) and self.forget_weight > 0):
            raise ConfigError(f"forget_weight must be > 0, received {self.forget_weight}.")
        if self.n_train is not None and self.n_train < 1:
            raise ConfigError(f"n_train must be None or ≥ 1, received {self.n_train}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, received {self.batch_size}.")
        if self.rounds < 0:
            raise ConfigError(f"rounds must be ≥ 0 (0 = no change), received {self.rounds}.")
        if self.refit_every < 0:
            raise ConfigError(
                f"refit_every must be ≥ 0 (0 = never refit), received {self.refit_every}."
            )
        if not (math.isfinite(self.retain_weight) and self.retain_weight >= 0):
            raise ConfigError(f"retain_weight must be ≥ 0, received {self.retain_weight}.")
        for key in ("forget_target", "stop_retain_increase", "max_retain_increase"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be None or a number > 0 (nats), received {value}.")
        if self.stop_retain_increase is not None and self.forget_target is None:
            raise ConfigError(
                "stop_retain_increase refines the forget_target stopping rule, but "
                "forget_target is None. Set forget_target (nats) as well, or drop "
                "stop_retain_increase."
            )
        if self.max_halvings < 0:
            raise ConfigError(f"max_halvings must be ≥ 0, received {self.max_halvings}.")


@dataclass
class UnlearnReport:
    """What the step did (JSON-serialisable via :meth:`to_dict`).

    Attributes:
        edited_layers: Layers whose ``[W b]`` were changed.
        layer_shares: Every tracked layer's share of the forget set's influence (sums to 1).
        step_norms: Frobenius norm of each edited layer's ``[ΔW Δb]``.
        n_forget: Forget sequences; ``n_train``: ``N``; ``scale``, ``forget_weight``: as configured.
        curvature: Name of the curvature operator.
        forget_loss_before / forget_loss_after: Summed training loss of the forget set.
        predicted_loss_increase: First-order prediction of ``after − before`` (iterative: of
            the first round's step).
        method: ``"newton"`` or ``"iterative"``.
        rounds: Iterative: one dict per accepted round (step size, losses, refit or not).
        stop_reason: Iterative: why the rounds ended (``"rounds"``, ``"forget target"``,
            ``"line search"``).
        retain_loss_before / retain_loss_after: Mean training loss per retain sequence, when a
            retain set is known.
    """

    edited_layers: list[str]
    layer_shares: dict[str, float]
    step_norms: dict[str, float]
    n_forget: int
    n_train: int
    scale: float
    forget_weight: float
    curvature: str
    forget_loss_before: float
    forget_loss_after: float
    predicted_loss_increase: float
    method: str = "newton"
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    retain_loss_before: float | None = None
    retain_loss_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UnlearnResult:
    """The edited model, the per-layer step and the report."""

    model: nn.Module
    step: dict[str, torch.Tensor]
    report: UnlearnReport


def forget_gradients(
    tracked: TrackedModel,
    forget: EncodedDataset,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """``g_ℓ = Σ_{z∈D_f} ∇_{W_ℓ} L(z, θ)`` with the data labels: ``{layer: (out, in[+1])}``."""
    model, task, layers = tracked.model, tracked.task, list(tracked.layers)
    total: dict[str, torch.Tensor] = {}
    for _, grads, _ in layer_passes(
        model, task, layers, forget, batch_size=batch_size, objective="loss", desc="forget grads"
    ):
        for name, lb in grads.items():
            g = lb.gradient().sum(0)  # (out, in)
            total[name] = total[name] + g if name in total else g
    return total


def layer_shares(operator: CurvatureOperator, grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each layer's ``g_ℓᵀ (G_ℓ + λ_ℓ I)^{-1} g_ℓ`` divided by their sum (shares sum to 1)."""
    quad = {name: float(operator.quadratic(name, g[None])[0]) for name, g in grads.items()}
    total = sum(quad.values())
    if not total > 0:
        raise DataError(
            "The forget set's gradient is zero on every tracked layer (expected a non-zero "
            "gradient). Check that the forget sequences have tokens to predict and that the "
            "tracked modules influence the loss."
        )
    return {name: value / total for name, value in quad.items()}


def _choose(shares: dict[str, float], config: UnlearnConfig) -> list[str]:
    if config.layers is not None:
        unknown = [n for n in config.layers if n not in shares]
        if unknown:
            raise ConfigError(
                f"Layers {unknown} are not tracked. Tracked layers: {list(shares)}. Track them "
                "with modules=... or pick from this list."
            )
        return [n for n in shares if n in config.layers]
    if config.top_layers is None:
        return list(shares)
    ranked = sorted(shares, key=lambda n: -shares[n])
    if config.top_layers == "auto":
        k = auto_layer_count(shares, config.coverage)
    else:
        k = config.top_layers
    chosen = ranked[:k]
    return [n for n in shares if n in chosen]  # keep module order


def auto_layer_count(shares: dict[str, float], coverage: float = 0.8) -> int:
    """Smallest ``k`` whose ``k`` largest shares add up to at least ``coverage``.

    The rule of ``top_layers="auto"``: sort the layers by their share of the forget set's
    influence, ``q_ℓ = g_ℓᵀ(G_ℓ+λ_ℓI)^{-1}g_ℓ / Σ_k g_kᵀ(G_k+λ_kI)^{-1}g_k``, and keep the
    shortest prefix with ``Σ q ≥ coverage`` (at least one layer).
    """
    total = 0.0
    for k, value in enumerate(sorted(shares.values(), reverse=True), start=1):
        total += value
        if total >= coverage - 1e-12:
            return k
    return len(shares)


def newton_step(
    operator: CurvatureOperator,
    grads: dict[str, torch.Tensor],
    names: Sequence[str],
    coefficient: float,
) -> dict[str, torch.Tensor]:
    """``ΔW_ℓ = coefficient · (G_ℓ + λ_ℓ I)^{-1} g_ℓ`` for the layers in ``names``.

    ``coefficient = scale · w / N`` for unlearning (a positive coefficient *raises* the loss of
    the sequences whose gradient is ``g``).
    """
    missing = [n for n in names if n not in operator.layer_names]
    if missing:
        raise ConfigError(
            f"The curvature has no factors for layers {missing} (it covers "
            f"{operator.layer_names}). Fit it with the same modules."
        )
    return {name: coefficient * operator.precondition(name, grads[name]) for name in names}


@torch.no_grad()
def apply_step(model: nn.Module, step: dict[str, torch.Tensor]) -> None:
    """Add each ``(out, in[+1])`` step to the named module's weight (and bias), in place.

    GPT-2 ``Conv1D`` weights (stored ``in × out``) receive the transposed step via the adapter.
    """
    from influscope.modules.adapters import adapter_for

    modules = dict(model.named_modules())
    for name, delta in step.items():
        module = modules.get(name)
        adapter = adapter_for(module) if module is not None else None
        if adapter is None:
            raise ConfigError(f"Model has no trackable module named {name!r}.")
        for param, value in adapter.split(module, delta):
            param.add_(value.to(param.device, param.dtype))


@torch.no_grad()
def sequence_losses(
    model: nn.Module, task: Task, data: EncodedDataset, batch_size: int = 8
) -> torch.Tensor:
    """Training loss ``L(z, θ)`` of each sequence (data labels): ``(N,)``."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for _, examples in data.batches(batch_size):
            batch = {k: v.to(device) for k, v in task.collate(examples).items()}
            out.append(task.training_loss(model, batch, None).detach().double().cpu())
    return torch.cat(out)


def _forget_data(train: EncodedDataset, forget: EncodedDataset | Sequence[int]) -> EncodedDataset:
    if isinstance(forget, EncodedDataset):
        return forget
    idx = _indices(train, forget, "Forget")
    return train.subset(idx)


def _indices(train: EncodedDataset, given: Sequence[int], what: str) -> list[int]:
    idx = [int(i) for i in given]
    if not idx:
        raise DataError(f"The {what.lower()} set is empty (expected at least one training index).")
    bad = [i for i in idx if not 0 <= i < len(train)]
    if bad:
        raise DataError(
            f"{what} indices {bad[:5]} are outside the training set (0 … {len(train) - 1})."
        )
    if len(set(idx)) != len(idx):
        raise DataError(f"{what} indices repeat; give each training index once.")
    return idx


def _retain_data(
    train: EncodedDataset,
    forget: EncodedDataset | Sequence[int],
    retain: EncodedDataset | Sequence[int] | None,
) -> EncodedDataset | None:
    """The retain set: given, or ``train`` without the forget indices (``None`` if unknown)."""
    if isinstance(retain, EncodedDataset):
        return retain
    if retain is not None:
        return train.subset(_indices(train, retain, "Retain"))
    if isinstance(forget, EncodedDataset):
        return None
    drop = {int(i) for i in forget}
    keep = [i for i in range(len(train)) if i not in drop]
    return train.subset(keep) if keep else None


def unlearn(
    model: nn.Module,
    task: str | Task,
    train: EncodedDataset,
    forget: EncodedDataset | Sequence[int],
    *,
    factors: CurvatureOperator | None = None,
    fit_config: FitConfig | None = None,
    modules: str | Sequence[str] = "mlp",
    config: UnlearnConfig | None = None,
    run_dir: str | None = None,
    inplace: bool = False,
    retain: EncodedDataset | Sequence[int] | None = None,
    fit_data: EncodedDataset | None = None,
) -> UnlearnResult:
    """Remove ``forget`` from a trained model with one (scaled) Newton step or iterated steps.

    Args:
        model: The trained model (left unchanged unless ``inplace``).
        task: A task or task name (``"causal_lm"``, ...).
        train: The training set the model was trained on (its size gives ``N``; the curvature
            is fitted on it when ``factors`` is not given).
        forget: The sequences to remove: indices into ``train`` or an encoded dataset.
        factors: A fitted curvature operator over (at least) the edited layers (the first
            round's curvature with ``method="iterative"``).
        fit_config: How to fit the curvature when ``factors`` is ``None`` and, with
            ``method="iterative"``, how to refit it (default EK-FAC; when only ``factors`` is
            given, its curvature name with default settings).
        modules: Modules to track (preset, regex or names), as in :class:`~influscope.Influence`.
        config: Method, step scale, layer restriction, forget weight, rounds.
        run_dir: Store / reuse the first fitted factors here (refits stay in memory).
        inplace: Edit ``model`` itself instead of a deep copy.
        retain: The sequences to keep (iterative: the retain term and the retain bound):
            indices into ``train`` or an encoded dataset; default: ``train`` without the forget
            indices when ``forget`` is given as indices.
        fit_data: The data the curvature is (re)fitted on (default ``train``; e.g. the training
            visits when records were repeated).

    Returns:
        :class:`UnlearnResult` with the edited model and an :class:`UnlearnReport`.

    Raises:
        DataError: An empty / out-of-range forget or retain set, a zero forget gradient, or an
            iterative run that needs a retain set (``retain_weight > 0`` or
            ``max_retain_increase``) when none can be inferred.
    """
    from influscope.analyzer import Influence

    config = config or UnlearnConfig()
    inf = Influence(model, task, modules=modules, run_dir=run_dir, device=_device(model))
    forget_set = _forget_data(train, forget)
    # The retain set is only measured when it is used (iterative) or given explicitly.
    need_retain = config.method == "iterative" or retain is not None
    retain_set = _retain_data(train, forget, retain) if need_retain else None
    fit_data = fit_data if fit_data is not None else train
    if factors is None:
        fit_config = fit_config or FitConfig()
        factors = inf.fit(fit_data, fit_config)
    grads = forget_gradients(inf.tracked, forget_set, config.batch_size)
    shares = layer_shares(factors, grads)
    names = _choose(shares, config)
    n_train = config.n_train or len(train)
    coefficient = config.scale * config.forget_weight / n_train
    step = newton_step(factors, grads, names, coefficient)
    predicted = sum(float((grads[n] * step[n]).sum()) for n in names)
    bs = config.batch_size
    before = float(sequence_losses(inf.tracked.model, inf.tracked.task, forget_set, bs).sum())
    retain_before = (
        float(sequence_losses(inf.tracked.model, inf.tracked.task, retain_set, bs).mean())
        if retain_set is not None
        else None
    )
    edited = model if inplace else copy.deepcopy(model)
    rounds: list[dict[str, Any]] = []
    stop_reason = None
    if config.method == "newton":
        apply_step(edited, step)
    else:
        from influscope.applications.unlearn_iterative import iterate

        needs_retain = (
            config.retain_weight > 0
            or config.max_retain_increase is not None
            or config.stop_retain_increase is not None
        )
        if retain_set is None and needs_retain:
            raise DataError(
                "Iterative unlearning with retain_weight > 0, max_retain_increase or "
                "stop_retain_increase needs a retain set, but forget was given as a dataset and "
                "retain=None. Pass retain= (indices into train or an encoded dataset) or drop "
                "those options."
            )
        fit_config = fit_config or _refit_config(factors, config)
        outcome = iterate(
            edited,
            inf.tracked.task,
            modules,
            names,
            forget_set,
            retain_set,
            factors=factors,
            fit_data=fit_data,
            fit_config=fit_config,
            coefficient=config.forget_weight / n_train,
            config=config,
            first_forget_grads=grads,
        )
        step, rounds, stop_reason = outcome.step, outcome.rounds, outcome.stop_reason
    after = float(sequence_losses(edited, inf.tracked.task, forget_set, bs).sum())
    retain_after = (
        float(sequence_losses(edited, inf.tracked.task, retain_set, bs).mean())
        if retain_set is not None
        else None
    )
    report = UnlearnReport(
        edited_layers=names,
        layer_shares=shares,
        step_norms={n: float(step[n].norm()) for n in names if n in step},
        n_forget=len(forget_set),
        n_train=n_train,
        scale=config.scale,
        forget_weight=config.forget_weight,
        curvature=factors.name,
        forget_loss_before=before,
        forget_loss_after=after,
        predicted_loss_increase=predicted,
        method=config.method,
        rounds=rounds,
        stop_reason=stop_reason,
        retain_loss_before=retain_before,
        retain_loss_after=retain_after,
    )
    return UnlearnResult(edited, step, report)


def _refit_config(factors: CurvatureOperator, config: UnlearnConfig) -> FitConfig:
    """Default refit settings: the given factors' curvature with default options."""
    from influscope.curvature import CURVATURES

    if factors.name in CURVATURES or config.refit_every == 0:
        return FitConfig(curvature=factors.name if factors.name in CURVATURES else "ekfac")
    raise ConfigError(
        f"Iterative unlearning refits the curvature every {config.refit_every} rounds, but the "
        f"given factors ({factors.name!r}) are not a fittable curvature "
        f"({sorted(CURVATURES)}). Pass fit_config=FitConfig(curvature=...) or refit_every=0."
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
