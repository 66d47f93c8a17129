"""Iterative second-order unlearning: damped Newton steps with curvature refitted on the way.

One Newton step (:mod:`influscope.applications.unlearn`) linearises the removal of ``D_f`` at the
trained parameters ``θ_0``. Memorised sequences sit where the loss is far from quadratic — their
gradient is small while the model is sure of them and grows as it stops being sure — so the
step's direction and length are only right near ``θ_0``. The iterative method (in the spirit of
SOUL, Jia et al. 2024, "SOUL: Unlocking the Power of Second-Order Optimization for LLM
Unlearning", which runs a second-order optimiser on the unlearning objective and re-estimates
the curvature as it goes) repeats the Newton step from where the last one ended. Round ``t``:

1. every ``refit_every``-th round, refit the curvature (EK-FAC by default) at ``θ_t`` on the fit
   data; otherwise keep the last one (round 0 uses the given factors);
2. gradients at ``θ_t``: ``g_f = Σ_{z∈D_f} ∇L(z, θ_t)`` and, with a retain term,
   ``g_r = Σ_{z∈D_r} ∇L(z, θ_t)``; the ascent direction of
   ``Φ(θ) = mean_{D_f} L − β mean_{D_r} L`` is ``u = g_f − β (|D_f|/|D_r|) g_r``;
3. the damped Newton step on the edited layers,
   ``d_ℓ = (w/N) (G_ℓ(θ_t) + λ_ℓ I)^{-1} u_ℓ``, tried with size ``η = s`` (``scale``);
4. backtracking line search: accept ``θ_t + η d`` if ``Φ`` rose and the retain set's mean loss
   is within ``max_retain_increase`` nats of its value at ``θ_0``; otherwise halve ``η`` (at most
   ``max_halvings`` times) and, if no size is accepted, stop;
5. stop when the forget set's mean loss rose by ``forget_target`` nats (and, with
   ``stop_retain_increase``, the retain set's mean loss is within that many nats of its value
   at ``θ_0``), or after ``rounds``.

With ``rounds = 1``, ``β = 0`` and no bound, the result is the one-step Newton edit (tested);
``rounds = 0`` changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from influscope.applications.unlearn import (
    apply_step,
    forget_gradients,
    newton_step,
    sequence_losses,
)
from influscope.config import FitConfig
from influscope.curvature.base import CurvatureOperator
from influscope.tasks import EncodedDataset, Task

if TYPE_CHECKING:
    from influscope.applications.unlearn import UnlearnConfig

__all__ = ["IterativeOutcome", "iterate"]


@dataclass
class IterativeOutcome:
    """What :func:`iterate` did.

    Attributes:
        step: ``θ_T − θ_0`` per edited layer, ``{layer: (out, in[+1])}``.
        rounds: One dict per accepted round.
        stop_reason: ``"rounds"``, ``"forget target"`` or ``"line search"``.
    """

    step: dict[str, torch.Tensor]
    rounds: list[dict[str, Any]]
    stop_reason: str


def _snapshot(modules: dict[str, nn.Module], names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": p.detach().clone()
        for name in names
        for key, p in modules[name].named_parameters(recurse=False)
    }


@torch.no_grad()
def _restore(modules: dict[str, nn.Module], saved: dict[str, torch.Tensor]) -> None:
    for full, value in saved.items():
        name, key = full.rsplit(".", 1)
        getattr(modules[name], key).copy_(value)


def _weights(modules: dict[str, nn.Module], names: Sequence[str]) -> dict[str, torch.Tensor]:
    from influscope.modules.adapters import adapter_for

    out = {}
    for name in names:
        module = modules[name]
        out[name] = adapter_for(module).weight_out_in(module).detach().clone()  # (out, in[+1])
    return out


def iterate(
    model: nn.Module,
    task: Task,
    modules: str | Sequence[str],
    names: Sequence[str],
    forget: EncodedDataset,
    retain: EncodedDataset | None,
    *,
    factors: CurvatureOperator,
    fit_data: EncodedDataset,
    fit_config: FitConfig,
    coefficient: float,
    config: UnlearnConfig,
    first_forget_grads: dict[str, torch.Tensor] | None = None,
) -> IterativeOutcome:
    """Run the rounds of iterative Newton unlearning on ``model`` **in place**.

    Args:
        model: The model to edit (modified in place).
        task: Its task.
        modules: The tracked modules (as fitted in ``factors``).
        names: The tracked layers to edit (a subset of ``modules``).
        forget: The forget set ``D_f``.
        retain: The retain set ``D_r`` (needed when ``retain_weight > 0`` or a retain bound is
            set; otherwise only reported).
        factors: Curvature at ``θ_0`` (round 0).
        fit_data: Data the curvature is refitted on.
        fit_config: How it is refitted.
        coefficient: ``w / N``.
        config: Rounds, refit period, retain weight, stopping rules.
        first_forget_grads: ``g_f`` at ``θ_0`` if already computed.

    Returns:
        :class:`IterativeOutcome`.
    """
    from influscope.analyzer import Influence

    named = dict(model.named_modules())
    start = _weights(named, names)
    if config.rounds == 0:
        return IterativeOutcome({n: torch.zeros_like(w) for n, w in start.items()}, [], "rounds")
    device = next(model.parameters()).device
    inf = Influence(model, task, modules=modules, device=device)
    bs, beta = config.batch_size, config.retain_weight
    use_retain = retain is not None and (
        beta > 0
        or config.max_retain_increase is not None
        or config.stop_retain_increase is not None
    )

    def losses() -> tuple[float, float]:
        f = float(sequence_losses(model, task, forget, bs).mean())
        r = float(sequence_losses(model, task, retain, bs).mean()) if use_retain else 0.0
        return f, r

    f0, r0 = losses()
    f_cur, r_cur = f0, r0
    current = factors
    rounds: list[dict[str, Any]] = []
    stop_reason = "rounds"
    for t in range(config.rounds):
        refit = t > 0 and config.refit_every > 0 and t % config.refit_every == 0
        if refit:
            current = inf.fit(fit_data, fit_config)
        if t == 0 and first_forget_grads is not None:
            g = first_forget_grads
        else:
            g = forget_gradients(inf.tracked, forget, bs)
        if beta > 0 and retain is not None:
            g_r = forget_gradients(inf.tracked, retain, bs)
            ratio = beta * len(forget) / len(retain)
            direction = {n: g[n] - ratio * g_r[n] for n in names}  # (out, in[+1])
        else:
            direction = {n: g[n] for n in names}
        d = newton_step(current, direction, names, coefficient)
        saved = _snapshot(named, names)
        eta, accepted = config.scale, False
        for _ in range(config.max_halvings + 1):
            apply_step(model, {n: eta * d[n] for n in names})
            f, r = losses()
            finite = math.isfinite(f) and math.isfinite(r)
            rises = finite and (f - beta * r) > (f_cur - beta * r_cur)
            within = config.max_retain_increase is None or r - r0 <= config.max_retain_increase
            if rises and within:
                accepted = True
                break
            _restore(named, saved)
            eta /= 2
        if not accepted:
            stop_reason = "line search"
            break
        f_cur, r_cur = f, r
        rounds.append(
            {
                "round": t,
                "refit": refit,
                "step_size": eta,
                "step_norm": eta
                * float(torch.sqrt(sum(d[n].double().square().sum() for n in names))),
                "forget_loss": f,
                "retain_loss": r if use_retain else None,
            }
        )
        repaired = config.stop_retain_increase is None or r - r0 <= config.stop_retain_increase
        if config.forget_target is not None and f - f0 >= config.forget_target and repaired:
            stop_reason = "forget target"
            break
    now = _weights(named, names)
    return IterativeOutcome({n: now[n] - start[n] for n in names}, rounds, stop_reason)
