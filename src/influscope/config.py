"""Typed, validated, JSON-serialisable settings — one frozen dataclass per stage.

Each stage saves its config beside its results; reusing a stage with a different config is
refused (see :mod:`influscope.storage`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from influscope.errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch and the curvature registry are imported where used, not here: the CLI builds its
# parsers (with these configs' defaults) without paying for torch
_DTYPES = ("float32", "float64", "bfloat16", "float16")


def resolve_dtype(name: str | None) -> torch.dtype | None:
    """``"bfloat16"`` → ``torch.bfloat16`` (``None`` stays ``None``)."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise ConfigError(f"Unknown dtype {name!r}. Supported: {sorted(_DTYPES)}.")
    import torch

    return getattr(torch, name)


def require(cond: bool, msg: str) -> None:
    """Raise :class:`~influscope.errors.ConfigError` with ``msg`` unless ``cond`` holds.

    The validation helper of every settings dataclass (in this module and in each stage's
    ``config.py``).
    """
    if not cond:
        raise ConfigError(msg)


class Settings:
    """Base of every settings dataclass: ``to_dict`` / ``from_dict`` (unknown fields refused).

    Subclass it with ``@dataclass(frozen=True)`` and validate in ``__post_init__`` with
    :func:`require`; the dict is what is saved beside results and fingerprinted.
    """

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"Unknown {cls.__name__} fields {unknown}. Known: {sorted(names)}.")
        return cls(**data)


def check_memory_gb(value: Any) -> None:
    """``memory_gb`` is ``None`` (derived from free memory) or a finite number of GiB > 0."""
    require(
        value is None
        or (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        ),
        f"memory_gb must be None (derived from the device's free memory) or a finite number of "
        f"GiB > 0, received {value!r}.",
    )


