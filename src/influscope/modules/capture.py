"""Hooks that read the activations ``ā_t`` and output gradients ``s_t`` of tracked layers.

One forward pass with :class:`Capture` active records each tracked layer's input and output;
:meth:`Capture.backward` then asks autograd for ``∂(Σ_b loss_b)/∂y`` at the recorded outputs only
(no parameter ``.grad`` is computed or touched). Because examples in a batch do not interact,
row ``b`` of these gradients is the gradient of example ``b``'s own loss, so per-example
gradients come for free:

.. math:: \\nabla_{W} L(z_b) = \\sum_t s_{b,t} \\bar a_{b,t}^\\top .

The experts of a fused MoE block are read by swapping the experts module's forward for
:func:`~influscope.modules.experts.routed_forward` while the capture is active; each expert's
rows are scattered back to the token grid (zero where a token was not routed to it) and the
routed tokens are flagged in ``LayerBatch.routed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from influscope.errors import DataError, NumericalError
from influscope.modules.expert_lists import ListExpertAdapter, RoutingRecorder
from influscope.modules.experts import ExpertAdapter, RoutedCall, routed_forward
from influscope.modules.selection import TrackedLayer


@dataclass
class LayerBatch:
    """What one tracked layer saw for one batch.

    Attributes:
        a: ``(B, T, in_dim)`` homogeneous input activations (bias column of ones last).
        s: ``(B, T, out_dim)`` gradients of the summed batch objective w.r.t. the layer output.
        mask: ``(B, T)`` bool, the positions counted in token statistics, or ``None`` (all).
        routed: ``(B, T)`` bool for an MoE expert, the tokens routed to it (the only ones its
            token statistics count), or ``None`` for other layers.
    """

    a: torch.Tensor
    s: torch.Tensor
    mask: torch.Tensor | None
    routed: torch.Tensor | None = None

    def gradient(self) -> torch.Tensor:
        """Per-example weight gradients ``Σ_t s_t ā_tᵀ``, shape ``(B, out_dim, in_dim)``."""
        return torch.einsum("bto,bti->boi", self.s, self.a)

    def masked_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows kept by the mask (and routing): ``a`` as ``(N_tok, in_dim)``, ``s`` as
        ``(N_tok, out_dim)``."""
        keep = self.mask
        if self.routed is not None:
            keep = self.routed if keep is None else keep & self.routed
        if keep is None or bool(keep.all()):  # no copy when every token counts
            return self.a.reshape(-1, self.a.shape[-1]), self.s.reshape(-1, self.s.shape[-1])
        return self.a[keep], self.s[keep]


