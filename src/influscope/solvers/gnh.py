"""Matrix-free damped Gauss-Newton products over all tracked layers jointly.

For training examples ``n = 1..N`` with outputs ``o_n(θ)`` (``task.outputs``) and loss
``ℓ(o_n)`` (``task.loss_from_outputs``)

.. math:: (G + Λ) v = \\frac{1}{N} \\sum_n J_n^⊤ H_n J_n v + Λ v,

with ``J_n = ∂o_n/∂θ`` over the flat tracked parameters (each layer's ``(out, in[+1])`` matrix,
row-major, layer after layer — the layout of :mod:`influscope.reference`), ``H_n = ∂²ℓ/∂o²``
and ``Λ`` the per-layer damping ``λ_ℓ``. ``J v`` is a ``torch.func.jvp`` of the outputs,
``H (J v)`` a ``jvp`` of the gradient of the loss w.r.t. the outputs, and ``J^⊤ u`` a ``vjp``
(its forward pass is shared by all ``Q`` query vectors of a mini-batch). Cross-layer blocks
of ``G`` are included, unlike in block-diagonal EK-FAC.

Forward-mode AD is not implemented for the fused scaled-dot-product-attention kernels (flash /
memory-efficient, on CPU and CUDA), which Hugging Face models use by default
(``attn_implementation="sdpa"``); the products therefore run under
``sdpa_kernel(SDPBackend.MATH)``, the composite kernel built from differentiable operations
(same values, more memory for long sequences).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from influscope.engine.distributed import all_reduce_, rank_and_world
from influscope.modules.experts import tracked_values
from influscope.modules.passes import eval_mode
from influscope.modules.selection import TrackedLayer
from influscope.tasks.base import Task
from influscope.tasks.data import EncodedDataset


class _TaskOutputs(nn.Module):
    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.outputs(self.model, batch)


class GaussNewtonProduct:
    """``V ↦ (G + Λ) V`` for a block of vectors ``{layer: (Q, out, in)}``.

    Args:
        model: The model (its device and dtype are used).
        task: Task with ``outputs`` and ``loss_from_outputs``.
        layers: Tracked layers (all of them form one joint system).
        damping: ``{layer: λ_ℓ}`` (``CurvatureOperator.damping``).
        batch_size: Training examples per mini-batch.

    Under ``torch.distributed`` each rank takes every ``world``-th example and the partial
    sums are added with ``all_reduce``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        layers: Sequence[TrackedLayer],
        damping: dict[str, float],
        batch_size: int = 8,
    ) -> None:
        self.model, self.task, self.layers = model, task, list(layers)
        self.damping = damping
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.shapes = [(layer.out_dim, layer.in_dim) for layer in self.layers]
        self.sizes = [o * i for o, i in self.shapes]
        self._wrapper = _TaskOutputs(model, task)
        self._names = {id(p): f"model.{n}" for n, p in model.named_parameters()}

    # --- layout ----------------------------------------------------------------------------
    def flatten(self, v: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{layer: (Q, out, in)}`` → ``(Q, P)``."""
        return torch.cat(
            [v[layer.name].reshape(v[layer.name].shape[0], -1) for layer in self.layers], 1
        )

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(Q, P)`` → ``{layer: (Q, out, in)}``."""
        parts = flat.split(self.sizes, dim=1)
        return {
            layer.name: part.reshape(flat.shape[0], *shape)
            for layer, part, shape in zip(self.layers, parts, self.shapes)
        }

    def _function(self, batch):
        def fn(flat: torch.Tensor) -> torch.Tensor:
            chunks = [c.view(shape) for c, shape in zip(flat.split(self.sizes), self.shapes)]
            params = {self._names[id(p)]: value for p, value in tracked_values(self.layers, chunks)}
            return functional_call(self._wrapper, params, (batch,))

        theta = torch.cat(
            [
                layer.adapter.weight_out_in(layer.module).detach().reshape(-1)
                for layer in self.layers
            ]
        )
        return fn, theta

    # --- products --------------------------------------------------------------------------
    def gauss_newton(self, flat: torch.Tensor, data: EncodedDataset) -> torch.Tensor:
        """``G V`` without damping: ``(Q, P)`` → ``(Q, P)``, ``G = (1/N) Σ_n J_n^⊤ H_n J_n``."""
        rank, world = rank_and_world()
        total = torch.zeros_like(flat)
        mine = list(range(rank, len(data), world))
        with eval_mode(self.model), sdpa_kernel([SDPBackend.MATH]):
            for start in range(0, len(mine), self.batch_size):
                examples = [data.examples[i] for i in mine[start : start + self.batch_size]]
                batch = {k: v.to(self.device) for k, v in self.task.collate(examples).items()}
                fn, theta = self._function(batch)
                theta = theta.to(flat.dtype)
                outputs, pullback = vjp(fn, theta)  # one forward for all Q vectors
                outputs = outputs.detach()

                def loss_of(o: torch.Tensor, batch=batch) -> torch.Tensor:
                    return self.task.loss_from_outputs(o, batch).sum()

                grad_loss = grad(loss_of)
                for q in range(flat.shape[0]):
                    _, jv = jvp(fn, (theta,), (flat[q],))  # (B, ..., out)
                    _, hjv = jvp(grad_loss, (outputs,), (jv.to(outputs.dtype),))
                    total[q] += pullback(hjv.to(outputs.dtype))[0].detach()
        all_reduce_(total)
        return total / len(data)

    def damped(self, flat: torch.Tensor, data: EncodedDataset) -> torch.Tensor:
        """``(G + Λ) V``: ``(Q, P)`` → ``(Q, P)``."""
        lam = torch.cat(
            [
                torch.full(
                    (size,), float(self.damping[layer.name]), dtype=flat.dtype, device=flat.device
                )
                for layer, size in zip(self.layers, self.sizes)
            ]
        )
        return self.gauss_newton(flat, data) + lam * flat
