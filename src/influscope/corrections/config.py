"""Settings of :func:`~influscope.corrections.run.run_corrections`."""

from __future__ import annotations

from dataclasses import dataclass

from influscope.config import Settings
from influscope.corrections.dda import CORRECTIONS, SMOOTHINGS
from influscope.errors import ConfigError


@dataclass(frozen=True)
class CorrectionConfig(Settings):
    """Which corrected scores to compute and how checkpoints are smoothed.

    Attributes:
        variants: Names in :data:`~influscope.corrections.CORRECTIONS` (``plain``, ``debias``,
            ``denoise``, ``dda``, ``relatif``); the inputs they need decide which models are
            scored (``debias``/``dda`` need a base model, ``denoise``/``dda`` checkpoints).
        smoothing: ``"mean"`` (uniform or weighted mean of the checkpoints' scores — the closest
            well-defined reading of the paper's denoise step) or ``"standardized"`` (mean of
            per-query z-scored scores).
        weights: One non-negative weight per smoothed model, in the order checkpoints…, final
            model; ``None`` = uniform.
    """

    variants: tuple[str, ...] = ("plain", "debias", "denoise", "dda", "relatif")
    smoothing: str = "mean"
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.variants:
            raise ConfigError(f"variants must name at least one of {sorted(CORRECTIONS)}.")
        unknown = [v for v in self.variants if v not in CORRECTIONS]
        if unknown:
            raise ConfigError(
                f"Unknown correction variant(s) {unknown}. Supported: {sorted(CORRECTIONS)}."
            )
        if self.smoothing not in SMOOTHINGS:
            raise ConfigError(
                f"smoothing must be one of {SMOOTHINGS}, received {self.smoothing!r}."
            )
        if self.weights is not None and (
            any(w < 0 for w in self.weights) or sum(self.weights) <= 0
        ):
            raise ConfigError(
                f"weights must be non-negative with a positive sum, received {self.weights}."
            )