@dataclass(frozen=True)
class FitConfig(Settings):
    """How curvature is estimated.

    Attributes:
        curvature: Key in :data:`influscope.curvature.CURVATURES` (``identity``, ``diagonal``,
            ``kfac``, ``ekfac``, ``datainf``); the spec there validates the settings it uses.
        fisher: ``"true"`` samples labels from the model (seeded per example; the true Fisher
            equals the Gauss-Newton Hessian in expectation); ``"empirical"`` uses the data labels.
        damping: Absolute damping ``λ`` for every layer, or ``None`` for
            ``damping_factor × mean eigenvalue`` per layer.
        damping_factor: Relative damping used when ``damping`` is ``None`` (default 0.1).
        batch_size: Examples per forward/backward pass.
        seed: Seed for sampled labels.
        stats_dtype: Accumulation dtype of covariances and eigenvalue statistics.
        amp_dtype: Autocast dtype of the model's forward/backward (``bfloat16``/``float16``),
            or ``None`` for the model's own dtype.
        max_examples: Fit on at most this many training examples (the first ones).
        shard_size: Examples per shard of the statistics passes (rounded up to whole batches).
            With a run directory each shard's partial sums are saved as soon as it is done, so
            a killed fit resumes where it stopped; under ``torch.distributed`` shards are
            dealt to ranks round-robin.
        memory_gb: Memory budget (GiB) of the fit: the most the process may hold at its
            peak (resident set size on CPU, allocated memory on CUDA). ``None`` (default):
            what it holds when the fit starts + 90 % of the device's free memory. It sizes the
            replay cache (used only while it fits) and, if needed, lowers the batch size; a
            budget below what one tracked layer needs is refused before any forward pass
            (:mod:`influscope.budget`). Not part of the fingerprint: results do not depend on
            it.
        cache_mb: Upper limit (MiB) of the replay cache, which keeps what the first statistics
            pass captured so that EK-FAC's eigenvalue refit replays it instead of running the
            model again (one forward + backward over the data instead of two; identical
            results). ``None`` (default): as much as ``memory_gb`` leaves; ``0`` disables the
            cache. Batches beyond it are recomputed. Not part of the stored fingerprint.
        datainf_memory_mb: Largest per-example gradient store (MiB) a ``datainf`` fit may
            hold: it keeps ``n × Σ_ℓ out_ℓ·in_ℓ`` numbers (see
            :mod:`influscope.curvature.datainf`) and refuses to start above this. Not part of
            the stored fingerprint.
        options: The chosen curvature's own settings (fields of its spec's ``options``
            dataclass, e.g. ``{"rank": 4}``), or ``None`` for its defaults. Fingerprinted
            with the factors when given.
        partitions: Fit the tracked layers in this many contiguous module partitions, one
            after the other (each runs its own passes over the data, writes its factors to
            disk and frees them before the next), or ``None`` (default) for as many as the
            memory budget needs — 1 when every layer's statistics fit together. Each partition
            beyond the first costs one more forward + backward pass over the data. Not part of
            the stored fingerprint: the factors are bit-identical for any partition count.
    """

    curvature: str = "ekfac"
    fisher: str = "true"
    damping: float | None = None
    damping_factor: float = 0.1
    batch_size: int = 8
    seed: int = 0
    stats_dtype: str = "float64"
    amp_dtype: str | None = None
    max_examples: int | None = None
    shard_size: int = 256
    cache_mb: float | None = None
    datainf_memory_mb: float = 4096.0
    options: dict[str, Any] | None = None
    memory_gb: float | None = None
    partitions: int | None = None

    def fingerprint_dict(self) -> dict[str, Any]:
        """The settings that determine the factors (``to_dict`` without the memory budgets;
        ``options`` only when given, so fits stored before it existed still match)."""
        out = self.to_dict()
        out.pop("memory_gb")
        out.pop("cache_mb")
        out.pop("datainf_memory_mb")
        out.pop("partitions")
        if not out["options"]:
            out.pop("options")
        return out

    def __post_init__(self) -> None:
        from influscope.curvature.registry import CURVATURES

        require(
            self.curvature in CURVATURES,
            f"Unknown curvature {self.curvature!r}. Supported: {sorted(CURVATURES)}.",
        )
        require(
            self.options is None or isinstance(self.options, dict),
            f"options must be a dict of the curvature's settings or None, received "
            f"{type(self.options).__name__} {self.options!r}.",
        )
        require(
            self.fisher in ("true", "empirical"),
            f"fisher must be 'true' or 'empirical', received {self.fisher!r}.",
        )
        require(
            self.damping is None or self.damping >= 0,
            f"damping must be None or ≥ 0, received {self.damping}.",
        )
        require(
            self.damping_factor >= 0, f"damping_factor must be ≥ 0, received {self.damping_factor}."
        )
        require(self.batch_size >= 1, f"batch_size must be ≥ 1, received {self.batch_size}.")
        require(
            self.stats_dtype in ("float32", "float64"),
            f"stats_dtype must be 'float32' or 'float64', received {self.stats_dtype!r}.",
        )
        require(
            self.amp_dtype in (None, "bfloat16", "float16"),
            f"amp_dtype must be None, 'bfloat16' or 'float16', received {self.amp_dtype!r}.",
        )
        require(
            self.max_examples is None or self.max_examples >= 1,
            f"max_examples must be None or ≥ 1, received {self.max_examples}.",
        )
        require(self.shard_size >= 1, f"shard_size must be ≥ 1, received {self.shard_size}.")
        require(
            self.cache_mb is None or self.cache_mb >= 0,
            f"cache_mb must be None (as the budget allows) or ≥ 0, received {self.cache_mb}.",
        )
        check_memory_gb(self.memory_gb)
        require(
            self.partitions is None
            or (
                isinstance(self.partitions, int)
                and not isinstance(self.partitions, bool)
                and self.partitions >= 1
            ),
            f"partitions must be None (as the memory budget needs) or an integer ≥ 1, received "
            f"{self.partitions!r}.",
        )
        require(
            self.datainf_memory_mb > 0,
            f"datainf_memory_mb must be > 0, received {self.datainf_memory_mb}.",
        )
        CURVATURES[self.curvature].validate(self)  # the approximation's own rules and options


