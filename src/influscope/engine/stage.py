"""The stage runner: load a stored stage, or compute it (resumably), or refuse it as stale.

Every stage of the facade that stores a result (``factors``, ``scores``, ``ensemble``; DDA and
unlearning store theirs through them) runs through :func:`run_stage`, the one place that

1. compares the stored stage's fingerprints with ``expected`` and loads it when they match,
   or raises :class:`~influscope.errors.StaleArtifactError` naming what changed (unless
   ``overwrite``) — before any computation; a stage that will be computed and stored first
   proves its run directory writable (:class:`~influscope.errors.StorageError` otherwise), so
   neither a stale stage nor a read-only directory is found after the forward passes
   (:meth:`StageSpec.preflight`; callers that run passes of their own before
   :func:`run_stage`, such as the ``score`` command, call it first);
2. gives the computation a :class:`~influscope.engine.shards.PartialSums` store beside the
   stage (``RUN/<kind>/.<name>.<partial>``) keyed by the same fingerprints, so a killed run
   resumes from the shards or query blocks it finished;
3. saves the result atomically on rank 0 and then deletes the partial sums.

Without a run directory or a name nothing is stored: the computation runs with no store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from influscope.engine.distributed import is_writer
from influscope.engine.shards import PartialSums
from influscope.progress import tmp_bytes, watch
from influscope.storage import RunDirectory

__all__ = ["StageSpec", "run_stage"]

R = TypeVar("R")
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StageSpec(Generic[R]):
    """Where a stage lives and how its result is written and read back.

    Attributes:
        run: The run directory, or ``None`` (nothing stored).
        kind: Stage kind (``"factors"``, ``"scores"``, ``"ensemble"``).
        name: Stage name, or ``None`` (nothing stored).
        expected: Fingerprints and config the stored stage must match (saved in its meta).
        load: ``(tensors, meta) -> result`` for a stored stage.
        dump: ``result -> (tensors, extra meta)`` for saving (``None``: a read-only stage).
        device: Where stored tensors are loaded.
        fix: How to resolve a stale stage, for the error message (default: overwrite).
        partial: Suffix of the partial-sums directory, or ``None`` for a stage that keeps none.
        files: ``result -> {file name: existing file}`` saved beside the tensors (a partitioned
            fit's factors, written to disk while it ran), or ``None``.
        lazy: ``load`` reads the stage's files itself (it is given no tensors): a stage too
            large to hold, read a layer at a time.
    """

    run: RunDirectory | None
    kind: str
    name: str | None
    expected: dict[str, Any]
    load: Callable[[Tensors, dict[str, Any]], R]
    dump: Callable[[R], tuple[Tensors, dict[str, Any]]] | None = None
    device: torch.device | str = "cpu"
    fix: str | None = None
    partial: str | None = "partial"
    files: Callable[[R], dict[str, Any]] | None = None
    lazy: bool = False

    @property
    def stores(self) -> bool:
        """Whether results are stored (a run directory and a name)."""
        return self.run is not None and self.name is not None

    def exists(self) -> bool:
        """Whether a complete stage is stored."""
        return self.stores and self.run.exists(self.kind, self.name)  # type: ignore[union-attr]

    def preflight(self, overwrite: bool = False) -> bool:
        """Refuse, before any computation, what :func:`run_stage` would refuse after it.

        Returns:
            Whether a stored stage will be loaded (it exists, matches and not ``overwrite``).

        Raises:
            StaleArtifactError: A stored stage differs from ``expected`` (and not ``overwrite``).
            StorageError: The stage must be computed and stored, but ``RUN/<kind>`` cannot be
                written.
        """
        if self.exists() and not overwrite:
            self.run.check(self.kind, self.name, self.expected, self.fix)  # type: ignore[union-attr]
            return True
        if self.stores and self.dump is not None and is_writer():
            self.run.check_writable(self.kind)  # type: ignore[union-attr]
        return False

    def read(self) -> R:
        """The stored stage, after checking ``expected``.

        Raises:
            StaleArtifactError: A fingerprint or config differs; the message names each one.
        """
        if self.lazy:
            meta = self.run.check(self.kind, self.name, self.expected, self.fix)  # type: ignore[union-attr]
            return self.load({}, meta)
        tensors, meta = self.run.load(  # type: ignore[union-attr]
            self.kind, self.name, self.expected, self.device, self.fix
        )
        return self.load(tensors, meta)

    def partial_sums(self) -> PartialSums | None:
        """The resume store beside the stage (``RUN/<kind>/.<name>.<partial>``), or ``None``."""
        if not self.stores or self.partial is None:
            return None
        d = self.run.stage_dir(self.kind, self.name)  # type: ignore[union-attr]
        return PartialSums(d.with_name(f".{self.name}.{self.partial}"), self.expected)

    def write(self, result: R) -> None:
        """Save ``result`` (rank 0 only; no-op when nothing is stored)."""
        if self.stores and self.dump is not None and is_writer():
            tensors, extra = self.dump(result)
            files = self.files(result) if self.files is not None else None
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            parent = self.run.stage_dir(self.kind, self.name).parent  # type: ignore[union-attr]
            with watch(
                f"saving {self.kind}/{self.name}", size, lambda: tmp_bytes(parent, self.name)
            ):
                self.run.save(  # type: ignore[union-attr]
                    self.kind, self.name, tensors, {**self.expected, **extra}, files
                )


def run_stage(
    spec: StageSpec[R],
    compute: Callable[[PartialSums | None], R],
    overwrite: bool = False,
    before_load: Callable[[], None] | None = None,
) -> R:
    """Load ``spec``'s stored stage, or ``compute(store)`` and save it.

    Args:
        spec: Where the stage lives, what it must match, how it is written and read.
        compute: ``compute(store) -> result``; ``store`` keeps partial results for resuming
            (``None`` when nothing is stored or the stage keeps no partial sums).
        overwrite: Recompute even when a stage is stored (a stale one is then replaced).
        before_load: Called before a stored stage is read (e.g. to refuse inputs that carry
            no fingerprint to check it against).

    Returns:
        The stored or computed result.

    Raises:
        StaleArtifactError: A stored stage differs from ``spec.expected`` and not ``overwrite``.
        StorageError: The stage is to be stored but its run directory cannot be written.
    """
    if before_load is not None and spec.exists() and not overwrite:
        before_load()
    if spec.preflight(overwrite):  # stale or unwritable: refused before any computation
        return spec.read()
    store = spec.partial_sums()
    result = compute(store)
    spec.write(result)
    if store is not None:
        store.clear()
    return result
