"""Attention heads of tracked projections: which rows (or columns) of ``W`` belong to which head.

A layer's influence term is a sum over the entries of its weight matrix,

.. math:: I_{q,ℓ}(z) = -\\sum_{o,i} \\tilde q_{ℓ,oi}\\, (\\nabla_{W_ℓ} L(z))_{oi},

so any partition of the entries splits it exactly. For an attention projection the heads
partition the matrix (in influscope's ``(out, in[+1])`` layout):

* **q / k / v projections** (Llama ``q_proj``, ``k_proj``, ``v_proj``; GPT-2's fused ``c_attn``):
  head ``h`` owns the output rows ``h·d … (h+1)·d − 1`` (``d`` the head dimension), with the bias
  entry of each row. ``k_proj`` / ``v_proj`` have ``num_key_value_heads`` heads (grouped-query
  attention: KV head ``j`` serves query heads ``j·g … (j+1)·g − 1``, ``g = n_heads / n_kv``).
  GPT-2's ``c_attn`` stacks q, k and v: rows ``[0, E)`` are q, ``[E, 2E)`` k, ``[2E, 3E)`` v, each
  split into ``n_head`` blocks.
* **output projection** (Llama ``o_proj``, GPT-2 ``attn.c_proj``): head ``h`` owns the input
  columns ``h·d … (h+1)·d − 1`` (its slice of the concatenated head outputs). The bias column,
  when there is one, belongs to no head and is its own group ``"bias"``.

The per-head shares therefore sum to the layer term exactly (up to float rounding).
Recognised layouts are in :data:`HEAD_LAYOUTS` (a regex on the module name → builder);
add an entry for another architecture.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from influscope.errors import ConfigError
from influscope.modules.selection import TrackedLayer

__all__ = ["HEAD_LAYOUTS", "HeadSplit", "head_splits"]


@dataclass(frozen=True)
class HeadSplit:
    """How one tracked layer's ``(out, in[+1])`` matrix splits into heads.

    Attributes:
        layer: Qualified name of the layer.
        axis: ``"out"`` (groups of rows: q/k/v) or ``"in"`` (groups of columns: the output
            projection).
        labels: One label per group (``"h3"``, ``"kv1"``, ``"q.h0"``, ``"bias"``).
        index: ``(out,)`` or ``(in[+1],)`` long tensor, the group of every row/column.
    """

    layer: str
    axis: str
    labels: tuple[str, ...]
    index: torch.Tensor

    @property
    def names(self) -> list[str]:
        """Qualified group names ``"<layer>:<label>"`` (the ``Scores.head_names`` entries)."""
        return [f"{self.layer}:{label}" for label in self.labels]


def _heads(config) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, head_dim)`` from a Hugging Face config."""
    n = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not n:
        raise ConfigError(
            f"per_head needs the model config's num_attention_heads; {type(config).__name__} "
            "has none. Track only attention projections of a Hugging Face model."
        )
    n_kv = getattr(config, "num_key_value_heads", None) or n
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    d = getattr(config, "head_dim", None) or hidden // n
    return int(n), int(n_kv), int(d)


def _rows(n: int, d: int, size: int, label: str) -> tuple[list[str], torch.Tensor]:
    return [f"{label}{h}" for h in range(n)], torch.arange(size) // d


def _check(layer: TrackedLayer, size: int, expected: int, what: str) -> None:
    if size != expected:
        raise ConfigError(
            f"per_head: layer {layer.name!r} has {size} {what}, expected {expected} from the "
            "model config (heads × head_dim). Its layout is not a standard attention "
            "projection; leave per_head off for it."
        )


def _qkv_rows(kind: str) -> Callable[[TrackedLayer, tuple[int, int, int]], HeadSplit]:
    def build(layer: TrackedLayer, heads: tuple[int, int, int]) -> HeadSplit:
        n, n_kv, d = heads
        count, label = (n, "h") if kind == "q" else (n_kv, "kv")
        _check(layer, layer.out_dim, count * d, "output rows")
        labels, index = _rows(count, d, layer.out_dim, label)
        return HeadSplit(layer.name, "out", tuple(labels), index)

    return build


def _fused_qkv(layer: TrackedLayer, heads: tuple[int, int, int]) -> HeadSplit:
    n, _, d = heads
    _check(layer, layer.out_dim, 3 * n * d, "output rows (fused q, k, v)")
    labels = [f"{p}.h{h}" for p in "qkv" for h in range(n)]
    return HeadSplit(layer.name, "out", tuple(labels), torch.arange(layer.out_dim) // d)


def _out_columns(layer: TrackedLayer, heads: tuple[int, int, int]) -> HeadSplit:
    n, _, d = heads
    n_in = layer.in_dim - int(layer.has_bias)
    _check(layer, n_in, n * d, "input columns")
    labels = [f"h{h}" for h in range(n)]
    index = torch.arange(layer.in_dim) // d  # the bias column (last) falls in group n
    if layer.has_bias:
        labels.append("bias")
    return HeadSplit(layer.name, "in", tuple(labels), index)


#: Recognised attention projections: ``(regex on the module name, builder)``. The builder gets
#: the layer and ``(n_heads, n_kv_heads, head_dim)`` from the model config.
HEAD_LAYOUTS: list[tuple[str, Callable[[TrackedLayer, tuple[int, int, int]], HeadSplit]]] = [
    (r"\.attn\.c_attn$", _fused_qkv),  # GPT-2 Conv1D, out = 3·n_embd
    (r"\.attn\.c_proj$", _out_columns),  # GPT-2 output projection
    (r"\.(self_attn|attention)\.q_proj$", _qkv_rows("q")),  # Llama, Mistral, Qwen2, OLMoE, …
    (r"\.(self_attn|attention)\.k_proj$", _qkv_rows("kv")),
    (r"\.(self_attn|attention)\.v_proj$", _qkv_rows("kv")),
    (r"\.(self_attn|attention)\.o_proj$", _out_columns),
]


def head_splits(model: nn.Module, layers: Sequence[TrackedLayer]) -> list[HeadSplit]:
    """The head partition of every tracked layer (call before any pass: it validates).

    Raises:
        ConfigError: If a tracked layer is not a recognised attention projection (the message
            names it, lists the supported patterns and the ``modules="attn"`` preset), or its
            shape disagrees with the config's head counts.
    """
    bad = [t.name for t in layers if not any(re.search(p, t.name) for p, _ in HEAD_LAYOUTS)]
    if bad:
        shown = ", ".join(bad[:6]) + (" …" if len(bad) > 6 else "")
        raise ConfigError(
            f"per_head splits attention projections by head, but {len(bad)} tracked layer(s) "
            f"are not attention projections: {shown}. Supported module names: "
            f"{', '.join(p for p, _ in HEAD_LAYOUTS)}. Track only those (modules='attn', or "
            "a regex), or score without per_head (per_layer still splits by layer)."
        )
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(
            f"per_head needs model.config (head counts); {type(model).__name__} has none. "
            "Use a Hugging Face model, or score without per_head."
        )
    heads = _heads(config)
    out = []
    for layer in layers:
        build = next(b for p, b in HEAD_LAYOUTS if re.search(p, layer.name))
        out.append(build(layer, heads))
    return out