@dataclass(frozen=True)
class ScoreConfig(Settings):
    """How scores are computed.

    Attributes:
        query_rank: Keep each layer's preconditioned query gradient as a rank-``r`` SVD
            (default 32, Grosse et al. report Pearson 0.995 against full rank); ``None`` keeps
            full rank.
        query_svd: How the rank-``r`` SVD is computed: ``"exact"``, ``"randomized"`` (seeded
            sketch with power iterations, much faster on LLM-sized layers) or ``"auto"``
            (default: randomized when ``4 (r + 8) ≤ min(out, in)``, e.g. 576 ↔ 1536 layers at
            rank 32, exact on small layers); see :mod:`influscope.linalg`.
        batch_size: Training examples per pass.
        per_layer: Also return the per-layer terms ``(Q, N, L)``.
        per_head: Also return per-attention-head terms ``(Q, N, H)`` (``Scores.per_head``,
            labelled by ``Scores.head_names``); every tracked layer must be an attention
            projection (``modules="attn"``). See docs/heads_experts.md.
        normalize: ``None``, or ``"relatif"`` to divide by ``sqrt(self-influence)`` of each
            training example.
        amp_dtype: Autocast dtype for forward/backward passes, or ``None``.
        damping: Score-time absolute damping ``λ`` for every layer, re-damping the loaded
            factors (:func:`influscope.scoring.damping.redamp`); ``None`` keeps the fit's.
        damping_factor: Score-time relative damping ``λ_ℓ = factor × mean eigenvalue of G_ℓ``;
            ``None`` keeps the fit's. At most one of the two.
        refine_steps: Iterations refining EK-FAC's block-diagonal ``P^{-1}∇f`` towards the
            full ``(G + Λ)^{-1}∇f`` over all tracked layers jointly (:mod:`influscope.solvers`);
            ``0`` (default) keeps plain preconditioning. Needs the training data.
        refine: ``"cg"`` (preconditioned conjugate gradient, default), ``"neumann"``
            (preconditioned Richardson iteration) or ``"astra"`` (ASTRA's stochastic
            preconditioned Neumann iteration, a fresh mini-batch per step); see
            :mod:`influscope.solvers.refine`.
        refine_tol: Stop a query once its relative residual is ≤ this (``0``: run all steps).
        refine_examples: Gauss-Newton products over a seeded random subset of this many
            training examples, or ``None`` (default) for all of them: CG and Neumann keep one
            subset for all steps, ASTRA draws one per step. Cost per step scales with it.
        refine_seed: Seed of those subsets.
        refine_alpha: Step of Neumann / ASTRA; ``None`` (default) estimates ``1/μ_max`` of
            ``P^{-1}(G + Λ)`` per query by power iteration (a few extra products).
        refine_start: ``"scaled"`` (default): iterate from the multiple ``c P^{-1}∇f`` of
            EK-FAC's answer that minimises the ``(G+Λ)``-norm error (no extra cost; for CG,
            ``k`` steps then equal ``k + 1`` CG steps from zero, never worse in that norm
            than ``k`` steps from ``P^{-1}∇f``); ``"ekfac"``: from ``P^{-1}∇f`` itself (the
            default before; docs/design.md, "Scaled start"). A per-query positive scale, so
            zero steps are plain EK-FAC either way.
        refine_memory_gb: Memory budget (GiB) for the refinement's per-query vectors and
            Gauss-Newton tangents (default 2): queries are refined in blocks that fit, so
            memory does not grow with their number; results do not depend on it.
        memory_gb: Memory budget (GiB) of the scoring pass, the most the process may hold at
            its peak; ``None`` (default): held now + 90 % of the device's free memory. It
            lowers the batch size if needed and refuses, before any forward pass, a budget
            below what one tracked layer needs (:mod:`influscope.budget`). Not fingerprinted.
    """

    query_rank: int | None = 32
    query_svd: str = "auto"
    batch_size: int = 8
    per_layer: bool = False
    per_head: bool = False
    normalize: str | None = None
    amp_dtype: str | None = None
    damping: float | None = None
    damping_factor: float | None = None
    refine_steps: int = 0
    refine: str = "cg"
    refine_tol: float = 0.0
    refine_examples: int | None = None
    refine_seed: int = 0
    refine_alpha: float | None = None
    refine_start: str = "scaled"
    refine_memory_gb: float = 2.0
    memory_gb: float | None = None

    def fingerprint_dict(self) -> dict[str, Any]:
        """The settings that determine the scores, as stored and compared with a scores stage.

        ``to_dict`` without the memory budgets ``refine_memory_gb`` and ``memory_gb`` (they
        size the query blocks and the batches, which give identical results), and without
        ``per_head``, ``refine_alpha`` and ``refine_start`` while they have the value that
        stages stored before these fields existed were computed with (``False``, ``None``,
        ``"ekfac"``), so that such a stage still loads. ``refine_start`` is also left out
        without refinement (``refine_steps=0``), where it changes nothing: so plain stages keep
        matching now that its default is ``"scaled"``, and a refined stage stored before the
        field is refused under the new default. (A refined stage stored before them with
        ``refine_examples`` set drew a new subset at every step; the solver now keeps one:
        recompute it with ``overwrite=True`` to get the new behaviour.)
        """
        out = self.to_dict()
        out.pop("refine_memory_gb")
        out.pop("memory_gb")
        for key, before in (
            ("per_head", False),
            ("refine_alpha", None),
            ("refine_start", "ekfac"),
        ):
            if out[key] == before:
                out.pop(key)
        if self.refine_steps == 0:
            out.pop("refine_start", None)
        return out

    def __post_init__(self) -> None:
        for key in ("damping", "damping_factor"):
            v = getattr(self, key)
            require(
                v is None or (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0),
                f"{key} must be None or a finite number ≥ 0, received {v!r} (λ is added to the "
                "curvature's eigenvalues).",
            )
        require(
            self.damping is None or self.damping_factor is None,
            "Give at most one of damping (absolute λ) and damping_factor (factor × mean "
            f"eigenvalue); received damping={self.damping}, damping_factor={self.damping_factor}.",
        )
        require(
            self.refine_steps >= 0,
            f"refine_steps must be ≥ 0 (0 = no refinement), received {self.refine_steps}.",
        )
        from influscope.solvers.refine import METHODS as refine_methods

        require(
            self.refine in refine_methods,
            f"refine must be one of {', '.join(map(repr, refine_methods))}, received "
            f"{self.refine!r}.",
        )
        require(
            self.refine_alpha is None
            or (isinstance(self.refine_alpha, (int, float)) and 0 < self.refine_alpha < math.inf),
            f"refine_alpha must be None (automatic step) or a finite number > 0, received "
            f"{self.refine_alpha!r}.",
        )
        require(
            self.refine_start in ("ekfac", "scaled"),
            f"refine_start must be 'ekfac' or 'scaled', received {self.refine_start!r}.",
        )
        require(
            isinstance(self.refine_memory_gb, (int, float))
            and 0 < self.refine_memory_gb < math.inf,
            f"refine_memory_gb must be a finite number of GiB > 0, received "
            f"{self.refine_memory_gb!r}.",
        )
        check_memory_gb(self.memory_gb)
        require(self.refine_tol >= 0, f"refine_tol must be ≥ 0, received {self.refine_tol}.")
        require(
            self.refine_examples is None or self.refine_examples >= 1,
            f"refine_examples must be None (all) or ≥ 1, received {self.refine_examples}.",
        )
        require(
            self.query_rank is None or self.query_rank >= 1,
            f"query_rank must be None (full rank) or ≥ 1, received {self.query_rank}.",
        )
        require(
            self.query_svd in ("auto", "exact", "randomized"),
            f"query_svd must be 'auto', 'exact' or 'randomized', received {self.query_svd!r}.",
        )
        require(self.batch_size >= 1, f"batch_size must be ≥ 1, received {self.batch_size}.")
        require(
            self.normalize in (None, "relatif"),
            f"normalize must be None or 'relatif', received {self.normalize!r}.",
        )
        require(
            self.amp_dtype in (None, "bfloat16", "float16"),
            f"amp_dtype must be None, 'bfloat16' or 'float16', received {self.amp_dtype!r}.",
        )
