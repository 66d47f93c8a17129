"""Optimizer-aware index rows (TrackStar; Chang et al. 2024, arXiv 2410.17413).

TrackStar scales each per-example gradient elementwise by Adam's second-moment estimate before
projecting, and compares unit-normalised projections (cosine similarity):

    ĝ_ℓ = P_out,ℓ (G_ℓ ⊙ (v_ℓ + ε)^{-1/2}) P_in,ℓ^⊤,   row = ĝ / ‖ĝ‖₂ (over all layers),

with ``G_ℓ = Σ_t s_t ā_tᵀ`` the ``(out, in[+1])`` per-sequence gradient (bias folded in as the
last column, :class:`~influscope.modules.adapters.ModuleAdapter`) and ``v_ℓ`` Adam's
``exp_avg_sq`` in the same layout. The scaling does not factor through the Kronecker
projection, so the full per-sequence gradient is formed (``B·out·in`` numbers per layer at a
time). Train rows and queries get the same scaling; the scales are stored with the index
(``optimizer_scale.safetensors``), so a query needs no optimizer file. Unit normalisation
(``IndexConfig.normalize``) is applied to the whole row of both sides (queries after their
preconditioning); with the identity curvature the index score is ``-cos(q̂, ĝ_m)``.

Reading the second moments (:func:`load_adam_moments`), without unpickling anything:

* ``.safetensors``: ``{parameter name: exp_avg_sq}`` (:func:`save_adam_moments` writes it);
* a torch optimizer state (``optimizer.pt`` of a ``transformers`` Trainer checkpoint, or
  ``torch.save(optimizer.state_dict())``), read with ``torch.load(weights_only=True)``, which
  only rebuilds tensors and plain containers and refuses arbitrary objects (no code runs). Its
  state is keyed by position; positions are mapped to parameter names through the groups'
  ``param_names`` when the optimizer was built from ``named_parameters()``, else through the
  model's trainable parameters in one of two orders — as ``named_parameters()`` lists them, or
  matrices first (``ndim ≥ 2``, then the rest: the weight-decay grouping of ``transformers``'
  Trainer for GPT-2/Llama-style models and of :func:`influscope.optim.decoupled_adamw`) — kept
  only if every shape matches and the orders that match agree.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from influscope.errors import DataError
from influscope.modules.capture import LayerBatch
from influscope.modules.selection import TrackedLayer
from influscope.projection import LograProjector

#: File of the per-layer scales ``(v + ε)^{-1/2}`` beside an index.
SCALE_FILE = "optimizer_scale.safetensors"


def save_adam_moments(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> Path:
    """Write Adam's ``exp_avg_sq`` of every parameter of ``model`` that has one, by name."""
    from influscope.storage import atomic_write_tensors

    state = {
        name: optimizer.state[p]["exp_avg_sq"].detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if p in optimizer.state and "exp_avg_sq" in optimizer.state[p]
    }
    if not state:
        raise DataError(
            "The optimizer holds no 'exp_avg_sq' for this model's parameters: pass an Adam/AdamW "
            "optimizer that has taken at least one step on this model."
        )
    return atomic_write_tensors(Path(path), state)


def _orders(model: nn.Module) -> dict[str, list[tuple[str, torch.Size]]]:
    named = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "named_parameters": named,
        "matrices first": [x for x in named if len(x[1]) >= 2]
        + [x for x in named if len(x[1]) < 2],
    }


