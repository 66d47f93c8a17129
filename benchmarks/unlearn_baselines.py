"""Baselines the Newton unlearning step is compared with.

* :func:`gradient_ascent` — plain gradient *ascent* on the forget set's summed loss,
  ``θ ← θ + η ∇_θ Σ_{z∈D_f} L(z, θ)`` for ``steps`` steps, on the same parameters the Newton step
  edits (the tracked layers' ``[W b]``), optionally with each step's norm fixed so that the
  budget (parameter-space distance) matches another method's;
* :func:`random_step` — a random direction with the same per-layer norms as a given step, the
  control that shows a step's *direction* matters and not only its size.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from influscope.applications.unlearn import apply_step, forget_gradients
from influscope.errors import ConfigError
from influscope.modules.selection import select_layers
from influscope.modules.tracked import TrackedModel
from influscope.tasks import EncodedDataset, Task

__all__ = ["gradient_ascent", "random_step"]


def gradient_ascent(
    model: nn.Module,
    task: Task,
    forget: EncodedDataset,
    layers: Sequence[str],
    *,
    lr: float | None = None,
    step_norm: float | None = None,
    steps: int = 1,
    batch_size: int = 8,
) -> nn.Module:
    """A copy of ``model`` after ``steps`` of gradient ascent on the forget set's loss.

    Each step adds ``η g`` to every layer in ``layers``, ``g = Σ_{z∈D_f} ∇_{[W b]} L(z)`` (all
    listed layers jointly): with ``lr`` the step is ``lr · g``; with ``step_norm`` it is
    ``step_norm · g / ‖g‖`` (the Frobenius norm over all listed layers), which matches the
    parameter distance of another method per step.

    Args:
        model: The trained model (not modified).
        task: The task (its training loss is ascended).
        forget: The sequences to forget.
        layers: Names of the tracked layers to edit.
        lr: Learning rate ``η`` (exclusive with ``step_norm``).
        step_norm: Norm of each step (exclusive with ``lr``).
        steps: Number of ascent steps (one pass over ``forget`` each).
        batch_size: Sequences per pass.

    Raises:
        ConfigError: Neither or both of ``lr`` / ``step_norm``, or non-positive values.
    """
    if (lr is None) == (step_norm is None):
        raise ConfigError(
            f"Give exactly one of lr or step_norm, received lr={lr}, step_norm={step_norm}."
        )
    size = lr if lr is not None else step_norm
    if not size > 0 or steps < 1:
        raise ConfigError(f"lr/step_norm and steps must be positive, received {size}, {steps}.")
    edited = copy.deepcopy(model)
    tracked = TrackedModel(edited, task, tuple(select_layers(edited, list(layers))))
    for _ in range(steps):
        grads = forget_gradients(tracked, forget, batch_size)
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads.values()))
        factor = lr if lr is not None else step_norm / max(float(norm), 1e-30)
        apply_step(edited, {name: factor * g for name, g in grads.items()})
    return edited


def random_step(
    model: nn.Module, step: dict[str, torch.Tensor], seed: int = 0
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` moved along a random direction with ``step``'s per-layer norms.

    Returns:
        ``(edited model, the random step {layer: (out, in[+1])})``.
    """
    g = torch.Generator().manual_seed(seed)
    rand = {}
    for name, delta in step.items():
        r = torch.randn(delta.shape, generator=g, dtype=torch.float64)
        rand[name] = (r * (delta.double().norm() / r.norm())).to(delta.dtype)
    edited = copy.deepcopy(model)
    apply_step(edited, rand)
    return edited, rand
