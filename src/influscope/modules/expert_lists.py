"""MoE blocks whose experts are a ``ModuleList`` of per-expert modules of ``nn.Linear``.

The layout of transformers 4.x Mixtral (``block_sparse_moe``) and of many custom MoE models: a
block with a linear router ``gate`` (``H → E`` logits), ``top_k``, and ``experts``, a
``ModuleList`` whose ``i``-th element maps the rows routed to expert ``i``. A hook on an expert's
``nn.Linear`` sees only those rows, not which tokens they are, so the capture also records

* the block's flattened input ``X`` (``N × H``, a forward pre-hook on the block), and
* the router logits (a hook on ``gate``), from which the tokens of expert ``i`` are recomputed
  as the block routes them: ``top-k`` of the logits per token, then
  ``slot, tok = where(one_hot(top-k)ᵀ[i])`` (slot-major, as transformers' loop).

The recomputed routing is checked before use: the input rows of expert ``i`` (a hook on the
expert module) must equal ``X[tok]`` exactly, otherwise :class:`~influscope.errors.DataError`
says the block routes differently. The rows are then scattered to the token grid like the fused
experts' (:func:`~influscope.modules.experts.routed_forward`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from influscope.errors import DataError
from influscope.modules.adapters import ModuleAdapter

__all__ = ["ListExpertAdapter", "RoutingRecorder", "list_expert_adapter"]

_ITEM = re.compile(r"^(?P<block>.+)\.experts\.(?P<i>\d+)\.")


@dataclass(frozen=True)
class ListExpertAdapter(ModuleAdapter):
    """An ``nn.Linear`` inside expert ``expert`` of a ``ModuleList`` MoE block ``block``."""

    block: nn.Module | None = None
    expert: int = 0


def damp_unrouted_experts(operator, layers, absolute: float | None) -> list[str]:
    """Give ``λ = 1`` to MoE experts whose relative damping came out 0 (returns their names).

    An expert no fitting token was routed to has all-zero curvature, so ``factor × mean`` gives
    ``λ = 0`` and its preconditioned query ``0 / 0``. Every training gradient of such an expert
    is zero as well, so its score terms are 0 whatever ``λ``; 1 keeps them finite. An absolute
    damping (``absolute`` not ``None``) is left as given.
    """
    if absolute is not None:
        return []
    fixed = []
    for t in layers:
        routed = t.adapter.name == "expert" or isinstance(t.adapter, ListExpertAdapter)
        if routed and operator.damping.get(t.name) == 0.0:
            operator.damping[t.name] = 1.0
            fixed.append(t.name)
    return fixed


def _top_k(block: nn.Module) -> int | None:
    k = getattr(block, "top_k", None) or getattr(block, "num_experts_per_tok", None)
    return int(k) if k else None


def list_expert_adapter(name: str, module: nn.Module, model: nn.Module) -> ModuleAdapter | None:
    """The adapter of an ``nn.Linear`` inside a recognised ``ModuleList`` MoE block, or None."""
    m = _ITEM.match(name)
    if m is None or type(module) is not nn.Linear:
        return None
    try:
        block = model.get_submodule(m["block"])
    except AttributeError:
        return None
    experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
    if (
        isinstance(experts, nn.ModuleList)
        and isinstance(gate, nn.Linear)
        and gate.out_features == len(experts)
        and _top_k(block) is not None
    ):
        return ListExpertAdapter("linear", True, block=block, expert=int(m["i"]))
    return None


class RoutingRecorder:
    """Records, per ``ModuleList`` MoE block, its input, router logits and experts' inputs."""

    def __init__(self) -> None:
        self.x: dict[int, list[torch.Tensor]] = {}
        self.logits: dict[int, list[torch.Tensor]] = {}
        self.expert_in: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.handles: list = []
        self.blocks: dict[int, nn.Module] = {}

    def attach(self, block: nn.Module) -> None:
        """Hook a block once (its input, its router, its experts' inputs)."""
        b = id(block)
        if b in self.blocks:
            return
        self.blocks[b] = block
        h = block.gate.in_features

        def keep_x(module, inputs):
            self.x.setdefault(b, []).append(inputs[0].detach().reshape(-1, h))

        def keep_logits(module, inputs, output):
            self.logits.setdefault(b, []).append(output.detach().reshape(-1, output.shape[-1]))

        self.handles.append(block.register_forward_pre_hook(keep_x))
        self.handles.append(block.gate.register_forward_hook(keep_logits))
        for i, expert in enumerate(block.experts):

            def keep_in(module, inputs, i=i):
                self.expert_in.setdefault((b, i), []).append(inputs[0].detach())

            self.handles.append(expert.register_forward_pre_hook(keep_in))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.blocks.clear()
        self.clear()

    def clear(self) -> None:
        self.x.clear()
        self.logits.clear()
        self.expert_in.clear()

    def tokens(self, name: str, adapter: ListExpertAdapter, call: int) -> tuple[torch.Tensor, int]:
        """``(token positions of the rows expert i saw in call ``call``, N)``, checked.

        Raises:
            DataError: If the recomputed routing does not reproduce the expert's input rows.
        """
        block, i = adapter.block, adapter.expert
        b = id(block)
        x, logits = self.x[b][call], self.logits[b][call]  # (N, H), (N, E)
        idx = torch.topk(logits, _top_k(block), dim=-1).indices  # (N, k)
        mask = F.one_hot(idx, num_classes=logits.shape[-1]).permute(2, 1, 0)  # (E, k, N)
        _, tok = torch.where(mask[i])  # (n_i,)
        seen = self.expert_in.get((b, i), [])
        rows = seen[call] if call < len(seen) else x.new_zeros(0, x.shape[-1])
        if rows.reshape(-1, x.shape[-1]).shape[0] != tok.numel() or not torch.equal(
            rows.reshape(-1, x.shape[-1]), x[tok]
        ):
            raise DataError(
                f"Cannot tell which tokens {name!r} saw: expert {i} of its MoE block did not "
                "receive the block inputs of the tokens routed to it by top-k of the router "
                "logits, slot-major (transformers' order). This block routes differently; "
                "leave its experts out of modules= ."
            )
        return tok, x.shape[0]
