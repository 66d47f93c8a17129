"""A Hugging Face ``TrainerCallback`` that collects during ``Trainer.train()``.

Usage (causal LM, default Trainer loss)::

    callback = InfluenceCallback("runs/collect", CollectConfig(checkpoint_every=100))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(..., remove_unused_columns=False),
        train_dataset=train,  # every example has an "example_index"
        data_collator=callback.collator(DataCollatorForLanguageModeling(tok, mlm=False)),
        callbacks=[callback],
    )
    trainer.train()

The collator moves each example's ``example_index`` into the batch as ``influscope_index``; a
forward pre-hook on the model takes it out again before ``model(**batch)`` sees it, together
with the labels. The Trainer's causal-LM loss is ``ℓ = w Σ_b L(z_b)`` with ``w = 1/N`` and ``N`` a
token count (which count depends on the transformers version and the model's ``loss_type``:
5.x counts ``labels != -100`` unshifted for a model without ``loss_type``). Rather than assume
``N``, a hook on the logits reads ``w`` off the gradient the backward sends there (see
``_logit_probe``); :class:`GradientCollector` divides it out and checks the rows against the
gradient the optimizer received.

Callback events used (transformers' ``Trainer`` loop, one optimizer step): ``on_step_begin``
(the step's learning rate, arm the hooks) → forward/backward → ``on_pre_optimizer_step``
(rows formed and checked) → ``optimizer.step()`` → ``on_step_end`` (rows written, checkpoint
saved). Refused up front, with :class:`~influscope.errors.ConfigError`: gradient accumulation,
DeepSpeed, FSDP, several processes or GPUs, fp16 loss scaling, label smoothing, gradient
checkpointing and ``torch_compile`` — each changes the per-example rows the hooks see.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from influscope.collect.config import CollectConfig
from influscope.collect.hook import GradientCollector
from influscope.errors import CollectionError, ConfigError, DataError

__all__ = ["INDEX_KEY", "InfluenceCallback", "unsupported_settings"]

#: Batch key under which the collator passes the example indices to the model's pre-hook.
INDEX_KEY = "influscope_index"


def unsupported_settings(args: Any) -> list[str]:
    """What in ``TrainingArguments`` the callback cannot collect correctly (empty: fine)."""
    problems = []
    if int(getattr(args, "gradient_accumulation_steps", 1) or 1) > 1:
        problems.append(
            f"gradient_accumulation_steps={args.gradient_accumulation_steps} (one optimizer step "
            "sums several backward passes; set it to 1 and raise per_device_train_batch_size)"
        )
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
        problems.append(
            "DeepSpeed (it partitions parameters and gradients and runs its own backward; "
            "train without --deepspeed)"
        )
    fsdp = getattr(args, "fsdp", None)
    if fsdp and fsdp != "no" and fsdp != [] and fsdp is not False:
        problems.append(f"FSDP ({fsdp!r}: parameters are sharded; train without fsdp)")
    if int(getattr(args, "world_size", 1) or 1) > 1:
        problems.append(f"world_size={args.world_size} (distributed training; use one process)")
    if int(getattr(args, "n_gpu", 1) or 1) > 1:
        problems.append(
            f"n_gpu={args.n_gpu} (DataParallel splits the batch over replicas; "
            "set CUDA_VISIBLE_DEVICES to one GPU)"
        )
    if getattr(args, "fp16", False):
        problems.append("fp16=True (the gradient scaler rescales gradients; use bf16 or float32)")
    if float(getattr(args, "label_smoothing_factor", 0.0) or 0.0) > 0:
        problems.append(
            f"label_smoothing_factor={args.label_smoothing_factor} (another loss than the "
            "summed token cross-entropy; set it to 0)"
        )
    if getattr(args, "gradient_checkpointing", False):
        problems.append("gradient_checkpointing=True (layers run twice; turn it off)")
    if getattr(args, "torch_compile", False):
        problems.append("torch_compile=True (compiled graphs skip module hooks; turn it off)")
    return problems


class InfluenceCallback(TrainerCallback):
    """Saves checkpoints and/or projected per-example gradients during ``Trainer.train()``.

    Args:
        out_dir: Collection directory (:mod:`influscope.collect.store`).
        config: What to collect (:class:`CollectConfig`).
        index_key: The example field holding each example's index (read by :meth:`collator`).

    Raises:
        ConfigError: At ``on_train_begin``, for settings the callback cannot support
            (:func:`unsupported_settings`).
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: CollectConfig | None = None,
        index_key: str = "example_index",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.config = config or CollectConfig()
        self.index_key = index_key
        self.collector: GradientCollector | None = None
        self._handles: list = []
        self._labels: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._logit_err: float | None = None
        self._saw_index = False

    # --- data ----------------------------------------------------------------------------
    def collator(self, base: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
        """Wrap ``base`` so that each batch carries its examples' indices.

        Each feature must hold ``index_key``; it is removed before ``base`` sees the features
        and returned as the batch tensor ``influscope_index``.

        Raises:
            DataError: (when called) a feature without ``index_key``.
        """
        key = self.index_key

        def collate(features: list[dict]) -> dict:
            missing = [i for i, f in enumerate(features) if key not in f]
            if missing:
                raise DataError(
                    f"Training examples {missing[:5]} of this batch have no {key!r} field "
                    f"(fields: {sorted(features[missing[0]])}). Add it, e.g. "
                    f"dataset.map(lambda _, i: {{{key!r}: i}}, with_indices=True), and set "
                    "TrainingArguments(remove_unused_columns=False) so the Trainer keeps it."
                )
            indices = [int(f[key]) for f in features]
            batch = dict(base([{k: v for k, v in f.items() if k != key} for f in features]))
            batch[INDEX_KEY] = torch.tensor(indices, dtype=torch.long)
            return batch

        return collate

    # --- model hooks ---------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        indices = kwargs.pop(INDEX_KEY, None)
        if module.training and torch.is_grad_enabled() and self.collector is not None:
            if indices is not None:
                self._saw_index = True
                self.collector.set_indices(indices)
            self._labels = kwargs.get("labels")
        return args, kwargs

    def _post_forward(self, module, args, kwargs, output):
        if not (module.training and torch.is_grad_enabled() and self.collector is not None):
            return
        if not self.collector.collecting or self._labels is None:
            return
        logits = getattr(output, "logits", None)
        if logits is None or not logits.requires_grad:
            return
        with torch.no_grad():
            target = self._labels[:, 1:].to(logits.device)  # (B, T-1): token t+1 predicted at t
            keep = target.ne(-100)
            pos = torch.arange(target.shape[1], device=target.device).expand_as(target)
            first = torch.where(keep, pos, target.shape[1]).min(1).values  # (B,)
            last = torch.where(keep, pos, -1).max(1).values  # (B,)
            rows = torch.arange(len(target), device=target.device)
            ok = last >= 0  # rows with at least one predicted token
            b_idx = torch.cat([rows[ok], rows[ok]])  # (K,) probe positions: first and last
            t_idx = torch.cat([first[ok], last[ok]])
            probe = logits.detach()[b_idx, t_idx].double()  # (K, V)
            onehot = torch.zeros_like(probe)
            onehot[torch.arange(len(b_idx)), target[b_idx, t_idx]] = 1.0
            d = torch.softmax(probe, dim=-1) - onehot  # (K, V): ∂L/∂logits at the probes
        logits.register_hook(self._logit_probe(b_idx, t_idx, d, rows[ok]))

    def _logit_probe(self, b_idx, t_idx, d, rows):
        """Hook reading ``w`` from ``∂ℓ/∂logits = w (softmax − onehot)`` at probe tokens.

        ``ℓ = w Σ_b L(z_b)`` makes the gradient at every predicted token ``w`` times
        ``∂L/∂logits``. Each row's first and last predicted tokens are probed; one ``w`` is
        fitted to all probes (so no assumption about the Trainer's token count is needed), and
        the fit's relative residual shows a loss that is not of that form — per-example
        weights, label smoothing, fp16 loss scaling or another custom loss. Per-token weights
        inside a sequence that leave both probes alone go unnoticed.
        """

        def hook(g: torch.Tensor) -> None:
            with torch.no_grad():
                got = g[b_idx, t_idx].double()  # (K, V)
                # one w for all probes (least squares); per-row fits would be dominated by
                # float32 rounding on confidently predicted tokens, where softmax − onehot ≈ 0
                w = (got * d).sum() / d.square().sum().clamp_min(1e-300)
                resid = (got - w * d).norm() / got.norm().clamp_min(1e-300)
                self._scale = w.reshape(1).cpu()
                self._logit_err = float(resid)

        return hook

    # --- events --------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        problems = unsupported_settings(args)
        if problems:
            raise ConfigError(
                "InfluenceCallback cannot collect per-example gradients correctly with: "
                + "; ".join(problems)
                + ". Change these settings, or collect afterwards from saved checkpoints "
                "(influscope index / trajectory)."
            )
        if model is None:
            raise ConfigError("on_train_begin received no model; pass the callback to Trainer.")
        self.collector = GradientCollector(model, self.out_dir, self.config, state.global_step)
        self.collector.attach()
        self._handles.append(model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._post_forward, with_kwargs=True))

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        self._labels = None
        self._scale = None
        self._logit_err = None
        self.collector.begin(lr=lr)
        self.collector.check_fresh_gradients()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        collector = self.collector
        if not collector.collecting:
            return
        if not self._saw_index:
            raise DataError(
                "The training batches carry no example indices. Build the Trainer with "
                "data_collator=callback.collator(your_collator) and give every example an "
                f"{self.index_key!r} field (remove_unused_columns=False)."
            )
        if self._labels is None:
            raise DataError(
                "The training batches have no 'labels': InfluenceCallback supports the "
                "Trainer's causal-LM loss computed by the model from labels. Use "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False) or pass labels."
            )
        if self._scale is None:
            raise DataError(
                "No gradient reached the model's logits in the training backward: "
                "InfluenceCallback needs a causal LM whose output has .logits and a loss "
                "computed from them and the batch's labels."
            )
        if (
            self.config.verify
            and self._logit_err is not None
            and not self._logit_err <= self.config.verify_tol
        ):
            raise CollectionError(
                f"Step {state.global_step + 1}: the gradient of the trained loss at the logits "
                f"is not w·(softmax − one-hot) on every predicted token (relative error "
                f"{self._logit_err:.3g} > {self.config.verify_tol:g}), so the loss is not a "
                "uniform multiple of the summed token cross-entropy: a custom compute_loss, "
                "per-example or per-token weights, label smoothing or loss scaling. The "
                "collected rows would be wrong; train with the default causal-LM loss."
            )
        collector.after_backward(self._scale)
        collector.check()

    def on_step_end(self, args, state, control, **kwargs):
        self.collector.end()

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.collector is not None:
            self.collector.detach()
