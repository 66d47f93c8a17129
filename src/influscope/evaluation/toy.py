"""A small network where every ground truth is computable in seconds.

Used by the CI floors (``tests/test_evaluation*.py``) and by ``benchmarks/accuracy_exact.py``:

* :class:`TabularMLP` — a tanh MLP classifier ``d → h → h → c``;
* :class:`VectorClassificationTask` — a user-defined :class:`~influscope.tasks.Task`
  (cross-entropy loss, margin measurement ``z_y - log Σ_{c≠y} e^{z_c}``);
* :func:`make_classification` — Gaussian features labelled by a noisy linear teacher;
* :func:`train_mlp` — deterministic full-batch AdamW; a plain ``(subset, seed) → model`` recipe
  for :class:`~influscope.evaluation.RetrainingHarness`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from influscope.errors import ConfigError
from influscope.tasks import EncodedDataset
from influscope.toy import MLP, VectorClassificationTask

__all__ = ["TabularMLP", "ToyData", "VectorClassificationTask", "make_classification", "train_mlp"]

#: The MLP and task are shared with the exact-oracle tests (:mod:`influscope.toy`).
TabularMLP = MLP


@dataclass
class ToyData:
    """Features and labels of a toy classification problem.

    Attributes:
        x: ``(N, d)`` training features; ``y``: ``(N,)`` labels.
        xq: ``(Q, d)`` query features; ``yq``: ``(Q,)`` their teacher labels.
    """

    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor

    def train(self) -> EncodedDataset:
        return EncodedDataset([{"x": self.x[i], "y": self.y[i]} for i in range(len(self.y))])

    def queries(self) -> EncodedDataset:
        return EncodedDataset([{"x": self.xq[i], "y": self.yq[i]} for i in range(len(self.yq))])


def make_classification(
    n: int = 256, n_queries: int = 8, d: int = 4, c: int = 4, noise: float = 2.0, seed: int = 0
) -> ToyData:
    """Gaussian features, labels ``argmax(x W + noise·ε)`` of a random linear teacher (float64)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d, c, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x @ teacher + noise * torch.randn(n, c, generator=g, dtype=torch.float64)).argmax(1)
    xq = torch.randn(n_queries, d, generator=g, dtype=torch.float64)
    return ToyData(x, y, xq, (xq @ teacher).argmax(1))


def train_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    subset: Sequence[int] | None = None,
    seed: int = 0,
    *,
    hidden: int = 16,
    steps: int = 400,
    lr: float = 1e-2,
    weight_decay: float = 2.0,
) -> TabularMLP:
    """Full-batch AdamW on the mean cross-entropy of ``subset`` (deterministic given ``seed``).

    Raises:
        ConfigError: Non-positive ``steps`` or ``lr``.
    """
    if steps < 1 or lr <= 0:
        raise ConfigError(f"steps and lr must be positive, received {steps}, {lr}.")
    idx = torch.as_tensor(list(subset) if subset is not None else range(len(y)))
    xs, ys = x[idx], y[idx]  # (n, d), (n,)
    torch.manual_seed(seed)
    model = TabularMLP(x.shape[1], hidden, int(y.max()) + 1).to(x.dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
