"""Slow, exact references used by the tests (float64, tiny models only).

* :func:`per_example_gradients` — one autograd call per example, read from the parameters.
* :func:`exact_gauss_newton` — the dense Gauss-Newton Hessian of the training objective over
  the tracked parameters, ``G = (1/N) Σ_n J_n^⊤ H_n J_n`` with ``J_n`` the Jacobian of the
  task's outputs and ``H_n`` the Hessian of the loss w.r.t. those outputs (``torch.func``).
* :func:`exact_influence` — ``-∇f^⊤ (G + Λ_damp)^{-1} ∇L`` with the dense ``G``.
* :func:`ekfac_eigenvalues` — EK-FAC's refitted eigenvalues from per-example gradients.
* :func:`truncated_ekfac_influence` — EK-FAC influence restricted to chosen eigen-coordinates,
  with dense Kronecker eigenvectors (the reference of the ``eigen`` index selection).
* :func:`datainf_inverse` — DataInf's explicit ``(P, P)`` inverse (Kwon et al. 2024, eq. 5).

The flat parameter vector concatenates each layer's ``(out, in[+1])`` matrix in row-major
order, layer after layer (the layout every other part of influscope uses).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from influscope.modules.experts import tracked_values
from influscope.modules.passes import eval_mode
from influscope.modules.selection import TrackedLayer
from influscope.tasks.base import Task
from influscope.tasks.data import EncodedDataset, example_seeds


def _batch(task: Task, data: EncodedDataset, i: int, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in task.collate([data.examples[i]]).items()}


def per_example_gradients(
    model: nn.Module,
    task: Task,
    layers: Sequence[TrackedLayer],
    data: EncodedDataset,
    objective: str = "loss",
    sample_seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example gradients by an autograd loop: ``{layer: (N, out, in[+1])}``.

    Args:
        objective: ``"loss"`` (training loss) or ``"measurement"``.
        sample_seed: Sample targets from the model as the fitting passes do.
    """
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    with eval_mode(model):
        for i in range(len(data)):
            batch = _batch(task, data, i, device)
            if objective == "loss":
                seeds = (
                    None if sample_seed is None else example_seeds(sample_seed, [data.indices[i]])
                )
                value = task.training_loss(model, batch, seeds).sum()
            else:
                value = task.measurement(model, batch).sum()
            params = [layer.adapter.weight(layer.module) for layer in layers] + [
                layer.module.bias for layer in layers if layer.has_bias
            ]
            unique = list({id(p): p for p in params}.values())  # experts share a 3-D parameter
            grads = torch.autograd.grad(value, unique, allow_unused=True)
            by_id = {id(p): torch.zeros_like(p) if g is None else g for p, g in zip(unique, grads)}
            for layer in layers:
                parts = [by_id[id(layer.adapter.weight(layer.module))]]
                if layer.has_bias:
                    parts.append(by_id[id(layer.module.bias)])
                out[layer.name].append(layer.adapter.join(layer.module, parts))
    return {k: torch.stack(v) for k, v in out.items()}


def flatten(grads: dict[str, torch.Tensor], layers: Sequence[TrackedLayer]) -> torch.Tensor:
    """``{layer: (N, out, in)}`` → ``(N, P)`` in the flat layout."""
    return torch.cat(
        [grads[layer.name].reshape(grads[layer.name].shape[0], -1) for layer in layers], dim=1
    )


