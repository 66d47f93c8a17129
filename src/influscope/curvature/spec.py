"""What the pipeline needs to know about one curvature approximation: a :class:`CurvatureSpec`.

Each approximation lives in one file that defines its operator, its fitter and a ``SPEC``;
:mod:`influscope.curvature.registry` lists the specs. Nothing outside that file branches on
the approximation's name: the fit runner asks the spec whether the fitter replays passes,
:func:`influscope.resources.estimate` asks it for the memory of its fit, and
:class:`~influscope.config.FitConfig` asks it to validate the settings it depends on.

A spec's own knobs are an ``options`` dataclass (a :class:`~influscope.config.Settings`),
given as ``FitConfig(curvature=name, options={...})`` and read back by the fitter with
:meth:`CurvatureSpec.options_of`. They are fingerprinted with the factors.

This module imports no shared config (``FitConfig`` only for type checking), so
``influscope.config`` can import the registry to validate ``curvature=`` on creation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from influscope.curvature.base import CurvatureOperator
from influscope.errors import ConfigError

if TYPE_CHECKING:
    from influscope.config import FitConfig
    from influscope.curvature.statistics import Passes
    from influscope.modules.selection import TrackedLayer

#: ``fitter(passes, layers, config) -> operator``.
Fitter = Callable[["Passes", list["TrackedLayer"], "FitConfig"], CurvatureOperator]


@dataclass(frozen=True)
class FitFootprint:
    """What a memory estimate of a fit may depend on (bytes are 4-byte floats unless stated).

    Attributes:
        dims: ``(in_ℓ, out_ℓ)`` of every tracked layer (bias column included in ``in_ℓ``).
        n_fit: Sequences the curvature is fitted on.
        batch_size: Sequences per forward/backward pass.
        pass_bytes: Memory of one pass: parameters, activations kept for backward and the
            captured ``ā, s`` of a batch.
        resident: Memory held between batches (runtime, parameters, data); ``0`` when only
            ``pass_bytes`` is known.
        cache_bytes: The replay cache a replaying fit keeps (captures of the first pass, up to
            ``FitConfig.cache_mb`` and what the memory budget leaves).
        shards: Shards of the statistics passes: with one, a shard's sums *are* the total;
            with more, the running total and the shard being summed are both held.
    """

    dims: Sequence[tuple[int, int]]
    n_fit: int
    batch_size: int
    pass_bytes: float
    resident: float = 0.0
    cache_bytes: float = 0.0
    shards: int = 1

    @property
    def params(self) -> int:
        """``Σ_ℓ in_ℓ out_ℓ``, the tracked parameters."""
        return sum(i * o for i, o in self.dims)

    @property
    def widest(self) -> int:
        """``max_ℓ max(in_ℓ, out_ℓ)``, the largest factor's width."""
        return max((max(i, o) for i, o in self.dims), default=0)

    @property
    def kronecker(self) -> int:
        """``Σ_ℓ (in_ℓ² + out_ℓ²)``, the size of the Kronecker factors."""
        return sum(i * i + o * o for i, o in self.dims)


#: One row of an estimate: ``(stage, memory bytes, disk bytes, note)``.
EstimateRow = tuple[str, float, float, str]


def one_pass_estimate(f: FitFootprint) -> list[EstimateRow]:
    """A fit that keeps one float64 number per tracked parameter (e.g. a diagonal)."""
    return [
        (
            "fit: statistics",
            f.pass_bytes + (8 + 4 * f.batch_size) * f.params,
            8 * f.params,
            "factors on disk",
        )
    ]


def no_fit_estimate(f: FitFootprint) -> list[EstimateRow]:
    """Nothing is fitted (the identity)."""
    return []


@dataclass(frozen=True)
class CurvatureSpec:
    """One curvature approximation, as the pipeline sees it.

    Attributes:
        name: The registry key (``FitConfig.curvature``, CLI ``--curvature``).
        operator: The :class:`CurvatureOperator` class (``from_tensors`` loads a stored fit).
        fit: ``fit(passes, layers, config) -> operator``.
        replays: The fitter makes a second pass over the same objective, which the runner
            replays from memory up to ``FitConfig.cache_mb`` (EK-FAC's eigenvalue refit).
        estimate: ``estimate(footprint) -> rows`` of the fit's memory and disk (``--dry-run``).
        options: The dataclass of this approximation's own settings, or ``None``.
        check: ``check(config)`` raises :class:`~influscope.errors.ConfigError` for settings
            this approximation cannot use (called when a ``FitConfig`` is created).
    """

    name: str
    operator: type[CurvatureOperator]
    fit: Fitter
    replays: bool = False
    estimate: Callable[[FitFootprint], list[EstimateRow]] = one_pass_estimate
    options: type | None = None
    check: Callable[[FitConfig], None] | None = None

    def __iter__(self) -> Iterator[Any]:
        """``operator, fitter = CURVATURES[name]`` (the registry's former tuple form)."""
        return iter((self.operator, self.fit))

    def options_of(self, config: FitConfig) -> Any:
        """``config.options`` as this spec's options dataclass (its defaults when unset).

        Raises:
            ConfigError: Options given to an approximation that takes none, or unknown fields.
        """
        given = dict(config.options or {})
        if self.options is None:
            if given:
                raise ConfigError(
                    f"curvature={self.name!r} takes no options; received options={given}. "
                    "Drop options=, or choose a curvature that defines them."
                )
            return None
        return self.options.from_dict(given)

    def validate(self, config: FitConfig) -> None:
        """Check ``config`` against this approximation (its options and its own rules)."""
        self.options_of(config)
        if self.check is not None:
            self.check(config)


def stats_dtype(config: FitConfig) -> torch.dtype:
    """The accumulation dtype of ``config.stats_dtype``."""
    return torch.float64 if config.stats_dtype == "float64" else torch.float32
