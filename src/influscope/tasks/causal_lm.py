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
from influscope.tasks.chat import (
    check_chat_loss,
    check_chat_template,
    encode_chat,
    is_conversational,
)
from influscope.tasks.data import EncodedDataset, pad_stack, record_list, text_field


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

    Records: ``{"text"}``, ``{"prompt", "completion"}`` (strings), and the chat formats of
    :mod:`influscope.tasks.chat` (``{"messages"}``, prompt/completion message lists), encoded
    with the tokenizer's chat template. A prompt/completion record may add a ``contrast``
    (a string, or messages for a chat prompt): the measurement is then
    ``log p(completion | prompt) − log p(contrast | prompt)``, see :meth:`measurement`.

    Args:
        add_bos: Prepend the tokenizer's BOS token (when it has one) so that the first token of
            a ``text`` record is predicted too. Chat records take their special tokens, BOS
            included, from the chat template alone (so a BOS is never doubled).
        chat_loss: ``"assistant"`` (default): a ``messages`` record is trained on and measured
            over its assistant turns only; ``"all"``: over every token.
    """

    name = "causal_lm"
    auto_model = "AutoModelForCausalLM"

    def __init__(self, add_bos: bool = True, chat_loss: str = "assistant") -> None:
        self.add_bos = add_bos
        self.chat_loss = check_chat_loss(chat_loss)

    # --- encoding -----------------------------------------------------------------------
    def encode(
        self, records: list[dict], tokenizer, max_length: int | None = None, truncate: bool = False
    ) -> EncodedDataset:
        """Tokenize ``{"text"}``, ``{"prompt", "completion"[, "contrast"]}`` or chat records.

        With ``truncate``, an over-long ``text`` or ``messages`` record loses its end; a
        prompt/completion record loses the start of its prompt (after the BOS token), so that
        the completion — what the measurement scores — is kept. A contrast row is truncated
        on its own in the same way.

        When any record has a ``contrast``, every example gets a second row
        (``contrast_ids``, ``contrast_labels``); a record without one gets its own tokens
        with no label, which adds exactly 0 to its measurement.

        Raises:
            DataError: Empty input, a record with neither form, a completion with no tokens,
                a sequence longer than ``max_length`` (unless ``truncate``), a chat record
                without an assistant turn or for a tokenizer without a chat template, or a
                ``contrast`` on a record that has no prompt/completion.
        """
        records = record_list(records)
        if not records:
            raise DataError("Expected at least one record, received an empty list.")
        if any(is_conversational(r) for r in records):
            check_chat_template(tokenizer)  # before tokenizing anything
        contrastive = any("contrast" in r for r in records)
        examples = []
        for i, rec in enumerate(records):
            ids, labels = self._row(rec, i, tokenizer, "completion", max_length, truncate)
            ex = {
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
            }
            if contrastive:
                if "contrast" in rec:
                    if not ("prompt" in rec and "completion" in rec):
                        raise DataError(
                            f"Record {i + 1} has a 'contrast' but keys {sorted(rec)}; a contrastive "
                            "query needs 'prompt', 'completion' and 'contrast' (its measurement "
                            "is log p(completion | prompt) − log p(contrast | prompt)). Write "
                            "a conversation as 'prompt' (the turns before the reply, a message "
                            "list) and 'completion'."
                        )
                    c_ids, c_labels = self._row(rec, i, tokenizer, "contrast", max_length, truncate)
                else:  # no contrast: the same tokens, no label (log p = 0)
                    c_ids, c_labels = ids, [-100] * len(ids)
                ex["contrast_ids"] = torch.tensor(c_ids, dtype=torch.long)
                ex["contrast_labels"] = torch.tensor(c_labels, dtype=torch.long)
            examples.append(ex)
        return EncodedDataset(examples, [dict(r) for r in records])

    def _row(
        self, rec: dict, i: int, tokenizer, key: str, max_length: int | None, truncate: bool
    ) -> tuple[list[int], list[int]]:
        """Ids and labels of one row: the record with ``key`` as its completion."""
        bos = getattr(tokenizer, "bos_token_id", None) if self.add_bos else None
        prefix = [bos] if bos is not None else []
        droppable = None  # (first, stop) of the prompt tokens a truncation drops from the front
        if is_conversational(rec):
            if "prompt" in rec and key not in rec:
                raise DataError(
                    f"Record {i + 1} has a message-list 'prompt' but no {key!r}; expected a "
                    f"{key!r} (a string or a message list) beside it."
                )
            ids, labels, n_prompt = encode_chat(rec, i, tokenizer, self.chat_loss, key)
            if "prompt" in rec:
                droppable = (int(bool(ids) and ids[0] == bos), n_prompt)
        elif "prompt" in rec and key in rec:
            if isinstance(rec[key], (list, tuple, dict)):
                raise DataError(
                    f"Record {i + 1} field {key!r} is a {type(rec[key]).__name__} but its 'prompt' "
                    "is a string; give both as strings, or both as message lists "
                    "([{'role': ..., 'content': ...}])."
                )
            prompt = prefix + _ids(tokenizer, text_field(rec, i, "prompt"))
            completion = _ids(tokenizer, text_field(rec, i, key))
            ids = prompt + completion
            labels = [-100] * len(prompt) + completion
            droppable = (len(prefix), len(prompt))
        elif "text" in rec:
            ids = prefix + _ids(tokenizer, text_field(rec, i, "text"))
            labels = list(ids)
        else:
            raise DataError(
                f"Record {i + 1} has keys {sorted(rec)}; expected 'text', 'prompt' and "
                "'completion', or 'messages' (a list of {'role', 'content'} turns)."
            )
        if droppable is not None and all(lab == -100 for lab in labels):
            raise DataError(
                f"Record {i + 1} has a {key} with no tokens ({rec[key]!r:.60}). The measurement "
                f"log p({key} | prompt) needs at least one {key} token: give a non-empty {key}."
            )
        if max_length is not None and len(ids) > max_length:
            if not truncate:
                raise DataError(
                    f"Record {i + 1} has {len(ids)} tokens, longer than the model's context of "
                    f"{max_length}. Shorten or split it, or pass truncate=True "
                    "(CLI: --truncate)."
                )
            if droppable is not None:
                # Keep the completion (what is measured): drop the prompt's first tokens
                # after the BOS prefix; cut the completion only if it alone is too long.
                first, stop = droppable
                drop = max(0, min(len(ids) - max_length, stop - first))
                keep = list(range(first)) + list(range(first + drop, len(ids)))
                ids, labels = [ids[k] for k in keep], [labels[k] for k in keep]
            ids, labels = ids[:max_length], labels[:max_length]
        if sum(lab != -100 for lab in labels[1:]) == 0:
            raise DataError(
                f"Record {i + 1} has no token to predict after truncation/masking "
                f"({len(ids)} tokens). Give a longer text or a completion."
            )
        return ids, labels

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack examples; contrastive ones as ``2B`` rows ``[completions; contrasts]``.

        A contrastive batch also holds ``contrast``, a ``(B,)`` flag tensor that marks it
        (:meth:`batch_rows` reads its length).
        """
        if "contrast_ids" not in examples[0]:
            return super().collate(examples)
        rows = [e["input_ids"] for e in examples] + [e["contrast_ids"] for e in examples]
        labels = [e["labels"] for e in examples] + [e["contrast_labels"] for e in examples]
        length = max(int(r.shape[0]) for r in rows)
        return {
            "input_ids": pad_stack(rows, self.pad_values["input_ids"], length),  # (2B, T)
            "attention_mask": pad_stack([torch.ones_like(r) for r in rows], 0, length),
            "labels": pad_stack(labels, -100, length),  # (2B, T)
            "contrast": torch.ones(len(examples), dtype=torch.bool),  # (B,)
        }

    def batch_rows(self, batch: dict[str, torch.Tensor]) -> int:
        """2 for a contrastive batch (completion and contrast rows), else 1."""
        return 2 if "contrast" in batch else 1

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

        Raises:
            DataError: For a contrastive batch: a contrast defines a measurement, not a
                training loss (its rows would also enter the curvature's statistics).
        """
        if "contrast" in batch:
            raise DataError(
                "Records with a 'contrast' were used as training data. A contrast defines a "
                "query's measurement log p(completion | prompt) − log p(contrast | prompt), "
                "not a training loss: pass them as queries, or drop the 'contrast' field from "
                "the training records."
            )
        return self._row_losses(outputs, batch["labels"], sample_seeds)

    def _row_losses(
        self, outputs: torch.Tensor, labels: torch.Tensor, sample_seeds: torch.Tensor | None
    ) -> torch.Tensor:
        """``Σ_t m_t CE_t`` per model row, ``(R,)``."""
        logits = outputs[:, :-1]  # (R, T-1, V) predicts positions 1..T-1
        targets = labels[:, 1:].to(logits.device)  # (R, T-1)
        mask = targets != -100
        if sample_seeds is not None:
            sampled = sample_categorical(logits, sample_seeds)  # (R, T-1)
            targets = torch.where(mask, sampled, targets)
        ce = F.cross_entropy(
            loss_precision(logits.reshape(-1, logits.shape[-1])),
            targets.clamp_min(0).reshape(-1),
            reduction="none",
        ).view_as(targets)  # (R, T-1)
        return (ce * mask).sum(dim=1)

    def training_loss(self, model, batch, sample_seeds=None) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(model, batch), batch, sample_seeds)

    def measurement(self, model, batch) -> torch.Tensor:
        """``log p(completion | prompt)`` per example (``-L`` over the labelled tokens).

        For a contrastive batch (rows ``[completions; contrasts]``)

        .. math:: f = \\log p(\\text{completion} \\mid \\text{prompt})
                     - \\log p(\\text{contrast} \\mid \\text{prompt}),

        a difference of two row terms, so its gradient — and every per-layer or per-token
        decomposition of a score — is the completion's minus the contrast's.
        """
        logp = -self._row_losses(self.outputs(model, batch), batch["labels"], None)  # (R,)
        if "contrast" not in batch:
            return logp
        b = batch["contrast"].shape[0]
        return logp[:b] - logp[b:]  # (B,)

    def token_mask(self, batch):
        return batch["attention_mask"]
