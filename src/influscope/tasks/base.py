"""The task contract: how a batch becomes a training loss and a measurement.

A task has two required methods:

* :meth:`Task.training_loss` — the **per-example** training loss ``L(z, θ)`` (for language
  models the *sum* of token cross-entropies, which makes the Fisher equal the Gauss-Newton
  Hessian). With ``sample_seeds`` it must replace the targets by labels sampled from the model
  (one seed per example), which gives the true Fisher.
* :meth:`Task.measurement` — the per-example quantity ``f(θ)`` whose change is attributed
  (for causal LMs ``log p(completion | prompt)``).

Optional: :meth:`Task.collate`, :meth:`Task.token_mask`, :meth:`Task.encode`, and the split
:meth:`Task.outputs` / :meth:`Task.loss_from_outputs` used by the exact Gauss-Newton oracle
and the refinement's Gauss-Newton products. A loss should be computed in
:func:`loss_precision` of the outputs (float32 for half-precision logits, the outputs' own
dtype otherwise), so that a float64 model keeps float64 through the loss Hessian.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from influscope.errors import ConfigError
from influscope.tasks.data import EncodedDataset, pad_stack


class Task(ABC):
    """Base class of tasks. Subclass it and implement the two abstract methods."""

    name: ClassVar[str] = "custom"
    #: The ``transformers`` auto class that loads a model for this task from a directory
    #: (:func:`influscope.loading.load_model`, the CLI's ``--model``).
    auto_model: ClassVar[str] = "AutoModelForSequenceClassification"
    #: Model rows per example (2 when chosen/rejected responses are stacked in one batch).
    rows_per_example: ClassVar[int] = 1
    #: Padding values used by the default :meth:`collate`.
    pad_values: ClassVar[dict[str, int]] = {"input_ids": 0, "attention_mask": 0, "labels": -100}

    @abstractmethod
    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], sample_seeds: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-example training loss, shape ``(B,)``; sampled targets when seeds are given."""

    @abstractmethod
    def measurement(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example measurement ``f``, shape ``(B,)``; influence is ``df/dε``."""

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack examples into a batch, right-padding 1-D tensors."""
        keys = examples[0].keys()
        return {
            k: pad_stack([e[k] for e in examples], self.pad_values.get(k, 0))
            if examples[0][k].dim()
            else torch.stack([e[k] for e in examples])
            for k in keys
        }

    def batch_rows(self, batch: dict[str, torch.Tensor]) -> int:
        """Model rows per example in this collated batch (:attr:`rows_per_example` unless the
        task varies it per batch, as contrastive causal-LM queries do)."""
        return self.rows_per_example

    def token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``(R, T)`` positions counted in token statistics (defaults to the attention mask)."""
        return batch.get("attention_mask")

    def encode(
        self, records: list[dict], tokenizer, max_length: int | None = None, truncate: bool = False
    ) -> EncodedDataset:
        """Turn records into an :class:`EncodedDataset` (implemented by the built-in tasks)."""
        raise NotImplementedError(f"Task {self.name!r} does not implement encode().")

    def outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model outputs the loss is a function of (for the exact Gauss-Newton oracle)."""
        raise NotImplementedError(f"Task {self.name!r} does not implement outputs().")

    def loss_from_outputs(
        self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Per-example loss as a function of :meth:`outputs` (for the exact oracle)."""
        raise NotImplementedError(f"Task {self.name!r} does not implement loss_from_outputs().")


def loss_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision its loss is computed in: half types go up to float32.

    float32 and float64 tensors are returned untouched (the same tensor object), so a float32
    model computes exactly what ``x.float()`` gave, and a float64 model keeps float64 through
    the loss — the loss Hessian and with it the Gauss-Newton products of
    :mod:`influscope.solvers` are then float64-accurate. float16 / bfloat16 logits are upcast
    to float32 (a softmax over a large vocabulary in half precision loses most digits).

    Args:
        x: Model outputs (logits, rewards), any shape.

    Returns:
        ``x`` (float32 / float64) or ``x.float()`` (any other dtype).
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def sample_categorical(logits: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Sample one class per position from ``softmax(logits)``, seeded per example.

    Each example ``b`` draws its uniforms from its own generator seeded with ``seeds[b]``, so
    the samples do not depend on batch composition, batch size or rank. The draw uses float32
    probabilities whatever the logits' dtype: it is not differentiated, and a float32 and a
    float64 copy of one model then sample the same labels.

    Args:
        logits: ``(B, ..., V)``.
        seeds: ``(B,)`` int64.

    Returns:
        ``(B, ...)`` int64 class indices.
    """
    probs = torch.softmax(logits.detach().float(), dim=-1)  # (B, ..., V)
    cdf = probs.cumsum(-1)
    u = torch.stack(
        [
            torch.rand(logits.shape[1:-1], generator=torch.Generator().manual_seed(int(s)))
            for s in seeds
        ]
    ).to(cdf.device)  # (B, ...)
    idx = torch.searchsorted(cdf, u.unsqueeze(-1) * cdf[..., -1:]).squeeze(-1)
    return idx.clamp_max(logits.shape[-1] - 1)


def sample_bernoulli(p: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One Bernoulli(p_b) draw per example with its own seed: ``(B,)`` bool."""
    u = torch.stack(
        [torch.rand((), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(p.device)
    return u < p.detach().float()


def check_logits(task: str, logits: torch.Tensor, expected: tuple, shape_text: str) -> None:
    """Raise a :class:`ConfigError` when the model's logits do not fit the task.

    A wrong ``task`` for the model (a sequence classifier analysed as a causal LM, or the
    reverse) otherwise surfaces as a shape error deep inside a loss function.

    Args:
        task: The task's name, for the message.
        logits: The model's ``.logits``.
        expected: Expected shape; ``None`` entries match any size.
        shape_text: The expected shape in words, e.g. ``"(batch, tokens, vocab)"``.
    """
    shape = tuple(logits.shape)
    if len(shape) == len(expected) and all(e is None or e == n for e, n in zip(expected, shape)):
        return
    hint = {
        "causal_lm": "a sequence classifier or reward model needs task='classification' or "
        "'reward' (CLI: --task)",
        "classification": "a causal LM (AutoModelForCausalLM) needs task='causal_lm'",
        "reward": "a reward model has one output per sequence (num_labels=1); a causal LM "
        "needs task='causal_lm'",
    }.get(task, "check that the task matches the model")
    want = "(" + ", ".join("any" if e is None else str(e) for e in expected) + ")"
    raise ConfigError(
        f"Task {task!r} expects model logits of shape {shape_text} = {want}, received "
        f"{shape}. The task does not fit this model: {hint}."
    )


#: transformers' key for its once-per-tokenizer "longer than the specified maximum sequence
#: length ... will result in indexing errors" warning.
LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


@contextlib.contextmanager
def quiet_length_warning(tokenizer, quiet: bool = True) -> Iterator[None]:
    """Within the block, ``tokenizer`` does not warn that a long text "will result in indexing
    errors" (when ``quiet``).

    With ``truncate=True`` (CLI ``--truncate``) an encoder tokenizes a long text whole and then
    cuts it to the model's context, so the warning is false; without it, an over-long record
    is refused by the task with a :class:`~influscope.errors.DataError`. The tokenizer's own
    flag is restored afterwards (tokenizers without it are left alone).
    """
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if not quiet or not isinstance(flags, dict):
        yield
        return
    before = flags.get(LENGTH_WARNING)
    flags[LENGTH_WARNING] = True  # transformers warns only while this is unset
    try:
        yield
    finally:
        if before is None:
            flags.pop(LENGTH_WARNING, None)
        else:
            flags[LENGTH_WARNING] = before
