"""Small float64 recipes for the validation-bank tests (no language model needed).

* :class:`RegressionRecipe`: a real fine-tune — full-batch gradient descent on the weighted
  squared error ``Σ_i w_i (x_iᵀθ − y_i)² / N`` from a fixed start; the measurement is the query
  predictions ``X_q θ``. Deterministic, float64; ``steps = 0`` returns the start whatever the
  weights.
* :class:`PlantedRecipe`: a "fine-tune" whose measurement is the known linear function
  ``f(w) = A w`` of the weights, so the exact attribution is ``τ = A`` (up to the scale ``1/N``).
"""

from __future__ import annotations

import torch
from torch import nn


class Held(nn.Module):
    """A trained "model": a parameter vector θ."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta)


def measure(model: nn.Module) -> torch.Tensor:
    """The measurement every toy recipe's model carries (``model.f``, or ``X_q θ``)."""
    return model.f() if hasattr(model, "f") else model.theta


class RegressionRecipe:
    """Weighted least squares by gradient descent (see the module docstring)."""

    def __init__(self, n: int = 20, d: int = 3, q: int = 4, steps: int = 30, lr: float = 0.3):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d, generator=g, dtype=torch.float64)  # (N, d)
        self.y = self.x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
            n, generator=g, dtype=torch.float64
        )  # (N,)
        self.xq = torch.randn(q, d, generator=g, dtype=torch.float64)  # (Q, d)
        self.steps, self.lr, self.calls = steps, lr, 0

    def __call__(self, weights: torch.Tensor) -> nn.Module:
        self.calls += 1
        theta = torch.zeros(self.x.shape[1], dtype=torch.float64)  # (d,)
        n = self.x.shape[0]
        for _ in range(self.steps):
            r = self.x @ theta - self.y  # (N,)
            theta = theta - self.lr * (2 * (weights * r) @ self.x / n)  # (d,)
        model = Held(theta)
        xq = self.xq
        model.f = lambda: xq @ model.theta  # (Q,)
        return model

    def gradients(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example loss gradients ``(N, d)`` and query gradients ``(Q, d)`` at θ."""
        r = self.x @ theta - self.y  # (N,)
        return 2 * r[:, None] * self.x, self.xq


class PlantedRecipe:
    """``f(w) = A w`` exactly: the measurement is linear in the weights."""

    def __init__(self, n: int = 30, q: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(q, n, generator=g, dtype=torch.float64)  # (Q, N)
        self.calls = 0

    def __call__(self, weights: torch.Tensor) -> nn.Module:
        self.calls += 1
        return Held(self.a @ weights.double())  # (Q,)


FINGERPRINTS = {"model": "m0", "data": "d0", "queries": "q0", "recipe": "r0"}
