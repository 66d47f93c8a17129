"""A run directory holds named stages: ``RUN/<kind>/<name>/{tensors.safetensors, meta.json}``.

``meta.json`` records the stage's config and the fingerprints of the model and data it was
computed from. Loading a stage checks them: a mismatch is a :class:`StaleArtifactError` that
names what changed, unless the caller asks to overwrite. A stage is written into a temporary
sibling directory and renamed into place, so an interrupted write leaves no partial stage.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from influscope.errors import StaleArtifactError
from influscope.storage.atomic import (
    atomic_write_json,
    atomic_write_tensors,
    read_json,
    read_tensors,
)
from influscope.version import __version__

TENSORS = "tensors.safetensors"
META = "meta.json"


class RunDirectory:
    """Named stages under one directory.

    Args:
        root: The run directory (created on first write).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def stage_dir(self, kind: str, name: str) -> Path:
        """``RUN/<kind>/<name>``."""
        return self.root / kind / name

    def exists(self, kind: str, name: str) -> bool:
        d = self.stage_dir(kind, name)
        return (d / META).is_file() and (d / TENSORS).is_file()

    def check(
        self, kind: str, name: str, expected: dict[str, Any], fix: str | None = None
    ) -> dict[str, Any]:
        """Load ``meta.json`` and compare the keys of ``expected``.

        Args:
            kind: Stage kind (``"factors"``, ``"scores"``).
            name: Stage name.
            expected: Values the stored metadata must hold.
            fix: How to resolve a mismatch, for the message (default: recompute with
                ``overwrite=True`` or choose another name).

        Raises:
            StaleArtifactError: If any expected key differs; the message names each one.
        """
        meta = read_json(self.stage_dir(kind, name) / META)
        diffs = [
            f"{key}: stored {meta.get(key)!r}, now {value!r}"
            for key, value in expected.items()
            if meta.get(key) != value
        ]
        if diffs:
            fix = fix or (
                "Pass overwrite=True (CLI: --overwrite) to recompute it, or choose another name."
            )
            raise StaleArtifactError(
                f"The stored {kind} stage {name!r} in {self.root} was computed with different "
                f"{', '.join(d.split(':')[0] for d in diffs)} than now ({'; '.join(diffs)}). "
                f"Refusing to reuse it. {fix}"
            )
        return meta

    def load(
        self,
        kind: str,
        name: str,
        expected: dict[str, Any],
        device: str | torch.device = "cpu",
        fix: str | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata of a stage, after :meth:`check` (``fix``: see there)."""
        meta = self.check(kind, name, expected, fix)
        return read_tensors(self.stage_dir(kind, name) / TENSORS, device), meta

    def save(
        self, kind: str, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> Path:
        """Write a stage atomically (replacing an existing one)."""
        final = self.stage_dir(kind, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=final.parent))
        try:
            atomic_write_tensors(tmp / TENSORS, tensors)
            atomic_write_json(tmp / META, {**meta, "influscope_version": __version__})
            if final.exists():
                old = final.with_name(f".{name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