class _TaskOutputs(nn.Module):
    """``batch → task.outputs(model, batch)`` as a module, for ``functional_call``."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.outputs(self.model, batch)


def functional_outputs(model: nn.Module, task: Task, layers: Sequence[TrackedLayer], batch):
    """``outputs(flat θ_tracked)`` for one batch (other parameters fixed) and θ_tracked."""
    wrapper = _TaskOutputs(model, task)
    names = {id(p): f"model.{n}" for n, p in model.named_parameters()}
    shapes = [(layer.out_dim, layer.in_dim) for layer in layers]
    sizes = [o * i for o, i in shapes]

    def fn(flat: torch.Tensor) -> torch.Tensor:
        chunks = [c.view(shape) for c, shape in zip(flat.split(sizes), shapes)]
        params = {names[id(p)]: value for p, value in tracked_values(layers, chunks)}
        return functional_call(wrapper, params, (batch,))

    theta = torch.cat([layer.adapter.weight_out_in(layer.module).reshape(-1) for layer in layers])
    return fn, theta


def exact_gauss_newton(
    model: nn.Module,
    task: Task,
    layers: Sequence[TrackedLayer],
    data: EncodedDataset,
    chunk: int = 16,
) -> torch.Tensor:
    """Dense ``G = (1/N) Σ_n J_n^⊤ H_n J_n`` over the tracked parameters: ``(P, P)``.

    Examples are processed ``chunk`` at a time (one Jacobian of the chunk's outputs); the loss
    Hessian w.r.t. the outputs is block-diagonal over examples because examples do not interact.
    """
    device = next(model.parameters()).device
    total = None
    with eval_mode(model):
        for start in range(0, len(data), chunk):
            examples = data.examples[start : start + chunk]
            batch = {k: v.to(device) for k, v in task.collate(examples).items()}
            fn, theta = functional_outputs(model, task, layers, batch)
            outputs = fn(theta).detach()
            jac = jacrev(fn)(theta).reshape(-1, theta.numel())  # (n_out, P)

            def loss_of(o: torch.Tensor, batch=batch, shape=outputs.shape) -> torch.Tensor:
                return task.loss_from_outputs(o.view(shape), batch).sum()

            h = hessian(loss_of)(outputs.reshape(-1)).to(jac.dtype)  # (n_out, n_out)
            g = jac.t() @ h @ jac  # (P, P)
            total = g if total is None else total + g
    return total.detach() / len(data)


def damping_vector(
    layers: Sequence[TrackedLayer], damping: float | dict[str, float]
) -> torch.Tensor:
    """Per-parameter damping in the flat layout: ``(P,)``."""
    parts = [
        torch.full(
            (layer.numel,),
            float(damping[layer.name] if isinstance(damping, dict) else damping),
            dtype=torch.float64,
        )
        for layer in layers
    ]
    return torch.cat(parts)


def exact_influence(
    model: nn.Module,
    task: Task,
    layers: Sequence[TrackedLayer],
    train: EncodedDataset,
    queries: EncodedDataset,
    damping: float | dict[str, float],
    gauss_newton: torch.Tensor | None = None,
) -> torch.Tensor:
    """``-∇f_q^⊤ (G + Λ)^{-1} ∇L(z_m)`` with the dense Gauss-Newton ``G``: ``(Q, N)``."""
    g = gauss_newton if gauss_newton is not None else exact_gauss_newton(model, task, layers, train)
    g = g.double() + torch.diag(damping_vector(layers, damping)).to(g.device)
    q = flatten(per_example_gradients(model, task, layers, queries, "measurement"), layers)
    t = flatten(per_example_gradients(model, task, layers, train, "loss"), layers)
    return -(torch.linalg.solve(g, q.double().t()).t() @ t.double().t())


def ekfac_eigenvalues(grads: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """``mean_n (Q_S^⊤ g_n Q_A)^{⊙2}`` for per-example gradients ``(N, out, in)``."""
    return (q_s.t().double() @ grads.double() @ q_a.double()).square().mean(0)


def datainf_inverse(grads: torch.Tensor, damping: float) -> torch.Tensor:
    """DataInf's approximate ``(G + λI)^{-1}`` as an explicit ``(P, P)`` float64 matrix.

    ``(1/n) Σ_i (g_i g_iᵀ + λI)^{-1}`` with each term inverted by a dense solve (not by the
    Sherman–Morrison formula the operator uses), for per-example gradients ``(n, out, in)`` or
    ``(n, P)``.
    """
    g = grads.double().reshape(grads.shape[0], -1)  # (n, P)
    eye = torch.eye(g.shape[1], dtype=torch.float64)
    terms = [torch.linalg.inv(torch.outer(gi, gi) + damping * eye) for gi in g]
    return torch.stack(terms).mean(0)  # (P, P)


def truncated_ekfac_influence(
    model: nn.Module,
    task: Task,
    layers: Sequence[TrackedLayer],
    train: EncodedDataset,
    queries: EncodedDataset,
    operator,
    keep: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``-Σ_ℓ Σ_{(i,j) ∈ keep_ℓ} q̃_ij g̃_ij / (Λ_ij + λ_ℓ)``: ``(Q, N)``.

    ``g̃_ij = (q_{S,i} ⊗ q_{A,j})^⊤ vec(G)``, the columns of the dense ``Q_S ⊗ Q_A`` taken at the
    kept flat coordinates ``keep[ℓ]`` (``i·in + j``); gradients from the autograd loop.
    """
    q = per_example_gradients(model, task, layers, queries, "measurement")
    t = per_example_gradients(model, task, layers, train, "loss")
    total = torch.zeros(len(queries), len(train), dtype=torch.float64)
    for layer in layers:
        n = layer.name
        basis = torch.kron(operator.q_s[n].double(), operator.q_a[n].double())  # (P, P)
        rows = basis[:, keep[n]].t()  # (K, P)
        lam = operator.eigenvalues[n].double().reshape(-1)[keep[n]] + operator.damping[n]  # (K,)
        q_k = q[n].double().flatten(1) @ rows.t()  # (Q, K)
        t_k = t[n].double().flatten(1) @ rows.t()  # (N, K)
        total -= (q_k / lam) @ t_k.t()
    return total


class DenseBlockOperator:
    """Block-diagonal damped curvature from dense per-layer matrices (tests only).

    Built from the diagonal blocks of :func:`exact_gauss_newton`; applies
    ``(G_ℓ + λ_ℓ I)^{-1} g`` by a dense solve, with the interface of a
    :class:`~influscope.curvature.base.CurvatureOperator` (``precondition``, ``quadratic``,
    ``layer_names``, ``damping``, ``name``).
    """

    name = "exact_block"

    def __init__(
        self,
        layers: Sequence[TrackedLayer],
        gauss_newton: torch.Tensor,
        damping: float | dict[str, float],
    ) -> None:
        self.shapes = {layer.name: (layer.out_dim, layer.in_dim) for layer in layers}
        self.damping = {
            layer.name: float(damping[layer.name] if isinstance(damping, dict) else damping)
            for layer in layers
        }
        self.blocks: dict[str, torch.Tensor] = {}
        start = 0
        for layer in layers:
            end = start + layer.numel
            block = gauss_newton[start:end, start:end].double()
            self.blocks[layer.name] = block + self.damping[layer.name] * torch.eye(
                layer.numel, dtype=torch.float64
            )
            start = end

    @property
    def layer_names(self) -> list[str]:
        return list(self.blocks)

    def precondition(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        flat = g.double().reshape(-1, g.shape[-2] * g.shape[-1])  # (B, out·in)
        solved = torch.linalg.solve(self.blocks[layer], flat.t()).t()  # (B, out·in)
        return solved.reshape(g.shape).to(g.dtype)

    def quadratic(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        return (g * self.precondition(layer, g)).sum(dim=(-2, -1))
