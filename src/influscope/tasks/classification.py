"""Sequence classification: cross-entropy training loss, margin measurement.

Measurement: the margin ``f = z_y - \\log \\sum_{c \\ne y} e^{z_c}`` of the labelled class
(Grosse et al.'s and Kronfluence's choice for classifiers); training loss ``-\\log p(y | x)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from influscope.errors import DataError
from influscope.tasks.base import Task, check_logits, loss_precision, sample_categorical
from influscope.tasks.data import EncodedDataset, record_list, text_field


class ClassificationTask(Task):
    """Single-label sequence classification (e.g. ``AutoModelForSequenceClassification``)."""

    name = "classification"

    def encode(
        self, records: list[dict], tokenizer, max_length: int | None = None, truncate: bool = False
    ) -> EncodedDataset:
        """Tokenize ``{"text", "label"}`` records (with the tokenizer's special tokens)."""
        records = record_list(records)
        if not records:
            raise DataError("Expected at least one record, received an empty list.")
        examples = []
        for i, rec in enumerate(records):
            if "text" not in rec or "label" not in rec:
                raise DataError(
                    f"Record {i + 1} has keys {sorted(rec)}; expected 'text' and 'label'."
                )
            ids = list(tokenizer(text_field(rec, i, "text"))["input_ids"])
            if max_length is not None and len(ids) > max_length:
                if not truncate:
                    raise DataError(
                        f"Record {i + 1} has {len(ids)} tokens, longer than the model's context of "
                        f"{max_length}. Shorten it or pass truncate=True."
                    )
                ids = ids[:max_length]
            examples.append(
                {
                    "input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.ones(len(ids), dtype=torch.long),
                    "labels": torch.tensor(int(rec["label"]), dtype=torch.long),
                }
            )
        return EncodedDataset(examples, [dict(r) for r in records])

    def outputs(self, model: nn.Module, batch) -> torch.Tensor:
        """Class logits ``(B, C)``."""
        ids = batch["input_ids"]  # (B, T)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        check_logits(self.name, logits, (ids.shape[0], None), "(batch, classes)")
        return logits

    def loss_from_outputs(self, outputs, batch, sample_seeds=None) -> torch.Tensor:
        """``-log p(y | x)`` per example, ``(B,)`` (float32 for half logits, else their dtype)."""
        targets = batch["labels"].to(outputs.device)
        if sample_seeds is not None:
            targets = sample_categorical(outputs, sample_seeds)
        return F.cross_entropy(loss_precision(outputs), targets, reduction="none")

    def training_loss(self, model, batch, sample_seeds=None) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(model, batch), batch, sample_seeds)

    def measurement(self, model, batch) -> torch.Tensor:
        logits = loss_precision(self.outputs(model, batch))  # (B, C)
        y = batch["labels"].to(logits.device)
        correct = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        return correct - torch.logsumexp(others, dim=1)
