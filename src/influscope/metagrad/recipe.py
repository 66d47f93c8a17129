"""The deterministic fine-tune recipe whose counterfactuals MAGIC differentiates.

A run is fixed by its :class:`FinetuneConfig` and the training data:

* **Data order.** Epoch ``e`` visits a seeded permutation of *all* ``N`` training positions, cut
  into consecutive batches of ``batch_size`` (the last one of an epoch may be smaller); the
  permutations come from one ``torch.Generator`` seeded with ``seed``
  (:func:`batch_schedule`). Steps ``t = 0 … T-1``, ``T = epochs · ⌈N / batch_size⌉``.
* **Counterfactuals are weights.** Per-example weights ``w ∈ ℝ^N`` (1 = kept, 0 = dropped, any
  float for metagradients) enter the loss of step ``t`` with batch ``B_t`` as

  .. math:: \\mathcal L_t(θ; w) = \\frac{1}{|B_t|} \\sum_{i ∈ B_t} w_i\\, L(z_i, θ),

  where ``|B_t|`` is the size of that batch *in the full run* and ``L`` the task's
  per-example training loss. A run with ``w_i = 0`` therefore differs from the full run only
  by row ``i``'s missing term: same order, same batches, same denominators, same number of
  optimizer steps (a batch whose rows are all dropped still takes its step, with gradient 0).
* **Pure step.** :meth:`Finetune.step` maps ``(θ_t, optimizer state_t, w_{B_t}) →
  (θ_{t+1}, state_{t+1})`` with :func:`torch.func.functional_call` and :func:`torch.func.grad`,
  touching nothing else: MAGIC (:mod:`influscope.metagrad.magic`) back-propagates through this
  very function with :func:`torch.func.vjp`.
* **Optimizers** (identical to ``torch.optim.SGD`` / ``torch.optim.AdamW`` on the same loss;
  tested): SGD with L2 weight decay and heavy-ball momentum ``μ``

  .. math:: g = ∇\\mathcal L_t + λθ, \\quad b ← μ b + g, \\quad θ ← θ - η_t b,

  and AdamW with decoupled weight decay and bias correction (step ``k = t + 1``)

  .. math:: θ ← θ(1 - η_tλ), \\; m ← β_1 m + (1-β_1) g, \\; v ← β_2 v + (1-β_2) g^2, \\;
      θ ← θ - \\frac{η_t}{1-β_1^k} \\frac{m}{\\sqrt{v}/\\sqrt{1-β_2^k} + ε}.

  Learning rate ``η_t = lr`` (``constant``) or ``lr · (1 - t/T)`` (``linear``).
* **No dropout.** The model is run in eval mode throughout: with dropout the trained weights
  would be a random function of the masks as well as of ``w``, so neither "the run with row
  ``i`` dropped" nor its derivative in ``w`` would be defined by the data alone. (Eval mode
  also freezes any normalisation statistics.) A model trained with dropout is fine-tuned here
  without it.

Only the selected parameters are trained (``parameters``: ``"trainable"`` = those with
``requires_grad``, ``"all"``, ``"lora"`` = PEFT adapter matrices, or a regex searched in the
parameter names); every other parameter and buffer stays as loaded. The caller's model is never
modified: :func:`finetune` returns a trained copy.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad
from torch.nn.attention import SDPBackend, sdpa_kernel

from influscope.config import Settings, require
from influscope.errors import ConfigError, DataError
from influscope.modules.selection import LORA_PATTERN
from influscope.modules.tracked import TrackedModel
from influscope.progress import track
from influscope.tasks import EncodedDataset, Task, get_task

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "Finetune",
    "FinetuneConfig",
    "batch_schedule",
    "finetune",
    "measure",
    "select_parameters",
]

#: Optimizers of the recipe (``FinetuneConfig.optimizer``).
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
#: Learning-rate schedules (``FinetuneConfig.schedule``).
SCHEDULES: tuple[str, ...] = ("constant", "linear")

#: Training state: ``(θ, optimizer slots)``, each a tuple of tensors in parameter order.
State = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class FinetuneConfig(Settings):
    """The deterministic fine-tune (saved and fingerprinted beside MAGIC scores).

    Attributes:
        epochs: Passes over the training data.
        lr: Peak learning rate ``η``.
        batch_size: Training examples per optimizer step.
        seed: Seed of the per-epoch permutations (the only randomness of the run).
        optimizer: ``"adamw"`` (default) or ``"sgd"``.
        weight_decay: AdamW's decoupled decay ``λ`` (``θ ← θ(1-ηλ)``), or SGD's L2 term
            ``g + λθ``.
        betas: AdamW's ``(β_1, β_2)``.
        eps: AdamW's ``ε`` (added to ``√v̂``).
        momentum: SGD's heavy-ball momentum ``μ`` (0: plain SGD, no optimizer state).
        schedule: ``"constant"`` or ``"linear"`` (``η_t = η(1 - t/T)``).
        parameters: What is trained: ``"trainable"`` (parameters with ``requires_grad``),
            ``"all"``, ``"lora"`` (PEFT ``lora_A``/``lora_B`` matrices) or a regular
            expression searched in the parameter names (e.g. ``"h\\.1\\."``).
    """

    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 8
    seed: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    schedule: str = "constant"
    parameters: str = "trainable"

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):  # read back from JSON
            object.__setattr__(self, "betas", tuple(self.betas))
        require(
            isinstance(self.epochs, int) and self.epochs >= 1,
            f"epochs must be an integer ≥ 1, received {self.epochs!r}.",
        )
        require(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be an integer ≥ 1, received {self.batch_size!r}.",
        )
        require(
            isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
            f"lr must be a finite number > 0, received {self.lr!r}.",
        )
        require(
            self.optimizer in OPTIMIZERS,
            f"optimizer must be 'sgd' or 'adamw', received {self.optimizer!r}.",
        )
        require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay must be a finite number ≥ 0, received {self.weight_decay!r}.",
        )
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1), received {self.betas!r}.",
        )
        require(self.eps > 0, f"eps must be > 0, received {self.eps!r}.")
        require(
            0 <= self.momentum < 1,
            f"momentum must be in [0, 1) (0 = plain SGD), received {self.momentum!r}.",
        )
        require(
            self.optimizer == "sgd" or self.momentum == 0,
            f"momentum is SGD's setting; AdamW uses betas. Received momentum={self.momentum} "
            "with optimizer='adamw': set momentum=0 or optimizer='sgd'.",
        )
        require(
            self.schedule in SCHEDULES,
            f"schedule must be 'constant' or 'linear', received {self.schedule!r}.",
        )
        if self.parameters not in ("trainable", "all", "lora"):
            try:
                re.compile(self.parameters)
            except re.error as exc:
                raise ConfigError(
                    f"parameters must be 'trainable', 'all', 'lora' or a regular expression; "
                    f"{self.parameters!r} does not compile ({exc})."
                ) from None

    def to_dict(self) -> dict:
        """The fields as JSON stores them (``betas`` a list, as read back)."""
        out = super().to_dict()
        out["betas"] = list(self.betas)
        return out

    @property
    def slots(self) -> int:
        """Optimizer tensors kept per parameter (AdamW: m, v; SGD: momentum buffer or none)."""
        if self.optimizer == "adamw":
            return 2
        return 1 if self.momentum > 0 else 0

    def steps(self, n: int) -> int:
        """Optimizer steps ``T`` of a run over ``n`` training examples."""
        return self.epochs * math.ceil(n / self.batch_size)

    def lr_at(self, t: int, total: int) -> float:
        """Learning rate ``η_t`` of step ``t`` (0-based) of ``total``."""
        return self.lr if self.schedule == "constant" else self.lr * (1.0 - t / total)


def batch_schedule(n: int, config: FinetuneConfig) -> list[list[int]]:
    """The positions of each step's batch: ``T`` lists, every epoch a permutation of ``0…n-1``."""
    if n < 1:
        raise DataError("The training set is empty (expected at least one example).")
    gen = torch.Generator().manual_seed(config.seed)
    out = []
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen).tolist()
        out.extend(order[s : s + config.batch_size] for s in range(0, n, config.batch_size))
    return out