def _stack_calls(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Rows of all calls of a layer as ``(R, T, d)`` (no copy for the usual single call)."""
    parts = [x.reshape(x.shape[0], -1, x.shape[-1]) for x in tensors]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Capture:
    """Context manager that records tracked layers during forward passes.

    Args:
        layers: The tracked layers.
        rows_per_example: How many model rows make one example (2 for a reward model that runs
            chosen and rejected responses as one stacked batch ``[chosen; rejected]``).
        dtype: The dtype of the returned ``a`` and ``s`` (float32 under autocast, or float64).
    """

    def __init__(
        self,
        layers: Sequence[TrackedLayer],
        rows_per_example: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.layers = list(layers)
        self.rows_per_example = rows_per_example
        self.dtype = dtype
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._routed: dict[str, list[RoutedCall]] = {}
        self._handles: list = []
        self._patched: list[torch.nn.Module] = []
        self._routing = RoutingRecorder()
        self._saved_requires_grad: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self) -> Capture:
        experts: dict[int, tuple[torch.nn.Module, dict[tuple[str, int], str]]] = {}
        for layer in self.layers:
            w = layer.adapter.weight(layer.module)
            if all(w is not p for p, _ in self._saved_requires_grad):
                self._saved_requires_grad.append((w, w.requires_grad))
            w.requires_grad_(True)  # outputs must require grad to be differentiated
            if isinstance(layer.adapter, ExpertAdapter):
                _, tracked = experts.setdefault(id(layer.module), (layer.module, {}))
                tracked[(layer.adapter.param, layer.adapter.expert)] = layer.name
            else:
                hook = self._hook(layer.name, layer.adapter.output_index)
                self._handles.append(layer.module.register_forward_hook(hook))
                if isinstance(layer.adapter, ListExpertAdapter):  # ModuleList MoE experts
                    self._routing.attach(layer.adapter.block)
        for module, tracked in experts.values():  # fused MoE experts: record routed rows
            module.forward = routed_forward(module, tracked, self._record)
            self._patched.append(module)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        for module in self._patched:
            del module.forward  # back to the class's forward
        self._routing.detach()
        for w, flag in self._saved_requires_grad:
            w.requires_grad_(flag)
        self._handles.clear()
        self._patched.clear()
        self._saved_requires_grad.clear()
        self.clear()

    def clear(self) -> None:
        """Forget what was recorded (call between batches)."""
        self._inputs.clear()
        self._outputs.clear()
        self._routed.clear()
        self._routing.clear()

    def _hook(self, name: str, output_index: int | None = None):
        def hook(module: torch.nn.Module, inputs: tuple, output) -> None:
            self._inputs.setdefault(name, []).append(inputs[0].detach())
            y = output if output_index is None else output[output_index]
            self._outputs.setdefault(name, []).append(y)

        return hook

    def _record(self, name: str, call: RoutedCall) -> None:
        self._routed.setdefault(name, []).append(call)
        self._outputs.setdefault(name, [])
        if call.y is not None:
            self._outputs[name].append(call.y)

    def backward(
        self,
        total: torch.Tensor,
        token_mask: torch.Tensor | None,
        n_examples: int,
        retain_graph: bool = False,
        rows_per_example: int | None = None,
    ) -> dict[str, LayerBatch]:
        """Differentiate ``total`` (the batch objective, summed over examples).

        Args:
            total: Scalar ``Σ_b objective_b``.
            token_mask: ``(R, T)`` bool over model rows, or ``None``.
            n_examples: ``B``; the model saw ``R = rows_per_example × B`` rows.
            retain_graph: Keep the graph (to differentiate a second objective).
            rows_per_example: Model rows per example in this batch (default: the one given
                at construction; :meth:`influscope.tasks.Task.batch_rows` of the batch).

        Returns:
            ``{layer name: LayerBatch}`` with rows regrouped per example.

        Raises:
            NumericalError: If ``total`` is NaN or infinite.
        """
        if not torch.isfinite(total).all():
            raise NumericalError(
                f"The objective of this batch is {total.item()} (expected a finite number). "
                "Check the inputs for NaN/Inf, the learning state of the model, and that the "
                "loss masks leave at least one token per sequence."
            )
        names = [layer.name for layer in self.layers]
        for layer in self.layers:  # a list expert no token was routed to is not called
            if isinstance(layer.adapter, ListExpertAdapter):
                self._outputs.setdefault(layer.name, [])
                self._inputs.setdefault(layer.name, [])
        missing = [n for n in names if n not in self._outputs]
        if missing:
            raise DataError(
                f"Tracked layers {missing} were not called in the forward pass. Track only "
                "modules that the task's forward uses."
            )
        outputs = [o for n in names for o in self._outputs[n]]
        grads = torch.autograd.grad(total, outputs, allow_unused=True, retain_graph=retain_graph)
        result: dict[str, LayerBatch] = {}
        i = 0
        for layer in self.layers:
            k = len(self._outputs[layer.name])
            gs = [
                torch.zeros_like(o) if g is None else g
                for o, g in zip(self._outputs[layer.name], grads[i : i + k])
            ]
            i += k
            if isinstance(layer.adapter, ListExpertAdapter):
                calls = self._list_calls(layer, gs)
                inputs, gs, routed = _scatter(calls, gs, layer.out_dim)
            elif layer.name in self._routed:
                inputs, gs, routed = _scatter(self._routed[layer.name], gs, layer.out_dim)
            else:
                inputs, routed = self._inputs[layer.name], None
            result[layer.name] = self._regroup(
                layer, inputs, gs, token_mask, n_examples, routed, rows_per_example
            )
        return result

    def _list_calls(self, layer: TrackedLayer, grads: list[torch.Tensor]) -> list[RoutedCall]:
        """The rows of a ``ModuleList`` expert's linear as one routed call, tokens recomputed."""
        block = id(layer.adapter.block)
        n_calls = len(self._routing.x.get(block, []))
        if n_calls != 1 or len(self._inputs[layer.name]) > 1:
            raise DataError(
                f"The MoE block of {layer.name!r} ran {n_calls} times in one forward pass "
                "(expected once); its experts cannot be tracked."
            )
        tok, n = self._routing.tokens(layer.name, layer.adapter, 0)
        inputs = self._inputs[layer.name]
        a = inputs[0].reshape(-1, inputs[0].shape[-1]) if inputs else None
        if a is None:  # no token routed to this expert: the bias column is added by _regroup
            a = self._routing.x[block][0].new_zeros(0, layer.in_dim - int(layer.has_bias))
        y = self._outputs[layer.name][0] if self._outputs[layer.name] else None
        return [RoutedCall(a, y, tok, n)]

    def _regroup(
        self,
        layer: TrackedLayer,
        inputs: list[torch.Tensor],
        grads: list[torch.Tensor],
        token_mask: torch.Tensor | None,
        n_examples: int,
        routed: list[torch.Tensor] | None = None,
        rows_per_example: int | None = None,
    ) -> LayerBatch:
        rows_seen = (rows_per_example or self.rows_per_example) * n_examples
        if inputs[0].dim() == 2:  # flattened tokens (MoE router, experts): (R·T, d) → (R, T, d)
            inputs = [x.reshape(rows_seen, -1, x.shape[-1]) for x in inputs]
            grads = [g.reshape(rows_seen, -1, g.shape[-1]) for g in grads]
            routed = None if routed is None else [r.reshape(rows_seen, -1, 1) for r in routed]
        try:
            a = _stack_calls(inputs)  # (R, T, in)
            s = _stack_calls(grads)  # (R, T, out)
            hit = None if routed is None else _stack_calls(routed)[..., 0]  # (R, T)
        except RuntimeError as exc:
            raise DataError(
                f"Layer {layer.name!r} was called several times with different sequence "
                f"lengths ({exc}). Pad all rows of a batch to one length."
            ) from None
        a, s = a.to(self.dtype), s.to(self.dtype)
        if layer.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)  # (R, T, in + 1)
        rows, t = a.shape[0], a.shape[1]
        k = rows_per_example or self.rows_per_example
        if rows != k * n_examples:
            raise DataError(
                f"Layer {layer.name!r} saw {rows} rows for {n_examples} examples; expected "
                f"{k * n_examples} (rows_per_example={k}). A module called repeatedly inside "
                "one forward (weight sharing) cannot be tracked."
            )
        mask = None
        if token_mask is not None and token_mask.shape == (rows, t):
            mask = token_mask.to(a.device, torch.bool)
        if k > 1:  # (k·B, T, d) → (B, k·T, d): all rows of an example become one sequence
            a = a.view(k, n_examples, t, -1).transpose(0, 1).reshape(n_examples, k * t, -1)
            s = s.view(k, n_examples, t, -1).transpose(0, 1).reshape(n_examples, k * t, -1)
            if mask is not None:
                mask = mask.view(k, n_examples, t).transpose(0, 1).reshape(n_examples, k * t)
            if hit is not None:
                hit = hit.view(k, n_examples, t).transpose(0, 1).reshape(n_examples, k * t)
        return LayerBatch(a=a, s=s, mask=mask, routed=hit)


def _scatter(
    calls: list[RoutedCall], grads: list[torch.Tensor], out_dim: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """An expert's routed rows back on the flattened token grid, zero elsewhere.

    Returns:
        Per call: ``a`` ``(R·T, in)``, ``s`` ``(R·T, out)`` and the routed flags ``(R·T,)``.
    """
    inputs, outs, routed = [], [], []
    used = iter(grads)  # gradients of the calls that had tokens, in call order
    for call in calls:
        a = call.a.new_zeros(call.n_tokens, call.a.shape[-1])  # (R·T, in)
        s = call.a.new_zeros(call.n_tokens, out_dim)  # (R·T, out)
        hit = torch.zeros(call.n_tokens, dtype=torch.bool, device=call.a.device)
        if call.y is not None:
            a[call.tokens] = call.a
            s[call.tokens] = next(used).to(s.dtype)
            hit[call.tokens] = True
        inputs.append(a)
        outs.append(s)
        routed.append(hit)
    return inputs, outs, routed
