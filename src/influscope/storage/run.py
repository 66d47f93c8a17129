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

from influscope.errors import StaleArtifactError, StorageError
from influscope.storage.atomic import (
    atomic_write,
    atomic_write_json,
    atomic_write_tensors,
    make_temp_dir,
    read_json,
    read_tensors,
)
from influscope.version import __version__

TENSORS = "tensors.safetensors"
META = "meta.json"

#: What a differing fingerprint means, for the stale-stage message.
FINGERPRINTS = {
    "model": "the model's weights or architecture differ",
    "data": "the training data's tokens or order differ",
    "queries": "the queries' tokens differ",
}


def default_fix(kind: str, name: str) -> str:
    """How to resolve a stale stage: recompute it in place, or keep both under another name."""
    return (
        f"Pass --overwrite (Python: overwrite=True) to recompute {kind} stage {name!r} in "
        f"place, or --name OTHER (Python: name='other') to compute a second stage beside it."
    )


def differences(stored: Any, now: Any, prefix: str = "") -> list[str]:
    """The entries of ``now`` that differ from ``stored``, one ``key: old → new`` line each.

    Nested dictionaries (a stage's ``config``) are compared key by key, so a changed option
    reads ``config.refine_steps: 0 → 2`` instead of two whole dictionaries; a fingerprint says
    what it stands for, a list says what was added and removed.

    Example:
        >>> differences({"config": {"a": 1, "b": 2}}, {"config": {"a": 1, "b": 3}})
        ['config.b: 2 → 3']
    """
    if isinstance(stored, dict) and isinstance(now, dict):
        out = []
        for key in list(now) + [k for k in stored if k not in now]:
            out += differences(stored.get(key, ABSENT), now.get(key, ABSENT), f"{prefix}{key}.")
        return out
    if _same(stored, now):
        return []
    key = prefix.rstrip(".") or "value"
    if stored is ABSENT or now is ABSENT:  # a key only one side has (not read as None)
        return [f"{key}: {_short(stored)} → {_short(now)}"]
    if key in FINGERPRINTS and isinstance(now, str):
        return [f"{key}: fingerprint {stored!r} → {now!r} ({FINGERPRINTS[key]})"]
    if _is_list(stored) and _is_list(now) and max(len(repr(stored)), len(repr(now))) > 80:
        gone = [x for x in stored if x not in now]
        new = [x for x in now if x not in stored]
        what = [f"removed {_short(gone)}"] * bool(gone) + [f"added {_short(new)}"] * bool(new)
        return [f"{key}: {', '.join(what) or 'same entries in another order'}"]
    return [f"{key}: {_short(stored)} → {_short(now)}"]


class _Absent:
    """A key a stored or expected dictionary does not have (distinct from ``None``)."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON would store them (a tuple equals the list it is saved as)."""
    if _is_list(a) and _is_list(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _is_list(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def _short(x: Any, limit: int = 120) -> str:
    text = repr(list(x) if isinstance(x, tuple) else x)
    return text if len(text) <= limit else f"{text[: limit - 20]} … ({len(text)} characters)"


def check_writable(directory: str | Path, what: str = "run directory") -> Path:
    """Prove, before any work, that files can be written in ``directory``; create nothing.

    A probe file is created and removed in ``directory``, or, when it does not exist yet, in its
    nearest existing ancestor (where it would be created): permission bits alone do not say it
    (``root`` ignores them; a read-only mount refuses writes to a ``0777`` directory). A refused
    command therefore leaves no empty run directory behind.

    Raises:
        StorageError: The directory (or the ancestor it would be created in) cannot be
            written, or a path on the way is a file; the message names it and why.
    """
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{str(existing)!r} is a file, not a directory")
        fd, probe = tempfile.mkstemp(prefix=".influscope-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StorageError(
            f"Cannot write to the {what} {str(directory)!r} ({reason}). Nothing was computed. "
            "Give a directory you can write (CLI: --run / --out), or fix its permissions "
            "(e.g. chmod u+w, or copy the run somewhere writable)."
        ) from None
    return directory


def place_file(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target``, or copy it where links are refused.

    Raises:
        StorageError: The disk is full while copying (the partial copy is removed).
    """
    try:
        os.link(source, target)
    except OSError:
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), source.stat().st_size)


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

    def check_writable(self, kind: str | None = None) -> Path:
        """Raise :class:`~influscope.errors.StorageError` unless ``RUN`` (or ``RUN/<kind>``)
        can be written; see :func:`check_writable`."""
        return check_writable(self.root / kind if kind else self.root)

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
        diffs = differences({k: meta.get(k) for k in expected}, expected)
        if diffs:
            keys = list(dict.fromkeys(d.split(":")[0].split(".")[0] for d in diffs))
            raise StaleArtifactError(
                f"The stored {kind} stage {name!r} in {self.root} was computed with different "
                f"{', '.join(keys)} than now ({'; '.join(diffs)}). Refusing to reuse it. "
                f"{fix or default_fix(kind, name)}"
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
        self,
        kind: str,
        name: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        files: dict[str, Path] | None = None,
    ) -> Path:
        """Write a stage atomically (replacing an existing one).

        Args:
            kind: Stage kind.
            name: Stage name.
            tensors: Written to ``tensors.safetensors``.
            meta: Written to ``meta.json`` (with the version).
            files: ``{file name in the stage: existing file}`` placed beside them (a
                partitioned fit's factors, already on disk): hard-linked when the file
                system allows (no copy; the source stays valid until its owner deletes it),
                else copied.
        """
        final = self.stage_dir(kind, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(final.parent, f".{name}.")  # the umask's mode, not mkdtemp's 0700
        try:
            for target, source in (files or {}).items():
                place_file(Path(source), tmp / target)
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
