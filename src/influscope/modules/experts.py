"""Mixture-of-experts: each expert of a fused expert block, and the router, as tracked layers.

transformers 5.x stores the experts of an MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, …)
as two 3-D parameters of one module (``<block>.experts``):

* ``gate_up_proj``: ``(E, 2I, H)``, expert ``e`` computes ``[g; u] = W^{gu}_e x`` (one
  ``(2I × H)`` linear map; ``x`` the block input of a token routed to ``e``);
* ``down_proj``: ``(E, H, I)``, ``y = W^{d}_e (act(g) ⊙ u)``; the block adds
  ``Σ_{e ∈ top-k(x)} r_e(x) · y_e``.

Each ``(param, e)`` slice is an ordinary ``y = W a`` layer on the tokens routed to ``e``, tracked
under the name ``<experts>.<param>.<e>`` (so ``modules="mlp"`` picks them up with the rest of
the feed-forward block). The module's forward receives the flattened hidden states and the
routing but never sees a per-expert input, so hooks cannot read ``ā`` and ``s``; instead,
while a :class:`~influscope.modules.capture.Capture` is active the experts' ``forward`` is
replaced by :func:`routed_forward`, the same loop as transformers' eager implementation (the
same operations in the same order, whatever ``experts_implementation`` is configured), which
keeps each tracked expert's input rows, output rows and token positions. Scattered back to
``(B, T, ·)`` they give, for a token routed to ``e``,

.. math:: ā_t = x_t, \\qquad s_t = ∂L/∂(W_e x_t),

and zero rows elsewhere, so ``Σ_t s_t ā_tᵀ`` is exactly the gradient of ``W_e`` (the routing
weight ``r_e(x_t)`` is inside ``s_t``, since it multiplies ``y_e`` after the layer). The capture
marks the routed tokens (``LayerBatch.routed``): the K-FAC / EK-FAC token covariances of
expert ``e`` are sums over the tokens routed to it only, normalised by their count.

The router (``<block>.gate``, a ``*TopKRouter`` with a ``(E, H)`` weight returning
``(logits, weights, indices)``) is a plain linear layer on the flattened tokens; it is
tracked with the logits as its output.

Per-expert ``nn.Linear`` modules in a ``ModuleList`` are handled by
:mod:`influscope.modules.expert_lists` when their block has a linear router. Layouts that are
not recognised (a 3-D expert parameter under other names, transposed or interleaved storage,
expert biases, list experts without a recognisable router) raise
:class:`~influscope.errors.ModuleMatchError` when selected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from influscope.errors import ModuleMatchError

__all__ = [
    "EXPERT_PARAMS",
    "ExpertAdapter",
    "RoutedCall",
    "expert_layers",
    "routed_forward",
    "router_adapter",
    "tracked_values",
]

#: The fused expert parameters tracked, in the order of an expert's computation.
EXPERT_PARAMS = ("gate_up_proj", "down_proj")

SUPPORTED = (
    "transformers 5.x fused experts: a module with 3-D parameters gate_up_proj (E, 2I, H) and "
    "down_proj (E, H, I), concatenated [gate; up], not transposed, without expert biases "
    "(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), and *TopKRouter gates with a (E, H) weight; "
    "or a block with an nn.Linear router `gate` (E logits), `top_k` and `experts`, a "
    "ModuleList of per-expert modules of nn.Linear (transformers 4.x Mixtral)"
)


@dataclass(frozen=True)
class ExpertAdapter:
    """One expert's slice ``param[e]`` of a fused experts module, in ``(out, in)`` layout.

    Same interface as :class:`~influscope.modules.adapters.ModuleAdapter`; ``module`` is the
    experts module.

    Attributes:
        param: ``"gate_up_proj"`` or ``"down_proj"``.
        expert: The expert index ``e``.
    """

    param: str
    expert: int
    name: str = "expert"
    output_index: int | None = None

    def weight(self, module: nn.Module) -> nn.Parameter:
        """The whole 3-D parameter this slice belongs to."""
        return getattr(module, self.param)

    def in_features(self, module: nn.Module) -> int:
        return int(self.weight(module).shape[2])

    def out_features(self, module: nn.Module) -> int:
        return int(self.weight(module).shape[1])

    @staticmethod
    def has_bias(module: nn.Module) -> bool:
        return False

    def weight_out_in(self, module: nn.Module) -> torch.Tensor:
        return self.weight(module)[self.expert].detach().clone()  # (out, in)

    def split(self, module: nn.Module, g: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``[(3-D parameter, its current value with slice e replaced by g)]``."""
        return [(self.weight(module), self.place(self.weight(module).detach(), g))]

    def place(self, current: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``current`` ``(E, out, in)`` with slice ``e`` set to ``g`` (out of place, so it can
        be differentiated with ``torch.func``)."""
        e = self.expert
        return torch.cat([current[:e], g[None].to(current.dtype), current[e + 1 :]])

    def join(self, module: nn.Module, grads: list[torch.Tensor]) -> torch.Tensor:
        """The slice ``e`` of the whole parameter's gradient: ``(out, in)``."""
        return grads[0][self.expert]


def tracked_values(layers, chunks) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Parameter values with each tracked layer's block set to its ``(out, in[+1])`` chunk.

    Like ``[adapter.split(module, g) for each layer]``, except that several experts of one 3-D
    parameter are placed into one value (untracked experts keep their weights).
    """
    values: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for layer, g in zip(layers, chunks):
        adapter = layer.adapter
        if isinstance(adapter, ExpertAdapter):
            p = adapter.weight(layer.module)
            current = values.get(id(p), (p, p.detach()))[1]
            values[id(p)] = (p, adapter.place(current, g))
        else:
            for p, value in adapter.split(layer.module, g):
                values[id(p)] = (p, value)
    return list(values.values())


def _is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    gu, down = params.get("gate_up_proj"), params.get("down_proj")
    return (
        gu is not None
        and down is not None
        and gu.dim() == 3
        and down.dim() == 3
        and gu.shape[0] == down.shape[0]
        and gu.shape[1] == 2 * down.shape[2]
        and gu.shape[2] == down.shape[1]
        and not getattr(module, "has_bias", False)
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and getattr(module, "has_gate", True)
        and not getattr(module, "has_post_expert_norm", False)
        and set(params) == {"gate_up_proj", "down_proj"}
        and (hasattr(module, "_apply_gate") or hasattr(module, "act_fn"))
    )


def _looks_like_experts(module: nn.Module) -> bool:
    """A module that holds expert weights in some layout (3-D parameters, or ``*Experts``)."""
    own = list(module.parameters(recurse=False))
    return any(p.dim() == 3 for p in own) or ("Expert" in type(module).__name__ and bool(own))


_LIST_EXPERT = re.compile(r"(^|\.)experts\.\d+(\.|$)")


def expert_layers(name: str, module: nn.Module) -> Iterator[tuple[str, ExpertAdapter]]:
    """Tracked names and adapters of a fused experts module (nothing for other modules)."""
    if not _is_fused_experts(module):
        return
    for param in EXPERT_PARAMS:
        for e in range(getattr(module, param).shape[0]):
            yield f"{name}.{param}.{e}", ExpertAdapter(param, e)


def unsupported_experts(name: str, module: nn.Module) -> str | None:
    """Why ``module`` holds experts influscope cannot track, or ``None``."""
    if _is_fused_experts(module):
        return None
    if _LIST_EXPERT.search(name) and isinstance(module, nn.Linear):
        return (
            f"{name!r} is a per-expert nn.Linear in a ModuleList whose block has no nn.Linear "
            "router `gate` (one logit per expert) and `top_k`, so which tokens its rows are "
            "cannot be recomputed"
        )
    if _looks_like_experts(module):
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
        flags = {
            k: getattr(module, k)
            for k in ("has_bias", "is_transposed", "is_concatenated", "has_gate")
            if hasattr(module, k)
        }
        return (
            f"{name!r} ({type(module).__name__}) holds expert weights {shapes}"
            + (f" with {flags}" if flags else "")
            + " in a layout influscope does not recognise"
        )
    return None


def check_experts(names_modules: list[tuple[str, nn.Module]]) -> None:
    """Raise a clear error for unsupported expert layouts among the selected modules."""
    bad = [why for n, m in names_modules if (why := unsupported_experts(n, m))]
    if bad:
        raise ModuleMatchError(
            f"Cannot track the experts of this MoE model: {bad[0]}"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            + f". Supported: {SUPPORTED}. Exclude these modules from modules= (e.g. track "
            "modules='attn', or a regex that leaves the experts out), or load the model with "
            "transformers ≥ 5 so its experts are fused."
        )


def router_adapter(module: nn.Module):
    """A linear adapter for a ``*TopKRouter`` gate (``F.linear(x, weight)``, logits first)."""
    from influscope.modules.adapters import ModuleAdapter

    w = getattr(module, "weight", None)
    if (
        type(module).__name__.endswith("TopKRouter")
        and isinstance(w, nn.Parameter)
        and w.dim() == 2
        and getattr(module, "bias", None) is None
    ):
        return ModuleAdapter("router", weight_is_out_in=True, output_index=0)
    return None


def _gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """``act(g) ⊙ u`` for ``[g; u] = gate_up`` (the module's ``_apply_gate`` when it has one)."""
    apply = getattr(module, "_apply_gate", None)
    if apply is not None:
        return apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)  # (n, I), (n, I)
    return module.act_fn(gate) * up


@dataclass
class RoutedCall:
    """What one tracked expert saw in one call of its experts module.

    Attributes:
        a: ``(n_e, in)`` inputs of the tokens routed to the expert (detached).
        y: ``(n_e, out)`` outputs ``W_e a`` (in the graph), or ``None`` when no token was routed.
        tokens: ``(n_e,)`` positions of those tokens among the module's flattened inputs.
        n_tokens: How many flattened tokens the call had (``R · T``).
    """

    a: torch.Tensor
    y: torch.Tensor | None
    tokens: torch.Tensor
    n_tokens: int


def routed_forward(
    module: nn.Module,
    tracked: dict[tuple[str, int], str],
    record: Callable[[str, RoutedCall], None],
) -> Callable[..., torch.Tensor]:
    """A forward for a fused experts module that records the tracked experts' rows.

    The computation is transformers' eager expert loop (``integrations/moe.py``): for each
    expert hit, gather its tokens, ``W^{gu}_e x → act(g) ⊙ u → W^{d}_e · → × r_e``, and
    ``index_add`` into the output.

    Args:
        module: The experts module.
        tracked: ``{(param, e): tracked layer name}``.
        record: Called with ``(name, RoutedCall)`` for every tracked ``(param, e)`` per call.
    """

    def forward(hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # (N, H)
        n_experts = module.gate_up_proj.shape[0]
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)  # (E+1, k, N)
        n = hidden_states.shape[0]
        for e in range(n_experts):
            slot, tok = torch.where(mask[e])  # (n_e,), (n_e,)
            x = hidden_states[tok]  # (n_e, H)
            gu = F.linear(x, module.gate_up_proj[e]) if tok.numel() else None  # (n_e, 2I)
            h = _gate(module, gu) if gu is not None else None  # (n_e, I)
            y = F.linear(h, module.down_proj[e]) if h is not None else None  # (n_e, H)
            for param, a, z, d_in in (
                ("gate_up_proj", x, gu, x.shape[-1]),
                ("down_proj", h, y, module.down_proj.shape[2]),
            ):
                name = tracked.get((param, e))
                if name is not None:
                    rows = a.detach() if a is not None else x.new_zeros(0, d_in)
                    record(name, RoutedCall(rows, z, tok, n))
            if y is not None:
                weighted = y * top_k_weights[tok, slot, None]  # (n_e, H)
                out.index_add_(0, tok, weighted.to(out.dtype))
        return out

    return forward