def load_adam_moments(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Adam's second moments ``{parameter name: exp_avg_sq}`` from a saved optimizer state.

    Args:
        path: A ``.safetensors`` file by parameter name, or a torch optimizer state dict
            (e.g. a Trainer checkpoint's ``optimizer.pt``), loaded with ``weights_only=True``.
        model: The model the optimizer trained (names and shapes).

    Raises:
        DataError: Missing file, no ``exp_avg_sq``, or positions that cannot be mapped to the
            model's parameters unambiguously.
    """
    moments = _load(Path(path), model)
    params = dict(model.named_parameters())
    wrong = [
        f"{n}: {tuple(v.shape)} vs {tuple(params[n].shape) if n in params else 'absent'}"
        for n, v in moments.items()
        if n not in params or v.shape != params[n].shape
    ]
    if wrong:
        raise DataError(
            f"The optimizer state in {path} does not fit this model ({len(wrong)} tensors, e.g. "
            f"{wrong[:3]}): it is the state of another model. Pass the optimizer state saved "
            "with the checkpoint of this model."
        )
    return moments


def _load(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(
            f"No optimizer state at {path}. Pass a Trainer checkpoint's optimizer.pt or a "
            ".safetensors file from influscope.index.trackstar.save_adam_moments."
        )
    if path.suffix == ".safetensors":
        from influscope.storage.atomic import read_tensors

        return read_tensors(path)
    state = torch.load(path, map_location="cpu", weights_only=True)  # no unpickling of objects
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise DataError(
            f"{path} is not an optimizer state dict (expected keys 'state' and 'param_groups', "
            f"got {sorted(state) if isinstance(state, dict) else type(state).__name__})."
        )
    moments = {i: s["exp_avg_sq"] for i, s in state["state"].items() if "exp_avg_sq" in s}
    if not moments:
        raise DataError(f"{path} holds no 'exp_avg_sq': it is not the state of Adam/AdamW.")
    positions = [i for g in state["param_groups"] for i in g["params"]]
    names = [n for g in state["param_groups"] for n in g.get("param_names", [])]
    if len(names) == len(positions):
        return {n: moments[i] for n, i in zip(names, positions) if i in moments}
    shapes = dict(_orders(model)["named_parameters"])
    found = {}
    for label, order in _orders(model).items():
        if len(order) == len(positions) and all(
            i not in moments or moments[i].shape == shape for i, (_, shape) in zip(positions, order)
        ):
            found[label] = {n: moments[i] for i, (n, _) in zip(positions, order) if i in moments}
    keys = {tuple(sorted((n, id(v)) for n, v in m.items())) for m in found.values()}
    if len(keys) != 1:
        raise DataError(
            f"Cannot tell which parameter each of the {len(positions)} optimizer positions in "
            f"{path} belongs to (the model has {len(shapes)} trainable parameters; orders tried: "
            f"{', '.join(_orders(model))}; matching: {sorted(found) or 'none'}). Export the "
            "moments by name with influscope.index.trackstar.save_adam_moments(model, optimizer, "
            "'moments.safetensors'), or build the optimizer from model.named_parameters()."
        )
    return next(iter(found.values()))


def adam_scales(
    layers: list[TrackedLayer], moments: dict[str, torch.Tensor], eps: float
) -> dict[str, torch.Tensor]:
    """``{layer: (v + ε)^{-1/2}}`` in the ``(out, in[+1])`` layout of each tracked layer.

    Raises:
        DataError: A tracked layer's weight (or bias) has no second moment.
    """
    out = {}
    for layer in layers:
        params = [f"{layer.name}.weight"] + ([f"{layer.name}.bias"] if layer.has_bias else [])
        missing = [n for n in params if n not in moments]
        if missing:
            raise DataError(
                f"The optimizer state has no second moment for {missing} (tracked layer "
                f"{layer.name}); it holds {len(moments)} tensors, e.g. {sorted(moments)[:3]}. "
                "Pass the state of the optimizer that trained this model."
            )
        v = layer.adapter.join(layer.module, [moments[n].float() for n in params])
        out[layer.name] = (v + eps).rsqrt()  # (out, in[+1])
    return out


def scales_fingerprint(scales: dict[str, torch.Tensor]) -> str:
    """A hash of the scales' bytes (part of an index's fingerprint)."""
    h = hashlib.sha256()
    for name in sorted(scales):
        h.update(name.encode())
        h.update(scales[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def scaled_gradients(
    projector: LograProjector, grads: dict[str, LayerBatch], scales: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{layer: P_out (G ⊙ w) P_inᵀ}``, ``(B, k_out, k_in)``, with ``G`` the full per-example
    gradient and ``w`` the layer's scale (float32)."""
    out = {}
    for name, lb in grads.items():
        g = lb.gradient().float() * scales[name].to(lb.a.device)  # (B, out, in)
        p_in = projector.p_in[name].to(g.device, g.dtype)  # (k_in, in)
        p_out = projector.p_out[name].to(g.device, g.dtype)  # (k_out, out)
        out[name] = torch.einsum("ko,boi,ji->bkj", p_out, g, p_in)  # (B, k_out, k_in)
    return out


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their Euclidean norm (zero rows stay zero): ``(n, D)``."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
