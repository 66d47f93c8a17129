"""Tiny problems where exact curvature is computable: for tests, benchmarks and docs.

:func:`mlp_problem` trains a tanh MLP classifier with weight decay on noisy teacher labels (one
"token" per example), in float64, and returns it with training and query sets. The task,
:class:`VectorClassificationTask`, is also the reference example of a user-defined task: two
required methods (``training_loss``, ``measurement``) plus the optional output split used by the
exact Gauss-Newton oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from influscope.tasks import EncodedDataset, Task, sample_categorical


class MLP(nn.Module):
    """``x → l3(tanh(l2(tanh(l1(x)))))``."""

    def __init__(self, d: int = 4, h: int = 16, c: int = 4) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


class VectorClassificationTask(Task):
    """Feature vectors ``x`` with class labels ``y``; margin measurement."""

    name = "vector_classification"

    def outputs(self, model, batch):
        return model(batch["x"])

    def loss_from_outputs(self, outputs, batch, sample_seeds=None):
        y = batch["y"] if sample_seeds is None else sample_categorical(outputs, sample_seeds)
        return F.cross_entropy(outputs, y, reduction="none")

    def training_loss(self, model, batch, sample_seeds=None):
        return self.loss_from_outputs(self.outputs(model, batch), batch, sample_seeds)

    def measurement(self, model, batch):
        logits, y = self.outputs(model, batch), batch["y"]
        others = logits.scatter(1, y[:, None], float("-inf"))
        return logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(others, 1)

    def token_mask(self, batch):
        return None


def mlp_problem(
    n: int = 512,
    d: int = 4,
    h: int = 16,
    n_queries: int = 8,
    weight_decay: float = 2.0,
    steps: int = 400,
    seed: int = 0,
) -> tuple[MLP, EncodedDataset, EncodedDataset]:
    """Train an MLP (AdamW, weight decay) on noisy labels; return ``(model, train, queries)``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    teacher = torch.randn(d, 4, generator=g, dtype=torch.float64)
    y = (x @ teacher + 2.0 * torch.randn(n, 4, generator=g, dtype=torch.float64)).argmax(1)
    model = MLP(d, h).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    train = EncodedDataset([{"x": x[i], "y": y[i]} for i in range(n)])
    xq = torch.randn(n_queries, d, generator=g, dtype=torch.float64)
    queries = EncodedDataset(
        [{"x": xq[i], "y": (xq[i] @ teacher).argmax()} for i in range(n_queries)]
    )
    return model, train, queries
