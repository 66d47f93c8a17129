"""Reward models on preference pairs (Bradley–Terry).

A pair ``z = (prompt, chosen, rejected)`` with rewards ``r_c, r_r`` (a scalar head, e.g.
``AutoModelForSequenceClassification`` with ``num_labels=1``):

* training loss ``L = -\\log σ(r_c - r_r)``; the true Fisher samples which response is
  preferred from ``Bernoulli(σ(r_c - r_r))``;
* measurement ``f = r_c - r_r`` (the reward margin).

Chosen and rejected responses run as one stacked batch ``[chosen; rejected]`` of ``2B`` rows
(``rows_per_example = 2``), so a pair's gradient is the sum over both responses' tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from influscope.errors import DataError
from influscope.tasks.base import Task, check_logits, loss_precision, sample_bernoulli
from influscope.tasks.data import EncodedDataset, pad_stack, record_list, text_field


class RewardTask(Task):
    """Bradley–Terry reward modelling on ``{"prompt", "chosen", "rejected"}`` records."""

    name = "reward"
    rows_per_example = 2

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def encode(
        self, records: list[dict], tokenizer, max_length: int | None = None, truncate: bool = False
    ) -> EncodedDataset:
        records = record_list(records)
        if not records:
            raise DataError("Expected at least one record, received an empty list.")
        examples = []
        for i, rec in enumerate(records):
            if "chosen" not in rec or "rejected" not in rec:
                raise DataError(
                    f"Record {i + 1} has keys {sorted(rec)}; expected 'chosen' and 'rejected' "
                    "(and optionally 'prompt')."
                )
            ex = {}
            for side in ("chosen", "rejected"):
                prompt = text_field(rec, i, "prompt") if "prompt" in rec else ""
                ids = list(tokenizer(prompt + text_field(rec, i, side))["input_ids"])
                if max_length is not None and len(ids) > max_length:
                    if not truncate:
                        raise DataError(
                            f"Record {i + 1} ({side}) has {len(ids)} tokens, longer than the "
                            f"model's context of {max_length}. Shorten it or pass truncate=True."
                        )
                    ids = ids[:max_length]
                ex[f"{side}_ids"] = torch.tensor(ids, dtype=torch.long)
            examples.append(ex)
        return EncodedDataset(examples, [dict(r) for r in records])

    def collate(self, examples):
        length = max(max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
        rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        ids = pad_stack(rows, self.pad_token_id, length)  # (2B, T)
        mask = pad_stack([torch.ones_like(r) for r in rows], 0, length)  # (2B, T)
        return {"input_ids": ids, "attention_mask": mask}

    def outputs(self, model: nn.Module, batch) -> torch.Tensor:
        """Reward margins ``r_c - r_r``, shape ``(B,)``."""
        ids = batch["input_ids"]  # (2B, T)
        r = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        check_logits(self.name, r, (ids.shape[0], None), "(2 × batch, 1)")
        r = loss_precision(r[:, 0])  # (2B,) float32 for half heads, else their dtype
        b = r.shape[0] // 2
        return r[:b] - r[b:]

    def loss_from_outputs(self, outputs, batch, sample_seeds=None) -> torch.Tensor:
        margin = outputs
        if sample_seeds is not None:
            prefer_chosen = sample_bernoulli(torch.sigmoid(margin), sample_seeds)
            margin = torch.where(prefer_chosen, margin, -margin)
        return -F.logsigmoid(margin)

    def training_loss(self, model, batch, sample_seeds=None) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(model, batch), batch, sample_seeds)

    def measurement(self, model, batch) -> torch.Tensor:
        return self.outputs(model, batch)
