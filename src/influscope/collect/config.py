"""Settings of training-time collection (frozen, validated on creation, saved beside the data)."""

from __future__ import annotations

from dataclasses import dataclass

from influscope.config import Settings, require

#: Projections a collector can draw itself (``pca``/``eigen`` need factors fitted after training).
COLLECT_INITS = ("orthogonal", "gaussian")
#: Storage dtypes of collected projected gradients.
COLLECT_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class CollectConfig:
    """What a :class:`~influscope.collect.GradientCollector` saves while a model trains.

    Step numbering: ``θ_s`` are the parameters after ``s`` optimizer steps (``θ_0``: the
    initialisation). Optimizer step ``s + 1`` computes its gradient at ``θ_s`` and moves to
    ``θ_{s+1}``, so the per-example gradients collected in that step are ``∇L(z, θ_s)`` and are
    stored under *parameter step* ``s`` — the checkpoint ``checkpoint-s`` (``initial/`` for
    ``s = 0``), **not** the checkpoint written at the end of the same step.

    Attributes:
        modules: Tracked modules whose projected gradients are collected (preset or regexes,
            as in :func:`influscope.modules.selection.select_layers`).
        checkpoint_every: Save the model (``save_pretrained``) after every ``checkpoint_every``
            optimizer steps, as ``checkpoints/checkpoint-<step>/``; ``None``: no checkpoints.
        gradients: Collect projected per-example gradients.
        gradient_every: Collect in the steps whose starting parameter step ``s`` is a multiple
            of this (``1``: every step). With ``gradient_every == checkpoint_every`` every
            collected step has its checkpoint (and ``initial/`` is saved for ``s = 0``).
        k_in: Rows of each layer's input projection ``P_in`` (capped at the layer's width).
        k_out: Rows of each layer's output-gradient projection ``P_out``.
        init: ``"orthogonal"`` or ``"gaussian"`` LoGra projections (same seeds and matrices as
            :class:`influscope.projection.LograProjector`, so an index built afterwards with
            the same ``seed`` projects identically).
        seed: Seed of the projections.
        dtype: Storage dtype of the collected rows (``"float64"`` for exactness tests).
        verify: In every collected step, check that the per-example rows add up to the
            gradient accumulated into the tracked parameters (projected, before clipping) and,
            under the Trainer, that the loss is a uniform multiple of the summed token
            cross-entropy (from the logits' gradient); raise
            :class:`~influscope.errors.CollectionError` if not.
        verify_tol: Relative tolerance of that check.
    """

    modules: str | tuple[str, ...] = "mlp"
    checkpoint_every: int | None = None
    gradients: bool = True
    gradient_every: int = 1
    k_in: int = 64
    k_out: int = 64
    init: str = "orthogonal"
    seed: int = 0
    dtype: str = "float32"
    verify: bool = True
    verify_tol: float = 1e-3

    def __post_init__(self) -> None:
        require(
            self.checkpoint_every is None or self.checkpoint_every >= 1,
            f"checkpoint_every must be None or ≥ 1 steps, received {self.checkpoint_every}.",
        )
        require(
            self.gradients or self.checkpoint_every is not None,
            "Nothing to collect: gradients=False and checkpoint_every=None. Set "
            "checkpoint_every=N to save checkpoints, or gradients=True.",
        )
        require(
            self.gradient_every >= 1, f"gradient_every must be ≥ 1, received {self.gradient_every}."
        )
        require(
            self.k_in >= 1 and self.k_out >= 1,
            f"k_in and k_out must be ≥ 1, received {self.k_in}, {self.k_out}.",
        )
        require(
            self.init in COLLECT_INITS,
            f"init must be one of {COLLECT_INITS}, received {self.init!r} (PCA/eigen "
            "projections need factors fitted after training: build the index afterwards).",
        )
        require(
            self.dtype in COLLECT_DTYPES,
            f"dtype must be one of {COLLECT_DTYPES}, received {self.dtype!r}.",
        )
        require(self.verify_tol > 0, f"verify_tol must be > 0, received {self.verify_tol}.")

    def to_dict(self) -> dict:
        out = Settings.to_dict(self)
        if isinstance(out["modules"], tuple):
            out["modules"] = list(out["modules"])
        return out
