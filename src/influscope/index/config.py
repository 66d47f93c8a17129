"""Settings of a projected gradient index (frozen, validated, saved beside the index)."""

from __future__ import annotations

from dataclasses import dataclass

from influscope.config import Settings, require
from influscope.projection.projector import INITS

#: Storage dtypes of index shards.
INDEX_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class IndexConfig(Settings):
    """How training gradients are projected, preconditioned and stored.

    Attributes:
        k_in: Rows of each layer's input projection ``P_in`` (capped at the layer's width).
        k_out: Rows of each layer's output-gradient projection ``P_out``.
        init: ``"orthogonal"`` (default: seeded Gaussian with orthonormalised rows), ``"gaussian"``
            (seeded, i.i.d.), ``"pca"`` (top eigenvectors of fitted K-FAC factors) or
            ``"eigen"`` (the ``Σ_ℓ k_out k_in`` EK-FAC eigen-coordinates with the largest
            ``Λ/(Λ+λ)``, from fitted factors; preconditions with their ``Λ`` and damping, so
            ``curvature`` must be ``"ekfac"`` and ``fisher``/``damping_factor`` are unused).
        seed: Seed of the Gaussian projections.
        curvature: Curvature fitted *in the projected space*: ``"ekfac"`` (EK-FAC on the
            projected Kronecker factors, default) or ``"identity"`` (projected gradient dot
            products).
        fisher: ``"true"`` (sampled labels) or ``"empirical"`` for the projected curvature.
        damping_factor: Relative damping of the projected curvature (× mean eigenvalue).
        dtype: Storage dtype of the projected training gradients.
        batch_size: Sequences per pass.
        shard_size: Sequences per index shard (and per resumable statistics shard).
        cache_mb: Memory (MiB) for replaying the projected curvature's first statistics pass
            in its eigenvalue refit (see :class:`influscope.FitConfig`); ``0`` disables it.
            Not part of the stored fingerprint, since it does not change the index.
    """

    k_in: int = 64
    k_out: int = 64
    init: str = "orthogonal"
    seed: int = 0
    curvature: str = "ekfac"
    fisher: str = "true"
    damping_factor: float = 0.1
    dtype: str = "float16"
    batch_size: int = 8
    shard_size: int = 1024
    cache_mb: float = 2048.0

    def fingerprint_dict(self) -> dict:
        """The settings that determine the index (``to_dict`` without ``cache_mb``)."""
        out = self.to_dict()
        out.pop("cache_mb")
        return out

    def __post_init__(self) -> None:
        require(self.k_in >= 1 and self.k_out >= 1, f"k_in, k_out must be ≥ 1, got {self}.")
        require(self.init in INITS, f"init must be one of {INITS}, received {self.init!r}.")
        require(
            self.curvature in ("ekfac", "identity"),
            f"curvature must be 'ekfac' or 'identity', received {self.curvature!r}.",
        )
        require(
            self.init != "eigen" or self.curvature == "ekfac",
            "init='eigen' preconditions with the fitted EK-FAC eigenvalues, so curvature must "
            f"be 'ekfac'; received curvature={self.curvature!r}.",
        )
        require(
            self.fisher in ("true", "empirical"),
            f"fisher must be 'true' or 'empirical', received {self.fisher!r}.",
        )
        require(self.damping_factor >= 0, f"damping_factor must be ≥ 0, got {self.damping_factor}.")
        require(
            self.dtype in INDEX_DTYPES,
            f"dtype must be one of {INDEX_DTYPES}, received {self.dtype!r}.",
        )
        require(self.batch_size >= 1, f"batch_size must be ≥ 1, received {self.batch_size}.")
        require(self.shard_size >= 1, f"shard_size must be ≥ 1, received {self.shard_size}.")
        require(self.cache_mb >= 0, f"cache_mb must be ≥ 0, received {self.cache_mb}.")
