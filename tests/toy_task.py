"""A task written the way docs/design.md ("How to add a task") says: one file.

Training loss and encoding are the causal LM's; the measurement is the log-probability of each
sequence's last token only. Registering it is one line: ``TASKS["last_token_lm"] = LastTokenTask``.
"""

from __future__ import annotations

import torch
from torch import nn

from influscope.tasks import CausalLMTask


class LastTokenTask(CausalLMTask):
    """``f(x) = log p(x_T | x_<T)``: influence on the last token of each sequence."""

    name = "last_token_lm"

    def measurement(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.outputs(model, batch)  # (B, T, V)
        last = batch["attention_mask"].sum(dim=1) - 1  # (B,) position of the last token
        rows = torch.arange(len(last), device=last.device)
        logp = logits[rows, last - 1].log_softmax(dim=-1)  # (B, V): predicts position `last`
        return logp[rows, batch["input_ids"][rows, last]]  # (B,)
