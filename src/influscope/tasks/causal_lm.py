"""Causal language modelling.

Training loss of a sequence ``z = (x_1 … x_T)`` with loss mask ``m_t`` (1 on tokens that are
predicted: all tokens of a ``text`` record, the completion tokens of a prompt/completion record):

.. math:: L(z, θ) = -\\sum_{t} m_t \\log p_θ(x_t \\mid x_{<t})

Measurement of a query (prompt, completion): ``f(θ) = log p_θ(completion | prompt)``, the sum
of the completion tokens' log-probabilities. ``f = -L`` on the query itself, so a training
sequence identical to the query has positive influence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from influscope.errors import DataError
from influscope.tasks.base import Task, check_logits, loss_precision, sample_categorical
from influscope.tasks.data import EncodedDataset, record_list, text_field


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model`` accepts, read from its config (``None`` if unknown)."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class CausalLMTask(Task):
    """Next-token prediction with summed cross-entropy; measurement ``log p(completion|prompt)``.

    Args:
        add_bos: Prepend the tokenizer's BOS token (when it has one) so that the first token of
            a ``text`` record is predicted too.
    """

    name = "causal_lm"
    auto_model = "AutoModelForCausalLM"

    def __init__(self, add_bos: bool = True) -> None:
        self.add_bos = add_bos

    # --- encoding -----------------------------------------------------------------------
    def encode(
        self, records: list[dict], tokenizer, max_length: int | None = None, truncate: bool = False
    ) -> EncodedDataset:
        """Tokenize ``{"text"}`` or ``{"prompt", "completion"}`` records.

        With ``truncate``, an over-long ``text`` loses its end; a prompt/completion record
        loses the start of its prompt (after the BOS token), so that the completion — what
        the measurement scores — is kept.

        Raises:
            DataError: Empty input, a record with neither form, a completion with no tokens,
                or a sequence longer than ``max_length`` (unless ``truncate``).
        """
        records = record_list(records)
        if not records:
            raise DataError("Expected at least one record, received an empty list.")
        bos = getattr(tokenizer, "bos_token_id", None) if self.add_bos else None
        examples = []
        for i, rec in enumerate(records):
            prefix = [bos] if bos is not None else []
            if "prompt" in rec and "completion" in rec:
                prompt = prefix + _ids(tokenizer, text_field(rec, i, "prompt"))
                completion = _ids(tokenizer, text_field(rec, i, "completion"))
                if not completion:
                    raise DataError(
                        f"Record {i + 1} has a completion with no tokens ({rec['completion']!r}). "
                        "The measurement log p(completion | prompt) needs at least one "
                        "completion token: give a non-empty completion."
                    )
                ids = prompt + completion
                labels = [-100] * len(prompt) + completion
            elif "text" in rec:
                ids = prefix + _ids(tokenizer, text_field(rec, i, "text"))
                labels = list(ids)
            else:
                raise DataError(
                    f"Record {i + 1} has keys {sorted(rec)}; expected 'text', or 'prompt' and "
                    "'completion'."
                )
            if max_length is not None and len(ids) > max_length:
                if not truncate:
                    raise DataError(
                        f"Record {i + 1} has {len(ids)} tokens, longer than the model's context of "
                        f"{max_length}. Shorten or split it, or pass truncate=True "
                        "(CLI: --truncate)."
                    )
                if "prompt" in rec and "completion" in rec:
                    # Keep the completion (what is measured): drop the prompt's first tokens
                    # after the BOS prefix; cut the completion only if it alone is too long.
                    drop = min(len(ids) - max_length, len(prompt) - len(prefix))
                    keep = list(range(len(prefix))) + list(range(len(prefix) + drop, len(ids)))
                    ids, labels = [ids[k] for k in keep], [labels[k] for k in keep]
                ids, labels = ids[:max_length], labels[:max_length]
            if sum(lab != -100 for lab in labels[1:]) == 0:
                raise DataError(
                    f"Record {i + 1} has no token to predict after truncation/masking "
                    f"({len(ids)} tokens). Give a longer text or a completion."
                )
            examples.append(
                {
                    "input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.ones(len(ids), dtype=torch.long),
                    "labels": torch.tensor(labels, dtype=torch.long),
                }
            )
        return EncodedDataset(examples, [dict(r) for r in records])

    # --- objective ----------------------------------------------------------------------
    def outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits ``(B, T, V)``."""
        ids = batch["input_ids"]  # (B, T)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        check_logits(self.name, logits, (*ids.shape, None), "(batch, tokens, vocab)")
        return logits

    def loss_from_outputs(
        self,
        outputs: torch.Tensor,
        batch: dict[str, torch.Tensor],
        sample_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Summed token cross-entropy per example, ``(B,)``.

        Computed in float32 for half-precision logits and in the logits' own dtype otherwise
        (:func:`~influscope.tasks.base.loss_precision`): float64 stays float64.
        """
        logits = outputs[:, :-1]  # (B, T-1, V) predicts positions 1..T-1
        targets = batch["labels"][:, 1:].to(logits.device)  # (B, T-1)
        mask = targets != -100
        if sample_seeds is not None:
            sampled = sample_categorical(logits, sample_seeds)  # (B, T-1)
            targets = torch.where(mask, sampled, targets)
        ce = F.cross_entropy(
            loss_precision(logits.reshape(-1, logits.shape[-1])),
            targets.clamp_min(0).reshape(-1),
            reduction="none",
        ).view_as(targets)  # (B, T-1)
        return (ce * mask).sum(dim=1)

    def training_loss(self, model, batch, sample_seeds=None) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(model, batch), batch, sample_seeds)

    def measurement(self, model, batch) -> torch.Tensor:
        """``log p(completion | prompt)`` per example (``-L`` over the labelled tokens)."""
        return -self.loss_from_outputs(self.outputs(model, batch), batch)

    def token_mask(self, batch):
        return batch["attention_mask"]
