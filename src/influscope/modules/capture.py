"""Hooks that read the activations ``ā_t`` and output gradients ``s_t`` of tracked layers.

One forward pass with :class:`Capture` active records each tracked layer's input and output;
:meth:`Capture.backward` then asks autograd for ``∂(Σ_b loss_b)/∂y`` at the recorded outputs only
(no parameter ``.grad`` is computed or touched). Because examples in a batch do not interact,
row ``b`` of these gradients is the gradient of example ``b``'s own loss, so per-example
gradients come for free:

.. math:: \\nabla_{W} L(z_b) = \\sum_t s_{b,t} \\bar a_{b,t}^\\top .
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from influscope.errors import DataError, NumericalError
from influscope.modules.selection import TrackedLayer


@dataclass
class LayerBatch:
    """What one tracked layer saw for one batch.

    Attributes:
        a: ``(B, T, in_dim)`` homogeneous input activations (bias column of ones last).
        s: ``(B, T, out_dim)`` gradients of the summed batch objective w.r.t. the layer output.
        mask: ``(B, T)`` bool, the positions counted in token statistics, or ``None`` (all).
    """

    a: torch.Tensor
    s: torch.Tensor
    mask: torch.Tensor | None

    def gradient(self) -> torch.Tensor:
        """Per-example weight gradients ``Σ_t s_t ā_tᵀ``, shape ``(B, out_dim, in_dim)``."""
        return torch.einsum("bto,bti->boi", self.s, self.a)

    def masked_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows kept by the mask: ``a`` as ``(N_tok, in_dim)``, ``s`` as ``(N_tok, out_dim)``."""
        if self.mask is None or bool(self.mask.all()):  # no copy when every token counts
            return self.a.reshape(-1, self.a.shape[-1]), self.s.reshape(-1, self.s.shape[-1])
        return self.a[self.mask], self.s[self.mask]


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
        self._handles: list = []
        self._saved_requires_grad: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self) -> Capture:
        for layer in self.layers:
            w = layer.module.weight
            self._saved_requires_grad.append((w, w.requires_grad))
            w.requires_grad_(True)  # outputs must require grad to be differentiated
            self._handles.append(layer.module.register_forward_hook(self._hook(layer.name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        for w, flag in self._saved_requires_grad:
            w.requires_grad_(flag)
        self._handles.clear()
        self._saved_requires_grad.clear()
        self.clear()

    def clear(self) -> None:
        """Forget what was recorded (call between batches)."""
        self._inputs.clear()
        self._outputs.clear()

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._inputs.setdefault(name, []).append(inputs[0].detach())
            self._outputs.setdefault(name, []).append(output)

        return hook

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
            result[layer.name] = self._regroup(
                layer, self._inputs[layer.name], gs, token_mask, n_examples, rows_per_example
            )
        return result

    def _regroup(
        self,
        layer: TrackedLayer,
        inputs: list[torch.Tensor],
        grads: list[torch.Tensor],
        token_mask: torch.Tensor | None,
        n_examples: int,
        rows_per_example: int | None = None,
    ) -> LayerBatch:
        try:
            a = _stack_calls(inputs)  # (R, T, in)
            s = _stack_calls(grads)  # (R, T, out)
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
        return LayerBatch(a=a, s=s, mask=mask)
