"""Fitting-error corrections of influence scores: DDA (debias, denoise) and RelatIF.

Wu, Pang, Shen & Cheng, *Enhancing Training Data Attribution for Large Language Models with
Fitting Error Consideration* (EMNLP 2024, arXiv 2410.01285), argue that influence functions
assume a model at the minimum of its empirical risk, which a fine-tuned LLM is not, and correct
the scores in two ways (the method section; we could read only the abstract and the authors'
README, not the section's equations — see below):

* **debias** — the fine-tuned model θ_ft inherits knowledge ("bias") from its base model θ_0
  that the fine-tuning data did not teach it. The influence the base model already assigns to a
  training sequence is subtracted::

      I_debias(z, q) = I_{θ_ft}(z, q) − I_{θ_0}(z, q)

  where each term is an influence computed on its own model with its own curvature
  (``(G_θ + λI)^{-1}`` fitted at θ).
* **denoise** — the degree to which each training sequence is fitted varies during training,
  which makes single-checkpoint scores noisy; the scores are smoothed over the checkpoints
  θ_1, …, θ_K saved during fine-tuning (one per epoch in the paper's released pipeline)::

      I_denoise(z, q) = Σ_k w_k I_{θ_k}(z, q),   Σ_k w_k = 1 (uniform by default)

* **DDA** — both: ``I_DDA(z, q) = Σ_k w_k (I_{θ_k}(z, q) − I_{θ_0}(z, q))``.

What could not be recovered from the sources available to us (the abstract and the authors'
README, not the paper's equations) is the exact weighting of the checkpoints; we use the
uniform mean, and offer ``"standardized"`` smoothing (each checkpoint's scores of a query are
z-scored over the training set before averaging, so late checkpoints with small gradients are not
drowned out by early ones). See ``docs/applications_dda.md``.

**RelatIF** (Barshan et al., AISTATS 2020): ``I(z, q) / sqrt(I_self(z))`` with the self-influence
``I_self(z) = ∇L(z)^⊤ (G + λI)^{-1} ∇L(z)`` — suppresses sequences whose influence on everything is
large because their gradient is large.

All functions take and return ``(Q, N)`` score matrices (queries × training sequences) with
influscope's sign convention (positive = up-weighting ``z`` raises the query's measurement).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from influscope.errors import ConfigError, DataError

SMOOTHINGS: tuple[str, ...] = ("mean", "standardized")


def _shape_check(name: str, value: torch.Tensor, shape: torch.Size) -> None:
    if value.shape != shape:
        raise DataError(
            f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)} (queries × training "
            "sequences, the same for every model). Score every model on the same queries and "
            "training data."
        )


def debias(finetuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``I_{θ_ft} − I_{θ_0}``: remove the influence the base model already assigns.

    Args:
        finetuned: ``(Q, N)`` scores of the fine-tuned model.
        base: ``(Q, N)`` scores of the base model (same queries and training sequences).
    """
    _shape_check("base scores", base, finetuned.shape)
    return finetuned.double() - base.double().to(finetuned.device)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Z-score each query's row over the training sequences: ``(s − mean) / std``.

    A constant row becomes zeros (its standard deviation is clamped to a tiny positive value).
    """
    s = scores.double()  # (Q, N)
    mean = s.mean(dim=-1, keepdim=True)  # (Q, 1)
    std = s.std(dim=-1, keepdim=True, correction=0).clamp_min(1e-300)  # (Q, 1)
    return (s - mean) / std


def denoise(
    checkpoint_scores: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    smoothing: str = "mean",
) -> torch.Tensor:
    """Smooth scores over training checkpoints: ``Σ_k w_k S_k`` (``w`` normalised to sum to 1).

    Args:
        checkpoint_scores: ``K`` score matrices ``(Q, N)``, one per checkpoint.
        weights: ``K`` non-negative weights (default uniform).
        smoothing: ``"mean"`` (weighted mean of the raw scores) or ``"standardized"`` (weighted
            mean of :func:`standardize`-d scores).

    Raises:
        DataError: No checkpoints, or matrices of different shapes.
        ConfigError: Unknown smoothing, or weights of the wrong length / sign / sum.
    """
    if not checkpoint_scores:
        raise DataError("denoise needs the scores of at least one checkpoint, received none.")
    if smoothing not in SMOOTHINGS:
        raise ConfigError(f"Unknown smoothing {smoothing!r}. Supported: {SMOOTHINGS}.")
    w = _weights(weights, len(checkpoint_scores))
    shape = checkpoint_scores[0].shape
    total = torch.zeros(shape, dtype=torch.float64, device=checkpoint_scores[0].device)
    for k, s in enumerate(checkpoint_scores):
        _shape_check(f"checkpoint {k} scores", s, shape)
        s = s.double().to(total.device)
        total += w[k] * (standardize(s) if smoothing == "standardized" else s)
    return total


def _weights(weights: Sequence[float] | None, k: int) -> list[float]:
    if weights is None:
        return [1.0 / k] * k
    w = [float(x) for x in weights]
    if len(w) != k or any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(
            f"checkpoint weights must be {k} non-negative numbers with a positive sum (one per "
            f"checkpoint), received {weights!r}."
        )
    return [x / sum(w) for x in w]


def dda(
    checkpoint_scores: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float] | None = None,
    smoothing: str = "mean",
) -> torch.Tensor:
    """Debias every checkpoint's scores, then smooth: ``Σ_k w_k (S_k − S_base)``."""
    return denoise([debias(s, base) for s in checkpoint_scores], weights, smoothing)


