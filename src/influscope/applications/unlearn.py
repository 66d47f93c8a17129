"""Influence-based unlearning: remove training sequences with one Newton step.

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
design notes); ``layers`` names them explicitly.

Example:
    >>> result = unlearn(model, "causal_lm", train, forget=[3, 17], fit_config=FitConfig())  # doctest: +SKIP
    >>> result.model.save_pretrained("runs/edited")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from influscope.config import FitConfig
from influscope.curvature.base import CurvatureOperator
from influscope.errors import ConfigError, DataError
from influscope.modules.passes import eval_mode, layer_passes
from influscope.modules.selection import TrackedLayer
from influscope.tasks import EncodedDataset, Task

__all__ = [
    "UnlearnConfig",
    "UnlearnReport",
    "UnlearnResult",
    "apply_step",
    "forget_gradients",
    "layer_shares",
    "newton_step",
    "sequence_losses",
    "unlearn",
]


@dataclass(frozen=True)
class UnlearnConfig:
    """Settings of the Newton unlearning step.

    Attributes:
        scale: Multiplier ``s`` of the Newton step (1 = the first-order removal).
        layers: Explicit tracked layer names to edit (``None``: see ``top_layers``).
        top_layers: Edit only the ``k`` layers with the largest share of the forget set's
            influence (``None``: every tracked layer). Exclusive with ``layers``.
        forget_weight: Weight ``w`` of each forget sequence in the training objective (e.g. the
            number of times it was visited per epoch when records were repeated).
        n_train: ``N`` of the objective ``(1/N) Σ_i w_i L(z_i)``; ``None``: the number of
            training sequences given.
        batch_size: Sequences per pass when computing the forget gradient.
    """

    scale: float = 1.0
    layers: tuple[str, ...] | None = None
    top_layers: int | None = None
    forget_weight: float = 1.0
    n_train: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
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
        if self.top_layers is not None and self.top_layers < 1:
            raise ConfigError(f"top_layers must be None or ≥ 1, received {self.top_layers}.")
        if not (math.isfinite(self.forget_weight) and self.forget_weight > 0):
            raise ConfigError(f"forget_weight must be > 0, received {self.forget_weight}.")
        if self.n_train is not None and self.n_train < 1:
            raise ConfigError(f"n_train must be None or ≥ 1, received {self.n_train}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, received {self.batch_size}.")


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
        predicted_loss_increase: First-order prediction of ``after − before``.
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UnlearnResult:
    """The edited model, the per-layer step and the report."""

    model: nn.Module
    step: dict[str, torch.Tensor]
    report: UnlearnReport


def forget_gradients(
    model: nn.Module,
    task: Task,
    layers: Sequence[TrackedLayer],
    forget: EncodedDataset,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """``g_ℓ = Σ_{z∈D_f} ∇_{W_ℓ} L(z, θ)`` with the data labels: ``{layer: (out, in[+1])}``."""
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
    ranked = sorted(shares, key=lambda n: -shares[n])[: config.top_layers]
    return [n for n in shares if n in ranked]  # keep module order


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
    idx = [int(i) for i in forget]
    if not idx:
        raise DataError("The forget set is empty (expected at least one training index).")
    bad = [i for i in idx if not 0 <= i < len(train)]
    if bad:
        raise DataError(
            f"Forget indices {bad[:5]} are outside the training set (0 … {len(train) - 1})."
        )
    if len(set(idx)) != len(idx):
        raise DataError("Forget indices repeat; give each training index once.")
    return train.subset(idx)


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
) -> UnlearnResult:
    """Remove ``forget`` from a trained model with one (scaled) Newton step.

    Args:
        model: The trained model (left unchanged unless ``inplace``).
        task: A task or task name (``"causal_lm"``, ...).
        train: The training set the model was trained on (its size gives ``N``; the curvature
            is fitted on it when ``factors`` is not given).
        forget: The sequences to remove: indices into ``train`` or an encoded dataset.
        factors: A fitted curvature operator over (at least) the edited layers.
        fit_config: How to fit the curvature when ``factors`` is ``None`` (default EK-FAC).
        modules: Modules to track (preset, regex or names), as in :class:`~influscope.Influence`.
        config: Step scale, layer restriction, forget weight.
        run_dir: Store / reuse fitted factors here.
        inplace: Edit ``model`` itself instead of a deep copy.

    Returns:
        :class:`UnlearnResult` with the edited model and an :class:`UnlearnReport`.
    """
    from influscope.analyzer import Influence

    config = config or UnlearnConfig()
    inf = Influence(model, task, modules=modules, run_dir=run_dir, device=_device(model))
    forget_set = _forget_data(train, forget)
    if factors is None:
        factors = inf.fit(train, fit_config or FitConfig())
    grads = forget_gradients(inf.model, inf.task, inf.layers, forget_set, config.batch_size)
    shares = layer_shares(factors, grads)
    names = _choose(shares, config)
    n_train = config.n_train or len(train)
    coefficient = config.scale * config.forget_weight / n_train
    step = newton_step(factors, grads, names, coefficient)
    predicted = sum(float((grads[n] * step[n]).sum()) for n in names)
    before = float(sequence_losses(inf.model, inf.task, forget_set, config.batch_size).sum())
    edited = model if inplace else copy.deepcopy(model)
    apply_step(edited, step)
    after = float(sequence_losses(edited, inf.task, forget_set, config.batch_size).sum())
    report = UnlearnReport(
        edited_layers=names,
        layer_shares=shares,
        step_norms={n: float(step[n].norm()) for n in names},
        n_forget=len(forget_set),
        n_train=n_train,
        scale=config.scale,
        forget_weight=config.forget_weight,
        curvature=factors.name,
        forget_loss_before=before,
        forget_loss_after=after,
        predicted_loss_increase=predicted,
    )
    return UnlearnResult(edited, step, report)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
