"""MAGIC: exact metagradients of a deterministic fine-tune (Ilyas & Engstrom 2025).

For the fine-tune of :mod:`influscope.metagrad.recipe` with example weights ``w ∈ ℝ^N`` the
trained parameters are a function ``θ_T(w)``; MAGIC computes, for every query ``q`` and training
example ``i``,

.. math:: \\mathrm{magic}[q, i] = \\frac{∂ f_q(θ_T(w))}{∂ w_i}\\Big|_{w = 1},

exactly (to floating-point rounding), by reverse-mode differentiation through all ``T``
optimizer steps. Positive = up-weighting example ``i`` increases the query's measurement, the
package's sign convention. Units: ``f`` per unit of weight of one example in its batches' losses
``Σ w_i L_i / |B|``. Compared with influence functions (``ε`` added to one example in the
*mean* objective ``(1/N) Σ_i L_i + ε L_m``, i.e. weight ``1 + Nε``), a first-order influence
estimate ``I[q, m] = df/dε`` corresponds to ``N · magic[q, m]`` — the influence scale is
``N`` times this one.

**Reverse pass.** Write the run as ``s_{t+1} = Φ_t(s_t, w_{B_t})`` with state ``s = (θ,
optimizer slots)`` (:meth:`~influscope.metagrad.recipe.Finetune.step`). Starting from the adjoint
``\\bar s_T = (∇_θ f_q(θ_T), 0)``, for ``t = T-1 … 0``

.. math:: (\\bar s_t, \\bar w_{B_t}) = \\bar s_{t+1}^⊤ \\, ∂Φ_t(s_t, w_{B_t}),
   \\qquad \\mathrm{magic}[q, B_t] \\mathrel{+}= \\bar w_{B_t},

computed with :func:`torch.func.vjp` through the pure step. Through the gradient inside
``Φ_t`` this takes the Hessian-vector products ``∇²\\mathcal L_t \\bar θ`` and the
per-example gradient terms ``∇L_i^⊤ \\bar g / |B_t|`` (see ``docs/magic.md`` for SGD and
AdamW written out). An example accumulates one term per step whose batch holds it.

**REPLAY.** The reverse pass needs ``s_t`` in reverse order. Storing all ``T`` states costs
``T`` states of memory; REPLAY keeps a checkpoint every ``k`` steps during the forward run and,
segment by segment from the last, recomputes the segment's ``≤ k`` states from its checkpoint
before back-propagating through it. Memory: ``(⌈T/k⌉ + k + Q_c + 1)`` states (checkpoints,
one segment, one adjoint per query of the chunk, one transient) plus the ``(Q, N)`` scores;
``k = ⌈√T⌉`` minimises it. Compute: the forward run, one more forward run (the replay) and
``Q`` vector-Jacobian products per step, each about two to three training steps.

All queries of a chunk share one replay: each step's ``vjp`` is built once and its
``vjp_fn`` applied to every query's adjoint. Under ``torch.distributed`` every rank trains
the same forward run and takes the queries ``q ≡ rank (mod world)``; an all-reduce of the
zero-filled ``(Q, N)`` scores gives every rank the same result as one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad, vjp

from influscope.config import Settings, require
from influscope.engine.distributed import all_reduce_, rank_and_world
from influscope.engine.shards import PartialSums
from influscope.errors import ConfigError
from influscope.metagrad.recipe import Finetune, FinetuneConfig, select_parameters
from influscope.modules.tracked import TrackedModel
from influscope.progress import track
from influscope.scoring.pairwise import Scores
from influscope.tasks import EncodedDataset

__all__ = ["MagicConfig", "magic_scores", "replay_memory"]


@dataclass(frozen=True)
class MagicConfig(Settings):
    """How MAGIC runs (the fine-tune itself is ``recipe``).

    Attributes:
        recipe: The deterministic fine-tune (:class:`~influscope.metagrad.FinetuneConfig`).
        replay_every: Checkpoint interval ``k`` of REPLAY, or ``None`` for ``⌈√T⌉``. Does not
            change the scores (bit-identical for every ``k``), only memory and the resume
            granularity.
        query_batch: Queries carried through one replay (each costs one state of memory),
            or ``None`` for all of them; more chunks mean more replays.
        memory_mb: Budget (MiB) for REPLAY's states; a run needing more is refused before
            any work. Not part of the stored fingerprint.
    """

    recipe: FinetuneConfig = field(default_factory=FinetuneConfig)
    replay_every: int | None = None
    query_batch: int | None = None
    memory_mb: float = 4096.0

    def __post_init__(self) -> None:
        if isinstance(self.recipe, dict):  # read back from JSON
            object.__setattr__(self, "recipe", FinetuneConfig.from_dict(self.recipe))
        require(
            isinstance(self.recipe, FinetuneConfig),
            f"recipe must be a FinetuneConfig, received {type(self.recipe).__name__}.",
        )
        require(
            self.replay_every is None or self.replay_every >= 1,
            f"replay_every must be None (⌈√T⌉) or ≥ 1 steps, received {self.replay_every!r}.",
        )
        require(
            self.query_batch is None or self.query_batch >= 1,
            f"query_batch must be None (all queries) or ≥ 1, received {self.query_batch!r}.",
        )
        require(self.memory_mb > 0, f"memory_mb must be > 0, received {self.memory_mb!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "recipe": self.recipe.to_dict()}

    def fingerprint_dict(self) -> dict[str, Any]:
        """What the stored scores depend on (``to_dict`` without the memory budget)."""
        out = self.to_dict()
        out.pop("memory_mb")
        return out

    def interval(self, steps: int) -> int:
        """``k`` for a run of ``steps`` steps."""
        k = self.replay_every if self.replay_every is not None else math.ceil(math.sqrt(steps))
        return max(1, min(k, steps))


def replay_memory(state_bytes: int, steps: int, k: int, queries: int, n_train: int) -> int:
    """Bytes REPLAY holds: ``(⌈T/k⌉ + k + Q_c + 1)`` states and the ``(Q, N)`` float64 scores."""
    return (math.ceil(steps / k) + k + queries + 1) * state_bytes + 8 * queries * n_train


def _check_memory(model, train, queries, config: MagicConfig) -> tuple[int, int]:
    """``(T, k)``; raises :class:`ConfigError` when REPLAY would exceed ``memory_mb``."""
    recipe = config.recipe
    names = set(select_parameters(model, recipe.parameters))
    per = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in names)
    state = per * (1 + recipe.slots)
    steps = recipe.steps(len(train))
    k = config.interval(steps)
    world = rank_and_world()[1]
    q_local = math.ceil(len(queries) / world)
    chunk = min(q_local, config.query_batch or q_local)
    need = replay_memory(state, steps, k, chunk, len(train)) / 2**20
    if need > config.memory_mb:
        raise ConfigError(
            f"MAGIC's REPLAY would hold {need:.1f} MiB (⌈T/k⌉ + k + Q_c + 1 = "
            f"{math.ceil(steps / k)} + {k} + {chunk} + 1 states of {state / 2**20:.2f} MiB: "
            f"T = {steps} steps, k = {k}, {chunk} queries per replay, {len(names)} trained "
            f"parameter tensors), above the budget memory_mb = {config.memory_mb:g}. Raise "
            "memory_mb (CLI: --memory-mb), train fewer steps (epochs, a larger batch_size), "
            "train fewer parameters (recipe.parameters, e.g. 'lora' or a regex), or carry "
            "fewer queries per replay (query_batch)."
        )
    return steps, k


def magic_scores(
    tracked: TrackedModel,
    train: EncodedDataset,
    queries: EncodedDataset,
    config: MagicConfig | None = None,
    store: PartialSums | None = None,
) -> Scores:
    """Exact metagradients ``d f_q(θ_T) / d w_i`` of every query and training example.

    Args:
        tracked: The model to fine-tune and its task (its tracked layers play no part: what
            is trained is ``config.recipe.parameters``).
        train: Training data (``N`` examples; the fine-tune's data).
        queries: Queries (``Q`` examples); ``f`` is the task's measurement.
        config: REPLAY and the recipe (default :class:`MagicConfig`).
        store: Where the reverse pass saves its adjoints at segment boundaries, so a killed
            run resumes from the last finished segment (the forward run is redone).

    Returns:
        :class:`~influscope.scoring.pairwise.Scores` with ``pairwise`` ``(Q, N)`` float64
        metagradients, ``measurements`` ``(Q,)`` at ``θ_T`` and ``layer_names`` the trained
        parameters.

    Raises:
        ConfigError: REPLAY's memory exceeds ``config.memory_mb`` (before any work).
    """
    config = config if config is not None else MagicConfig()
    if not isinstance(config, MagicConfig):
        raise ConfigError(f"config must be a MagicConfig, received {type(config).__name__}.")
    if not isinstance(tracked, TrackedModel):
        raise ConfigError(
            f"magic_scores needs a TrackedModel (model and task), received "
            f"{type(tracked).__name__}; use TrackedModel.select(model, task, 'all')."
        )
    model, task = tracked.model, tracked.task
    steps, k = _check_memory(model, train, queries, config)
    run = Finetune(model, task, train, config.recipe)
    rank, world = rank_and_world()
    mine = list(range(rank, len(queries), world))
    size = config.query_batch or max(1, len(mine))
    chunks = [mine[s : s + size] for s in range(0, len(mine), size)]

    checkpoints: dict[int, tuple] = {}

    def keep(t: int, state) -> None:
        if t % k == 0 and t < steps:
            checkpoints[t] = state

    theta_T, _ = run.run(on_step=keep, skip_dropped=False)
    out = torch.zeros(len(queries), len(train), dtype=torch.float64, device=run.device)  # (Q, N)
    values = torch.zeros(len(queries), dtype=torch.float64, device=run.device)  # (Q,)
    with torch.no_grad():
        for q in mine:
            values[q] = run.measurement(theta_T, queries, [q])[0].double()
    for c, chunk in enumerate(chunks):
        out[chunk] = _reverse(
            run, queries, chunk, theta_T, checkpoints, k, store, f"r{rank}of{world}-c{c}"
        )
    if world > 1:
        all_reduce_(out)
        all_reduce_(values)
    return Scores(
        pairwise=out,
        layer_names=list(run.names),
        train_indices=list(train.indices),
        measurements=values,
    )


def _reverse(run: Finetune, queries, chunk, theta_T, checkpoints, k, store, phase) -> torch.Tensor:
    """The reverse pass for the queries in ``chunk``: ``(len(chunk), N)`` float64."""
    steps, n_slots = run.n_steps, len(run.initial_state()[1])
    segments = math.ceil(steps / k)
    dw = torch.zeros(len(chunk), len(run.data), dtype=torch.float64, device=run.device)
    adj: list[tuple[tuple, tuple]] = []
    first = segments - 1  # the segment the pass starts with
    saved = _resume(store, phase, segments, len(chunk), len(theta_T), n_slots)
    if saved is not None:
        first, dw = saved[0] - 1, saved[1].to(run.device)
        adj = [(_to(a, run.device), _to(s, run.device)) for a, s in saved[2]]
    else:
        for q in chunk:
            g = grad(lambda th, q=q: run.measurement(th, queries, [q]).sum())(tuple(theta_T))
            adj.append((tuple(g), tuple(torch.zeros_like(p) for p in run.initial_state()[1])))
    ones = torch.ones(len(run.data), dtype=theta_T[0].dtype)
    for seg in track(range(first, -1, -1), "MAGIC reverse pass", total=first + 1, unit="segment"):
        start, end = seg * k, min(seg * k + k, steps)
        states = [checkpoints[start]]
        with torch.no_grad():  # REPLAY: the segment's states from its checkpoint
            for t in range(start, end - 1):
                wb = ones[run.schedule[t]].to(run.device)
                states.append(run.step(t, *states[-1], wb, run.batch(t)))
        for t in range(end - 1, start - 1, -1):
            pos = run.schedule[t]
            batch, wb = run.batch(t), ones[pos].to(run.device)  # (B,)

            def phi(theta, slots, w_b, t=t, batch=batch):
                return run.step(t, theta, slots, w_b, batch)

            _, vjp_fn = vjp(phi, *states[t - start], wb)
            for j in range(len(chunk)):
                a_theta, a_slots, a_w = vjp_fn(adj[j])
                dw[j, pos] += a_w.double()
                adj[j] = (tuple(a_theta), tuple(a_slots))
            del vjp_fn
        del states
        if store is not None and seg > 0:
            _save(store, phase, seg, dw, adj, segments)
    return dw


def _to(tensors, device) -> tuple:
    return tuple(t.to(device) for t in tensors)


def _save(store: PartialSums, phase: str, seg: int, dw, adj, segments: int) -> None:
    tensors = {"dw": dw.cpu()}
    for j, (a_theta, a_slots) in enumerate(adj):
        tensors.update({f"theta.{j}.{i}": a.cpu().contiguous() for i, a in enumerate(a_theta)})
        tensors.update({f"slots.{j}.{i}": a.cpu().contiguous() for i, a in enumerate(a_slots)})
    store.put(phase, seg, tensors)
    if seg + 1 < segments:  # only the latest boundary is needed
        store.path(phase, seg + 1).unlink(missing_ok=True)


def _resume(store, phase, segments, n_q, n_theta, n_slots):
    """``(segment, dw, adjoints)`` of the most advanced saved boundary, or ``None``."""
    if store is None:
        return None
    for seg in range(1, segments):
        got = store.get(phase, seg)
        if got is not None:
            adj = [
                (
                    tuple(got[f"theta.{j}.{i}"] for i in range(n_theta)),
                    tuple(got[f"slots.{j}.{i}"] for i in range(n_slots)),
                )
                for j in range(n_q)
            ]
            return seg, got["dw"], adj
    return None