def relatif(scores: torch.Tensor, self_influence: torch.Tensor) -> torch.Tensor:
    """``I(z, q) / sqrt(I_self(z))`` (Barshan et al. 2020); ``self_influence`` is ``(N,)``."""
    if self_influence.shape != scores.shape[-1:]:
        raise DataError(
            f"self-influence has shape {tuple(self_influence.shape)}, expected "
            f"({scores.shape[-1]},): one value per training sequence."
        )
    return scores.double() / self_influence.double().clamp_min(1e-30).sqrt().to(scores.device)


@dataclass
class CorrectionInputs:
    """The score matrices a correction combines (all ``(Q, N)``, same queries and data).

    Attributes:
        finetuned: Scores of the final (fine-tuned) model.
        checkpoints: Scores of the checkpoints to smooth over (the final model included, when
            it should count; :func:`~influscope.corrections.run.run_corrections` adds it last).
        base: Scores of the base model before fine-tuning, or ``None``.
        self_influence: ``(N,)`` self-influence under the final model, or ``None``.
        weights: Checkpoint weights (``None``: uniform).
        smoothing: ``"mean"`` or ``"standardized"``.
    """

    finetuned: torch.Tensor
    checkpoints: list[torch.Tensor] = field(default_factory=list)
    base: torch.Tensor | None = None
    self_influence: torch.Tensor | None = None
    weights: Sequence[float] | None = None
    smoothing: str = "mean"

    def need(self, what: str, variant: str) -> None:
        missing = {
            "base": self.base is None,
            "checkpoints": len(self.checkpoints) < 2,
            "self_influence": self.self_influence is None,
        }[what]
        if missing:
            hint = {
                "base": "a base model (the model before fine-tuning): --base-model / base_model=",
                "checkpoints": "at least one intermediate checkpoint besides the final model: "
                "--checkpoints / checkpoints=",
                "self_influence": "self-influence of the training sequences",
            }[what]
            raise ConfigError(f"Correction {variant!r} needs {hint}.")


def _plain(x: CorrectionInputs) -> torch.Tensor:
    return x.finetuned.double()


def _debias(x: CorrectionInputs) -> torch.Tensor:
    x.need("base", "debias")
    return debias(x.finetuned, x.base)


def _denoise(x: CorrectionInputs) -> torch.Tensor:
    x.need("checkpoints", "denoise")
    return denoise(x.checkpoints, x.weights, x.smoothing)


def _dda(x: CorrectionInputs) -> torch.Tensor:
    x.need("base", "dda")
    x.need("checkpoints", "dda")
    return dda(x.checkpoints, x.base, x.weights, x.smoothing)


def _relatif(x: CorrectionInputs) -> torch.Tensor:
    x.need("self_influence", "relatif")
    return relatif(x.finetuned, x.self_influence)


#: Correction variants: name → function of :class:`CorrectionInputs` returning ``(Q, N)``.
CORRECTIONS: dict[str, Callable[[CorrectionInputs], torch.Tensor]] = {
    "plain": _plain,
    "debias": _debias,
    "denoise": _denoise,
    "dda": _dda,
    "relatif": _relatif,
}

#: What each variant needs besides the fine-tuned model's scores.
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "debias": ("base",),
    "denoise": ("checkpoints",),
    "dda": ("base", "checkpoints"),
    "relatif": ("self_influence",),
}