def select_parameters(model: nn.Module, which: str) -> list[str]:
    """Names of the parameters ``which`` selects (see :class:`FinetuneConfig.parameters`).

    Raises:
        ConfigError: Nothing matched (the message lists a few parameter names).
    """
    named = list(model.named_parameters())  # tied weights appear once
    if which == "all":
        names = [n for n, p in named if p.is_floating_point()]
    elif which == "trainable":
        names = [n for n, p in named if p.requires_grad and p.is_floating_point()]
    else:
        pattern = re.compile(LORA_PATTERN.replace("$", r"\.weight$") if which == "lora" else which)
        names = [n for n, p in named if pattern.search(n) and p.is_floating_point()]
    if not names:
        shown = ", ".join(n for n, _ in named[:6])
        raise ConfigError(
            f"parameters={which!r} selects no parameter of this model (it has {len(named)}, "
            f"e.g. {shown}). Give 'all', 'trainable', 'lora' (a PEFT model) or a regex that "
            "matches some of these names (a PEFT adapter loaded for inference has "
            "requires_grad off: use 'lora')."
        )
    return names


class _Bound:
    """``model`` called with some of its tensors replaced (what a task's loss receives)."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self._model, self._tensors = model, tensors

    def __call__(self, *args, **kwargs):
        # the math SDPA kernel: the fused ones have no derivative of their backward, which
        # MAGIC's reverse pass takes (it is the same function, so results do not change)
        with sdpa_kernel([SDPBackend.MATH]):
            return functional_call(self._model, self._tensors, args, kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class Finetune:
    """One deterministic fine-tune of ``model`` on ``data``, as pure functions of the state.

    Args:
        model: The starting model (copied once, frozen; never modified).
        task: Task (or its name) defining the per-example loss and the measurement.
        data: Training data (``N`` examples).
        config: The recipe.

    Attributes:
        names: Trained parameter names, in state order.
        schedule: Each step's batch positions (:func:`batch_schedule`).
    """

    def __init__(
        self, model: nn.Module, task: Task | str, data: EncodedDataset, config: FinetuneConfig
    ) -> None:
        if not isinstance(config, FinetuneConfig):
            raise ConfigError(f"config must be a FinetuneConfig, received {type(config).__name__}.")
        self.task, self.data, self.config = get_task(task), data, config
        self.names = select_parameters(model, config.parameters)
        self.base = copy.deepcopy(model).eval()
        self.base.requires_grad_(False)
        params = dict(self.base.named_parameters())
        self.theta0 = tuple(params[n].detach() for n in self.names)
        self.schedule = batch_schedule(len(data), config)
        self.device = self.theta0[0].device

    @property
    def n_steps(self) -> int:
        return len(self.schedule)

    # --- the state ----------------------------------------------------------------------
    def initial_state(self) -> State:
        """``(θ_0, zero optimizer slots)``."""
        slots = tuple(torch.zeros_like(p) for _ in range(self.config.slots) for p in self.theta0)
        return tuple(p.clone() for p in self.theta0), slots

    def state_bytes(self) -> int:
        """Bytes of one training state (parameters and optimizer slots)."""
        per = sum(p.numel() * p.element_size() for p in self.theta0)
        return per * (1 + self.config.slots)

    def batch(self, t: int, positions: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Step ``t``'s collated batch (or the rows at ``positions``) on the model's device."""
        pos = self.schedule[t] if positions is None else positions
        batch = self.task.collate([self.data.examples[i] for i in pos])
        return {k: v.to(self.device) for k, v in batch.items()}

    # --- pure functions -----------------------------------------------------------------
    def bound(self, theta: Sequence[torch.Tensor]) -> _Bound:
        """The model with the trained parameters set to ``theta``."""
        return _Bound(self.base, dict(zip(self.names, theta)))

    def batch_loss(self, theta, w_batch: torch.Tensor, batch, denominator: int) -> torch.Tensor:
        """``Σ_{i∈B} w_i L(z_i, θ) / denominator`` (scalar)."""
        losses = self.task.training_loss(self.bound(theta), batch, None)  # (B,)
        return (w_batch.to(losses.dtype) * losses).sum() / denominator

    def step(
        self,
        t: int,
        theta: tuple[torch.Tensor, ...],
        slots: tuple[torch.Tensor, ...],
        w_batch: torch.Tensor,
        batch: dict[str, torch.Tensor],
    ) -> State:
        """One optimizer step ``(θ_t, slots_t, w_{B_t}) → (θ_{t+1}, slots_{t+1})`` (pure).

        Args:
            t: Step index (learning rate, bias correction, the full-run denominator).
            theta: Trained parameters.
            slots: Optimizer state (AdamW: ``m…, v…``; SGD with momentum: buffers; else
                empty).
            w_batch: ``(B,)`` weights of the rows of ``batch``.
            batch: The collated rows (step ``t``'s batch, possibly without dropped rows).
        """
        cfg, denom = self.config, len(self.schedule[t])
        lr, wd = cfg.lr_at(t, self.n_steps), cfg.weight_decay
        g = grad(lambda th: self.batch_loss(th, w_batch, batch, denom))(tuple(theta))
        n = len(theta)
        if cfg.optimizer == "sgd":
            g = tuple(gi + wd * p for gi, p in zip(g, theta)) if wd else g
            if cfg.momentum > 0:
                bufs = tuple(cfg.momentum * b + gi for b, gi in zip(slots, g))
                return tuple(p - lr * b for p, b in zip(theta, bufs)), bufs
            return tuple(p - lr * gi for p, gi in zip(theta, g)), ()
        b1, b2 = cfg.betas
        k = t + 1
        bc1, bc2 = 1 - b1**k, math.sqrt(1 - b2**k)
        m = tuple(b1 * mi + (1 - b1) * gi for mi, gi in zip(slots[:n], g))
        v = tuple(b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(slots[n:], g))
        new = tuple(
            p * (1 - lr * wd) - (lr / bc1) * mi / (_safe_sqrt(vi) / bc2 + cfg.eps)
            for p, mi, vi in zip(theta, m, v)
        )
        return new, m + v

    # --- running ------------------------------------------------------------------------
    def weights(self, weights: torch.Tensor | Sequence[float] | None) -> torch.Tensor:
        """``(N,)`` float64 weights (all ones for ``None``), checked."""
        n = len(self.data)
        if weights is None:
            return torch.ones(n, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        if w.shape != (n,) or not torch.isfinite(w).all():
            raise DataError(
                f"weights must be a finite (N,) = ({n},) vector, one per training example; "
                f"received shape {tuple(w.shape)}"
                + ("" if w.shape != (n,) else " with non-finite values")
                + "."
            )
        return w

    def run(
        self,
        weights: torch.Tensor | None = None,
        start: tuple[int, State] | None = None,
        stop: int | None = None,
        on_step: Callable[[int, State], None] | None = None,
        skip_dropped: bool = True,
    ) -> State:
        """Train from ``start`` (default: step 0, :meth:`initial_state`) up to step ``stop``.

        Args:
            weights: ``(N,)`` example weights (default all 1).
            start: ``(t, state)`` to continue from.
            stop: First step not taken (default ``T``).
            on_step: Called as ``on_step(t, state_t)`` before step ``t`` and once with
                ``(stop, final state)``.
            skip_dropped: Leave rows of weight 0 out of the forward pass (same result: their
                term is 0; it only saves compute).

        Returns:
            The state before step ``stop``.
        """
        w = self.weights(weights)
        t0, state = start if start is not None else (0, self.initial_state())
        stop = self.n_steps if stop is None else stop
        with torch.no_grad():
            for t in track(range(t0, stop), "fine-tune", total=stop - t0, unit="step"):
                if on_step is not None:
                    on_step(t, state)
                pos = self.schedule[t]
                if skip_dropped:
                    pos = [i for i in pos if w[i] != 0] or pos[:1]
                wb = w[pos].to(self.device, self.theta0[0].dtype)  # (B,)
                state = self.step(t, *state, wb, self.batch(t, pos))
        if on_step is not None:
            on_step(stop, state)
        return state

    def model(self, theta: Sequence[torch.Tensor]) -> nn.Module:
        """A copy of the model (eval mode) holding ``theta``; exactly the trained parameters
        have ``requires_grad``."""
        out = copy.deepcopy(self.base)
        params = dict(out.named_parameters())
        with torch.no_grad():
            for name, p in zip(self.names, theta):
                params[name].copy_(p)
        for name in params:
            params[name].requires_grad_(name in self.names)
        return out.eval()

    def measurement(self, theta, queries: EncodedDataset, positions: Sequence[int]):
        """``f(θ)`` of the queries at ``positions``: ``(len(positions),)`` (differentiable)."""
        batch = self.task.collate([queries.examples[i] for i in positions])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.task.measurement(self.bound(theta), batch)


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """``√v`` with derivative 0 at ``v = 0``.

    AdamW's ``v`` is exactly 0 only where every gradient so far was 0 (e.g. embedding rows of
    unseen tokens); it then stays 0 under any small change of the weights, so its true
    derivative there is 0, where ``torch.sqrt``'s is ``∞`` (and ``0·∞ = NaN``).
    """
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def _parts(tracked_or_model, task) -> tuple[nn.Module, Task]:
    if isinstance(tracked_or_model, TrackedModel):
        return tracked_or_model.model, task if task is not None else tracked_or_model.task
    if task is None:
        raise ConfigError("Give the task (a Task or its name) along with a plain model.")
    return tracked_or_model, get_task(task)


def finetune(
    tracked_or_model: TrackedModel | nn.Module,
    task: Task | str | None,
    data: EncodedDataset,
    config: FinetuneConfig,
    weights: torch.Tensor | Sequence[float] | None = None,
) -> nn.Module:
    """Run the deterministic fine-tune and return a trained copy (eval mode).

    Args:
        tracked_or_model: A :class:`~influscope.modules.tracked.TrackedModel` or a model.
        task: The task (``None`` to use the tracked model's).
        data: Training data (``N`` examples).
        config: The recipe.
        weights: ``(N,)`` per-example weights (default all 1; 0 drops a row, see the module
            docstring).

    Example:
        >>> model = finetune(tiny_model, "causal_lm", train, FinetuneConfig(lr=1e-3))  # doctest: +SKIP
    """
    model, task = _parts(tracked_or_model, task)
    run = Finetune(model, task, data, config)
    theta, _ = run.run(weights)
    return run.model(theta)


@torch.no_grad()
def measure(
    model: nn.Module, task: Task | str, queries: EncodedDataset, batch_size: int = 8
) -> torch.Tensor:
    """The queries' measurements ``f_q(θ)`` (e.g. ``log p(completion | prompt)``): ``(Q,)``."""
    task = get_task(task)
    was = model.training
    model.eval()
    out = []
    for _, rows in queries.batches(batch_size):
        batch = task.collate(rows)
        device = next(model.parameters()).device
        out.append(task.measurement(model, {k: v.to(device) for k, v in batch.items()}))
    model.train(was)
    return torch.cat(out)
