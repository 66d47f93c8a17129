"""Settings of the evaluation protocols — frozen dataclasses validated on creation.

Each is saved as JSON beside the results it produced (see :mod:`.retrain`).
"""

from __future__ import annotations

from dataclasses import dataclass

from influscope.config import Settings, require


@dataclass(frozen=True)
class LDSConfig(Settings):
    """Linear datamodeling score protocol (Park et al. 2023).

    Attributes:
        n_subsets: ``m``, random training subsets.
        fraction: ``α``, the share of the training set in each subset.
        n_seeds: ``r``, retraining seeds per subset; the measurement is averaged over them.
            The same seeds are used for every subset, which removes the seed's effect from the
            comparison between subsets.
        seed: Seed of the subset sampler.
    """

    n_subsets: int = 100
    fraction: float = 0.5
    n_seeds: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.n_subsets >= 3, f"n_subsets must be ≥ 3, received {self.n_subsets}.")
        require(0 < self.fraction < 1, f"fraction must be in (0, 1), received {self.fraction}.")
        require(self.n_seeds >= 1, f"n_seeds must be ≥ 1, received {self.n_seeds}.")


@dataclass(frozen=True)
class BrittlenessConfig(Settings):
    """Remove the top-``k`` proponents of a query, retrain, compare with ``k`` random removals.

    Attributes:
        ks: Numbers of removed training sequences.
        n_seeds: Retraining seeds per removal (the same for every removal).
        seed: Seed of the random removals.
    """

    ks: tuple[int, ...] = (10, 20, 50)
    n_seeds: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        require(
            len(self.ks) > 0 and min(self.ks) >= 1,
            f"ks must be positive integers, received {self.ks}.",
        )
        require(self.n_seeds >= 1, f"n_seeds must be ≥ 1, received {self.n_seeds}.")


@dataclass(frozen=True)
class PBRFConfig(Settings):
    """Proximal Bregman response function solve (Bae et al. 2022; Grosse et al. 2023, App. C).

    Attributes:
        epsilon: Up-weighting ``ε`` of the training point; the response is a central
            difference at ``±ε``.
        damping: Proximity weight ``λ`` (absolute, or ``{layer: λ_ℓ}`` passed at call time).
        max_steps: Newton steps per solve.
        tol: Stop when the gradient norm of the objective falls below this.
        newton: ``"exact"`` (Newton-CG on exact Hessian-vector products, preconditioned by
            ``G + Λ``) or ``"gauss_newton"`` (the fixed step ``-(G + Λ)^{-1} ∇Φ``; cheaper per
            step, much slower to converge when ``ε`` is large).
    """

    epsilon: float = 1e-3
    damping: float = 1e-3
    max_steps: int = 50
    tol: float = 1e-9
    newton: str = "exact"

    def __post_init__(self) -> None:
        require(self.epsilon > 0, f"epsilon must be > 0, received {self.epsilon}.")
        require(self.damping >= 0, f"damping must be ≥ 0, received {self.damping}.")
        require(self.max_steps >= 1, f"max_steps must be ≥ 1, received {self.max_steps}.")
        require(self.tol > 0, f"tol must be > 0, received {self.tol}.")
        require(
            self.newton in ("exact", "gauss_newton"),
            f"newton must be 'exact' or 'gauss_newton', received {self.newton!r}.",
        )


@dataclass(frozen=True)
class MislabelConfig(Settings):
    """Label flipping for mislabel-detection experiments.

    Attributes:
        fraction: ``p``, share of training labels flipped to another class.
        inspect: Shares of the ranked training set a person inspects (``found@``).
        seed: Seed of the flips.
    """

    fraction: float = 0.1
    inspect: tuple[float, ...] = (0.1, 0.2)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "inspect", tuple(float(x) for x in self.inspect))
        require(0 < self.fraction < 1, f"fraction must be in (0, 1), received {self.fraction}.")
        require(
            all(0 < x <= 1 for x in self.inspect),
            f"inspect fractions must be in (0, 1], received {self.inspect}.",
        )
