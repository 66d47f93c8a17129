"""Collecting projected per-example gradients and checkpoints from a running training loop.

The training step's own forward and backward are reused: forward hooks on the tracked layers
keep their inputs ``a_t`` (bias column ``1`` appended), tensor hooks on their outputs keep the
output gradients that the training backward computes, ``∂ℓ/∂y_t``. With the trained loss

.. math:: ℓ = \\sum_b w_b\\, L(z_b, θ_s), \\qquad L(z, θ) = \\sum_t -\\log p_θ(x_t \\mid x_{<t}),

row ``b`` of the output gradient is ``w_b ∂L(z_b)/∂y`` (examples do not interact), so the
LoGra-projected per-example gradient of the *summed* loss is

.. math:: \\tilde g_b = \\frac{1}{w_b} \\sum_t (P_{out} s_{b,t}) (P_{in} \\bar a_{b,t})^⊤ ,

the same quantity a gradient index stores (:mod:`influscope.index.store`). Nothing is
differentiated twice. The parameters are ``θ_s`` (``s`` optimizer steps taken), so the rows
are stored under parameter step ``s`` (see :class:`~influscope.collect.CollectConfig`).

**Verification.** A hook on each tracked parameter's gradient accumulation (during the
backward, before any clipping) projects the gradient the optimizer will use,
``P_out ∇_W ℓ P_inᵀ``, and compares it with ``Σ_b w_b g̃_b``. A mismatch — hooks that missed
part of the backward, a module whose output gradient is not the whole story — raises
:class:`~influscope.errors.CollectionError` instead of storing wrong rows. Gradients already
held before the backward (accumulation) and layers run more than once per step are refused
separately. The weights ``w_b`` themselves cannot be read off this sum (they cancel): the plain
loop knows them because :meth:`GradientCollector.backward` forms the loss, and the Trainer
callback measures them at the logits (:mod:`influscope.collect.callback`).

Plain PyTorch loop::

    collector = GradientCollector(model, "runs/collect", CollectConfig(checkpoint_every=50))
    with collector:
        for indices, input_ids, labels in batches:
            collector.begin(indices, lr=optimizer.param_groups[0]["lr"])
            losses = sequence_losses(model, input_ids, labels)  # (B,) summed token CE
            optimizer.zero_grad(set_to_none=True)
            collector.backward(losses)  # losses.mean().backward(), captured
            clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(); scheduler.step()
            collector.end()  # writes the rows, saves a checkpoint when due
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from influscope.collect.config import CollectConfig
from influscope.collect.store import save_checkpoint, write_meta, write_step
from influscope.errors import CollectionError, ConfigError, DataError
from influscope.index.build import gradient_layout
from influscope.modules.capture import LayerBatch
from influscope.modules.expert_lists import ListExpertAdapter
from influscope.modules.passes import compute_dtype, model_device
from influscope.modules.selection import TrackedLayer, select_layers
from influscope.projection import LograProjector

__all__ = ["GradientCollector"]


class GradientCollector:
    """Saves checkpoints and projected per-example gradients of a training run.

    Args:
        model: The model being trained (hooks are attached inside ``with collector:``).
        out_dir: The collection directory (layout: :mod:`influscope.collect.store`).
        config: What to collect.
        start_step: Optimizer steps already taken (resumed training).

    Raises:
        ConfigError: Invalid config, or checkpoints asked of a model without
            ``save_pretrained``.
        ModuleMatchError: ``config.modules`` matches no module.
    """

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | Path,
        config: CollectConfig | None = None,
        start_step: int = 0,
    ) -> None:
        self.model = model
        self.root = Path(out_dir)
        self.config = config or CollectConfig()
        if self.config.checkpoint_every is not None and not hasattr(model, "save_pretrained"):
            raise ConfigError(
                f"checkpoint_every={self.config.checkpoint_every} saves checkpoints with "
                f"save_pretrained, which {type(model).__name__} lacks. Use a Hugging Face "
                "PreTrainedModel or set checkpoint_every=None."
            )
        self.layers: list[TrackedLayer] = select_layers(model, self.config.modules)
        moe = [
            t.name
            for t in self.layers
            if t.adapter.name in ("expert", "router") or isinstance(t.adapter, ListExpertAdapter)
        ]
        if moe:
            raise ConfigError(
                f"Training-time collection cannot track MoE experts or routers ({moe[0]!r}"
                f"{' …' if len(moe) > 1 else ''}): their per-token rows are read only by the "
                "offline passes (influscope fit/score/index). Collect with modules that leave "
                "them out, or build the index offline."
            )
        self.dtype = compute_dtype(model)
        self.step = int(start_step)
        self.lr_log: list[dict] = []
        self._handles: list = []
        self._armed = False
        self._lr: float | None = None
        self._indices: torch.Tensor | None = None
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._grad_proj: dict[str, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None
        self.projector: LograProjector | None = None
        self.layout: list[dict] = []
        if self.config.gradients:
            make = getattr(LograProjector, self.config.init)
            cpu = make(self.layers, self.config.k_in, self.config.k_out, self.config.seed)
            self.layout = gradient_layout(cpu)
            dim = self.layout[-1]["offset"] + self.layout[-1]["size"]
            meta = {
                "config": self.config.to_dict(),
                "layout": self.layout,
                "dim": dim,
                "layers": [layer.name for layer in self.layers],
                "step_meaning": "rows at parameter step s are ∇L(z, θ_s), θ_s = after s steps",
            }
            write_meta(self.root, meta, cpu)
            device = model_device(model)
            self.projector = LograProjector(
                {n: p.to(device, self.dtype) for n, p in cpu.p_in.items()},
                {n: p.to(device, self.dtype) for n, p in cpu.p_out.items()},
            )

    # --- hooks ---------------------------------------------------------------------------
    def __enter__(self) -> GradientCollector:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        """Register the forward and gradient hooks (idempotent)."""
        if self._handles or not self.config.gradients:
            return
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
            for param in layer.module.parameters(recurse=False):
                self._handles.append(
                    param.register_post_accumulate_grad_hook(self._grad_hook(layer, param))
                )

    def detach(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, layer: TrackedLayer):
        name = layer.name

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not self._armed or not torch.is_grad_enabled() or not output.requires_grad:
                return
            self._inputs.setdefault(name, []).append(inputs[0].detach())
            store = self._outputs.setdefault(name, [])
            output.register_hook(lambda g: store.append(g.detach()))

        return hook

    def _grad_hook(self, layer: TrackedLayer, param: nn.Parameter):
        name = layer.name

        def hook(p: torch.Tensor) -> None:
            if not self._armed or not self.config.verify or self.projector is None:
                return
            p_in = self.projector.p_in[name]  # (k_in, in[+1])
            p_out = self.projector.p_out[name]  # (k_out, out)
            g = p.grad.detach().to(self.dtype)
            if p is layer.module.weight:
                w = g if layer.adapter.weight_is_out_in else g.t()  # (out, in)
                part = p_out @ w @ p_in[:, : w.shape[1]].t()  # (k_out, k_in)
            else:  # bias: the last input column
                part = (p_out @ g)[:, None] * p_in[:, -1][None, :]  # (k_out, k_in)
            self._grad_proj[name] = self._grad_proj.get(name, 0) + part

        return hook

    # --- one training step ---------------------------------------------------------------
    @property
    def collecting(self) -> bool:
        """Whether the current step's gradients are collected."""
        return self.config.gradients and self.step % self.config.gradient_every == 0

    def begin(self, indices: Sequence[int] | torch.Tensor | None = None, lr: float | None = None):
        """Start optimizer step ``self.step + 1`` (parameters ``θ_s``, ``s = self.step``).

        Args:
            indices: Example index of each row of the coming batch (or later via
                :meth:`set_indices`).
            lr: The learning rate this step will use (recorded for the checkpoints' log and as
                the TracIn weight of the collected rows).

        """
        if self.collecting and self.step == 0 and self.config.checkpoint_every is not None:
            save_checkpoint(self.model, self.root, 0, self.lr_log)  # θ_0 for the s = 0 rows
        self._armed = self.collecting
        self._lr = None if lr is None else float(lr)
        self._inputs.clear()
        self._outputs.clear()
        self._grad_proj.clear()
        self._rows = None
        self._indices = None
        if indices is not None:
            self.set_indices(indices)

    def check_fresh_gradients(self) -> None:
        """Refuse a backward into tracked parameters that already hold gradients.

        Raises:
            ConfigError: A tracked weight holds a non-zero gradient (accumulation over several
                backward passes per optimizer step is not supported).
        """
        if not self._armed:
            return
        held = [
            layer.name
            for layer in self.layers
            if any(
                p.grad is not None and bool(p.grad.ne(0).any())
                for p in layer.module.parameters(recurse=False)
            )
        ]
        if held:
            raise ConfigError(
                f"Tracked parameters of {held[:3]} already hold gradients before the backward "
                f"of step {self.step + 1}: gradients accumulated over several backward passes "
                "cannot be split per example and step. Zero them before each backward "
                "(optimizer.zero_grad()) and use one backward per optimizer step "
                "(gradient_accumulation_steps=1)."
            )

    def set_indices(self, indices: Sequence[int] | torch.Tensor) -> None:
        """Example indices of the current batch's rows."""
        self._indices = torch.as_tensor(indices, dtype=torch.long).detach().cpu().reshape(-1)

    def backward(self, losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``(Σ_b w_b losses_b).backward()`` with capture; ``w_b = 1/B`` by default (the mean).

        Args:
            losses: ``(B,)`` per-example training losses, each the *sum* of its token losses.
            weights: ``(B,)`` positive weights of the trained objective.

        Returns:
            The scalar that was differentiated.

        Raises:
            ConfigError: Tracked parameters already hold gradients (no ``zero_grad``).
            CollectionError: See :meth:`after_backward` and :meth:`check`.
        """
        if losses.dim() != 1:
            raise DataError(
                f"losses must be the (B,) per-example losses, received shape {tuple(losses.shape)}."
            )
        b = losses.shape[0]
        if weights is None:
            weights = torch.full((b,), 1.0 / b, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if weights.shape[0] != b or not bool((weights > 0).all()):
            raise DataError(
                f"weights must be {b} positive numbers (one per example), received "
                f"{weights.tolist()[:8]}."
            )
        self.check_fresh_gradients()
        total = (losses * weights.to(losses.device, losses.dtype)).sum()
        total.backward()
        self.after_backward(weights)
        self.check()
        return total.detach()

    def after_backward(self, weights: torch.Tensor) -> None:
        """Form the projected per-example rows from what the hooks captured.

        Args:
            weights: ``(B,)`` (or one number for all) ``w_b`` of the differentiated loss.

        Raises:
            CollectionError: A tracked layer ran more than once (or never) in the step, or the
                batch has another number of rows than indices.
        """
        if not self._armed:
            return
        parts = []
        for layer in self.layers:
            ins, outs = self._inputs.get(layer.name, []), self._outputs.get(layer.name, [])
            if len(ins) != 1 or len(outs) != 1:
                raise CollectionError(
                    f"Layer {layer.name!r} ran {len(ins)} time(s) with {len(outs)} output "
                    f"gradient(s) in step {self.step + 1}; expected exactly one forward and one "
                    "backward per step. Gradient checkpointing, several forwards per step or a "
                    "module that does not reach the loss cannot be collected: disable "
                    "gradient_checkpointing, run one forward/backward per step, or track "
                    "other modules."
                )
            a = ins[0].reshape(ins[0].shape[0], -1, ins[0].shape[-1]).to(self.dtype)  # (B, T, in)
            s = outs[0].reshape(outs[0].shape[0], -1, outs[0].shape[-1]).to(self.dtype)
            if layer.has_bias:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)  # (B, T, in + 1)
            w = torch.as_tensor(weights, dtype=self.dtype, device=s.device).reshape(-1)
            if w.numel() == 1:
                w = w.expand(s.shape[0])
            s = s / w[:, None, None]  # rows of ∇ of the summed per-example loss
            g = self.projector.project(layer.name, LayerBatch(a, s, None)).gradient()
            parts.append(g.flatten(1))  # (B, k_out·k_in)
        self._rows = torch.cat(parts, dim=1)  # (B, D)
        if self._indices is None:
            raise DataError(
                f"Step {self.step + 1}: no example indices for the batch. Pass indices= to "
                "begin() (plain loop) or build the Trainer's data_collator with "
                "InfluenceCallback.collator(...) and give every example an index."
            )
        if self._indices.numel() != self._rows.shape[0]:
            raise CollectionError(
                f"Step {self.step + 1}: {self._rows.shape[0]} rows in the batch but "
                f"{self._indices.numel()} example indices. Give one index per example."
            )
        self._scale = w  # (B,)

    def check(self) -> None:
        """Compare ``Σ_b w_b g̃_b`` with the projected accumulated gradient (``verify``).

        Raises:
            CollectionError: They differ by more than ``verify_tol`` (relative).
        """
        if not self._armed or not self.config.verify or self._rows is None:
            return
        if not self._grad_proj:
            return  # frozen tracked weights: nothing to compare with
        x = self._scale[:, None] * self._rows  # (B, D)
        x = x.sum(0)  # (D,)
        got, want = [], []
        for e in self.layout:
            if e["name"] in self._grad_proj:
                got.append(self._grad_proj[e["name"]].flatten())
                want.append(x[e["offset"] : e["offset"] + e["size"]])
        got_v, want_v = torch.cat(got), torch.cat(want)
        err = float((got_v - want_v).norm() / got_v.norm().clamp_min(1e-300))
        if not err <= self.config.verify_tol:
            ratio = float(got_v @ want_v / (want_v @ want_v).clamp_min(1e-300))
            raise CollectionError(
                f"Step {self.step + 1}: the collected per-example gradients do not add up to "
                f"the gradient the optimizer received (relative error {err:.3g} > "
                f"{self.config.verify_tol:g}; scale ratio {ratio:.4g}). Expected the trained "
                "loss Σ_b w_b L(z_b) with L the summed token cross-entropy (Trainer: the "
                "default causal-LM loss, mean over predicted tokens). A custom compute_loss, "
                "label smoothing, fp16 loss scaling or accumulated gradients change it; "
                "remove them, or pass the right weights to backward()."
            )

    def end(self, lr: float | None = None) -> None:
        """Finish the optimizer step: write the rows, log ``lr``, save a checkpoint when due.

        Args:
            lr: The step's learning rate, if not given to :meth:`begin`.

        Raises:
            ConfigError: No learning rate known for the step.
        """
        lr = self._lr if lr is None else float(lr)
        if lr is None:
            raise ConfigError(
                f"Step {self.step + 1} has no learning rate: pass lr= to begin() or end() "
                "(optimizer.param_groups[0]['lr'] before scheduler.step())."
            )
        if self._armed:
            if self._rows is None:
                raise CollectionError(
                    f"Step {self.step + 1} was collected but no backward was captured. Call "
                    "collector.backward(losses) (or after_backward) between begin() and end()."
                )
            dtype = getattr(torch, self.config.dtype)
            write_step(self.root, self.step, self._indices, self._rows.to(dtype).cpu(), lr)
        self._armed = False
        self._rows = None
        self.step += 1
        self.lr_log.append({"step": self.step, "learning_rate": lr})
        every = self.config.checkpoint_every
        if every is not None and self.step % every == 0:
            save_checkpoint(self.model, self.root, self.step, self.lr_log)
