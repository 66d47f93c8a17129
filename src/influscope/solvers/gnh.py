"""Matrix-free damped Gauss-Newton products over all tracked layers jointly.

For training examples ``n = 1..N`` with outputs ``o_n(θ)`` (``task.outputs``) and loss
``ℓ(o_n)`` (``task.loss_from_outputs``)

.. math:: (G + Λ) v = \\frac{1}{N} \\sum_n J_n^⊤ H_n J_n v + Λ v,

with ``J_n = ∂o_n/∂θ`` over the flat tracked parameters (each layer's ``(out, in[+1])`` matrix,
row-major, layer after layer — the layout of :mod:`influscope.reference`), ``H_n = ∂²ℓ/∂o²``
and ``Λ`` the per-layer damping ``λ_ℓ``. ``J v`` is a ``torch.func.jvp`` of the outputs,
``H (J v)`` a ``jvp`` of the gradient of the loss w.r.t. the outputs, and ``J^⊤ u`` a ``vjp``
(its forward pass is shared by all ``Q`` query vectors of a mini-batch). The ``Q`` vectors
go through ``torch.func.vmap`` of these three maps in blocks sized from a memory budget (one
forward with batched tangents per block instead of one per vector); the per-vector loop is
kept as the slow reference (``vectorize=False``). A single vector (a refinement block of one
query, the usual case at LLM size) takes one forward instead of two: the forward with dual
(forward-mode) parameters gives ``J v`` and records the primal graph that ``J^⊤`` then runs
back through (:meth:`GaussNewtonProduct._fused`), about 20 % less than jvp + vjp on SmolLM2. Cross-layer blocks of ``G`` are included,
unlike in block-diagonal EK-FAC.

Forward-mode AD is not implemented for the fused scaled-dot-product-attention kernels (flash /
memory-efficient, on CPU and CUDA), which Hugging Face models use by default
(``attn_implementation="sdpa"``); the products therefore run under
``sdpa_kernel(SDPBackend.MATH)``, the composite kernel built from differentiable operations
(same values, more memory for long sequences).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from influscope.engine.distributed import all_reduce_, rank_and_world
from influscope.modules.experts import tracked_values
from influscope.modules.passes import eval_mode
from influscope.modules.selection import TrackedLayer
from influscope.tasks.base import Task
from influscope.tasks.data import EncodedDataset

#: Tokens a Gauss-Newton mini-batch may hold when its sequences are short
#: (:func:`product_batch_size`): a pass over a few short sequences costs about as much as one
#: over many (per-operation overhead and reading the weights dominate), so short sequences
#: are batched up to this many tokens, about what a batch of 8 × 128 tokens holds anyway.
PRODUCT_TOKENS = 1024


def product_batch_size(batch_size: int, data: EncodedDataset, examples: int | None) -> int:
    """Sequences per Gauss-Newton mini-batch: ``batch_size``, or more when they are short.

    ``max(batch_size, PRODUCT_TOKENS // T)`` with ``T`` the longest sequence of ``data``, at
    most the ``examples`` (all of ``data`` when ``None``) the products run over. Results do
    not depend on it (up to rounding); on SmolLM2 with 8-token documents, one mini-batch of 16
    takes 4.4 s where two of 8 take 6.4 s.
    """
    n = len(data) if examples is None else min(examples, len(data))
    longest = max(1, data.max_length())
    return max(1, min(n, max(batch_size, PRODUCT_TOKENS // longest)))


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
        memory_budget: Bytes for the per-vector tangents of one vmapped block
            (:meth:`query_block`); more vectors than fit are processed in several blocks, so
            memory does not grow with their number. Results do not depend on it (up to
            rounding).
        vectorize: ``vmap`` the vectors (default) or loop over them (the slow reference).

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
        memory_budget: float = 2**30,
        vectorize: bool = True,
    ) -> None:
        self.model, self.task, self.layers = model, task, list(layers)
        self.damping = damping
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.vectorize = vectorize
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

        return fn

    def _theta(self) -> torch.Tensor:
        """The tracked parameters as one flat ``(P,)`` vector (built once per product)."""
        return torch.cat(
            [
                layer.adapter.weight_out_in(layer.module).detach().reshape(-1)
                for layer in self.layers
            ]
        )

    # --- products --------------------------------------------------------------------------
    def query_block(self, outputs: torch.Tensor, n_vectors: int, dtype: torch.dtype) -> int:
        """How many vectors one vmapped jvp/vjp takes, from :attr:`memory_budget` (bytes).

        Cost model per vector: the output tangents ``J v``, ``H J v`` and their cotangent
        intermediates (≈ ``6 ×`` the mini-batch's output size, e.g. ``B·T·vocab`` logits) plus
        the vjp's result and its accumulator (``2 × P``), in ``dtype``. The model's own
        activations are shared by the block and not counted. At least 1, at most ``n_vectors``.
        """
        item = torch.empty((), dtype=dtype).element_size()
        per = item * (6 * outputs.numel() + 2 * sum(self.sizes))
        return max(1, min(n_vectors, int(self.memory_budget // per)))

    def gauss_newton(self, flat: torch.Tensor, data: EncodedDataset, on_batch=None) -> torch.Tensor:
        """``G V`` without damping: ``(Q, P)`` → ``(Q, P)``, ``G = (1/N) Σ_n J_n^⊤ H_n J_n``.

        Per mini-batch: one forward for the vjp (its pullback serves every vector), then the
        ``Q`` vectors in blocks of :meth:`query_block`, each block one ``vmap`` of
        ``jvp`` (a forward with batched tangents), of the loss-Hessian ``jvp`` and of the
        pullback. A single vector (``Q = 1``) takes :meth:`_fused` instead: one forward with
        dual parameters, then the backward. ``vectorize=False`` loops over the vectors
        instead (the slow reference).

        Args:
            flat: ``(Q, P)`` vectors.
            data: Training examples.
            on_batch: Called as ``on_batch(done, total, seconds)`` after each mini-batch of
                this rank (``seconds`` since the product started); used for time estimates.
        """
        rank, world = rank_and_world()
        total = torch.zeros_like(flat)
        mine = list(range(rank, len(data), world))
        starts = list(range(0, len(mine), self.batch_size))
        began = time.perf_counter()
        theta = self._theta().to(flat.dtype)  # (P,)
        with eval_mode(self.model), sdpa_kernel([SDPBackend.MATH]):
            for done, start in enumerate(starts, 1):
                examples = [data.examples[i] for i in mine[start : start + self.batch_size]]
                batch = {k: v.to(self.device) for k, v in self.task.collate(examples).items()}
                fn = self._function(batch)

                def loss_of(o: torch.Tensor, batch=batch) -> torch.Tensor:
                    return self.task.loss_from_outputs(o, batch).sum()

                grad_loss = grad(loss_of)
                if self.vectorize and flat.shape[0] == 1:  # one forward, no separate vjp
                    self._fused(fn, theta, grad_loss, flat, total)
                else:
                    outputs, pullback = vjp(fn, theta)  # one forward for all Q vectors
                    outputs = outputs.detach()
                    if self.vectorize:
                        self._vectorized(fn, theta, outputs, grad_loss, pullback, flat, total)
                    else:
                        self._looped(fn, theta, outputs, grad_loss, pullback, flat, total)
                    del pullback, outputs
                if on_batch is not None:
                    on_batch(done, len(starts), time.perf_counter() - began)
        del theta
        all_reduce_(total)
        return total.div_(len(data))

    def _looped(self, fn, theta, outputs, grad_loss, pullback, flat, total) -> None:
        """Reference: one jvp, Hessian jvp and pullback per vector."""
        for q in range(flat.shape[0]):
            _, jv = jvp(fn, (theta,), (flat[q],))  # (B, ..., out)
            _, hjv = jvp(grad_loss, (outputs,), (jv.to(outputs.dtype),))
            total[q] += pullback(hjv.to(outputs.dtype))[0].detach()

    def _fused(self, fn, theta, grad_loss, flat, total) -> None:
        """One vector in one forward: ``J v`` from dual parameters, ``J^⊤`` through its graph.

        The forward runs on ``θ + ε v`` (a forward-mode dual tensor that also requires grad):
        its primal outputs carry the autograd graph and its tangent is ``J v``, so the
        separate primal forward of the vjp is saved. Same result as :meth:`_looped` (tested
        in float64).
        """
        th = theta.detach().requires_grad_(True)
        with forward_ad.dual_level():
            o, jv = forward_ad.unpack_dual(fn(forward_ad.make_dual(th, flat[0])))
        o_plain = o.detach()
        _, hjv = jvp(grad_loss, (o_plain,), (jv.detach().to(o_plain.dtype),))
        del jv, o_plain
        (g,) = torch.autograd.grad(o, th, hjv.to(o.dtype))
        total[0] += g.detach()

    def _vectorized(self, fn, theta, outputs, grad_loss, pullback, flat, total) -> None:
        """The same with the vectors batched by ``vmap`` in blocks of :meth:`query_block`."""

        def j(t: torch.Tensor) -> torch.Tensor:
            return jvp(fn, (theta,), (t,))[1].to(outputs.dtype)

        def h(u: torch.Tensor) -> torch.Tensor:
            return jvp(grad_loss, (outputs,), (u,))[1].to(outputs.dtype)

        block = self.query_block(outputs, flat.shape[0], flat.dtype)
        for lo in range(0, flat.shape[0], block):
            rows = slice(lo, lo + block)
            jv = vmap(j)(flat[rows])  # (q, B, ..., out)
            hjv = vmap(h)(jv)  # (q, B, ..., out)
            del jv
            total[rows] += vmap(pullback)(hjv)[0].detach()  # (q, P)

    def damped(self, flat: torch.Tensor, data: EncodedDataset, on_batch=None) -> torch.Tensor:
        """``(G + Λ) V``: ``(Q, P)`` → ``(Q, P)`` (``on_batch``: see :meth:`gauss_newton`).

        ``Λ V`` is added in place, layer by layer, to the product's own output, so no
        ``(Q, P)`` temporary is made besides the result.
        """
        kwargs = {} if on_batch is None else {"on_batch": on_batch}
        out = self.gauss_newton(flat, data, **kwargs)
        done = 0
        for layer, size in zip(self.layers, self.sizes):
            lam = float(self.damping[layer.name])
            out[:, done : done + size].add_(flat[:, done : done + size], alpha=lam)
            done += size
        return out
