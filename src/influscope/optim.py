"""The optimiser the bundled training loops share (demo LM, reward model).

AdamW with decoupled weight decay on weight matrices only (not on biases and LayerNorm gains),
``β = (0.9, 0.98)``, and a learning-rate factor with linear warm-up and cosine decay:

.. math:: η(t)/η = \\begin{cases} (t + 1)/w & t < w \\\\
          f + (1 - f)\\, \\tfrac12 \\big(1 + \\cos(π (t - w) / \\max(1, T - w))\\big) & t ≥ w
          \\end{cases}

with ``w`` warm-up steps, ``T`` total steps and floor ``f``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def cosine_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """The learning-rate factor ``η(t)/η`` above."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decoupled_adamw(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW with weight decay on ``ndim ≥ 2`` tensors only, ``β = (0.9, 0.98)``."""
    params = list(params)
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )


def adamw_cosine(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    total: int,
    warmup: int,
    floor: float,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """:func:`decoupled_adamw` and its warm-up + cosine scheduler (:func:`cosine_factor`)."""
    optimizer = decoupled_adamw(params, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total, warmup, floor)
    )
    return optimizer, scheduler
