"""Settings of a projected gradient index (frozen, validated, saved beside the index)."""

from __future__ import annotations

from dataclasses import dataclass

from influscope.config import Settings, require
from influscope.projection.projector import INITS

#: Storage dtypes of index shards.
INDEX_DTYPES = ("float32", "float16", "bfloat16")

#: Optimizer-aware scalings of index rows (TrackStar): none, or Adam's second moments.
OPTIMIZERS = ("none", "adam")


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
        optimizer: ``"none"`` (default) or ``"adam"``: TrackStar's optimizer-aware rows — each
            per-sequence gradient is scaled elementwise by ``(v + adam_eps)^{-1/2}`` with Adam's
            second moments ``v`` (given to :func:`~influscope.index.build_index` as
            ``second_moments``) before it is projected, for train rows and queries alike
            (:mod:`influscope.index.trackstar`). Needs a LoGra projection and
            ``curvature="identity"`` (the projected EK-FAC is fitted on unscaled Kronecker
            factors, which the elementwise scaling does not preserve).
        adam_eps: ``ε`` of that scaling.
        normalize: Divide every stored row, and every preconditioned query, by its Euclidean
            norm (TrackStar's unit normalisation; scores become cosines).
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
    optimizer: str = "none"
    adam_eps: float = 1e-8
    normalize: bool = False

    def fingerprint_dict(self) -> dict:
        """The settings that determine the index (``to_dict`` without ``cache_mb``; the
        TrackStar fields only when used, so indexes built before they existed stay valid)."""
        out = self.to_dict()
        out.pop("cache_mb")
        if self.optimizer == "none":
            out.pop("optimizer")
            out.pop("adam_eps")
        if not self.normalize:
            out.pop("normalize")
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
        require(
            self.optimizer in OPTIMIZERS,
            f"optimizer must be one of {OPTIMIZERS}, received {self.optimizer!r}.",
        )
        require(self.adam_eps > 0, f"adam_eps must be > 0, received {self.adam_eps}.")
        require(
            self.optimizer == "none" or (self.init != "eigen" and self.curvature == "identity"),
            "optimizer='adam' scales full per-sequence gradients before a LoGra projection and "
            "compares them without the projected EK-FAC (fitted on unscaled factors): use "
            "init='orthogonal'/'gaussian'/'pca' and curvature='identity'; received "
            f"init={self.init!r}, curvature={self.curvature!r}.",
        )
