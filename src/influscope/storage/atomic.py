"""Atomic file writes: write to a temporary file in the same directory, then ``os.replace``.

A crash leaves either the old file or the new one, never half of one. Tensors are stored as
safetensors and metadata as JSON; nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def default_mode(directory: bool = False) -> int:
    """The mode ``open`` / ``mkdir`` would give a new file / directory under the umask.

    ``tempfile.mkstemp`` and ``mkdtemp`` create ``0600`` / ``0700`` whatever the umask; every
    stored file and stage directory is given this mode instead (``0644`` / ``0755`` under the
    usual umask ``022``, so the group can read a run; ``0600`` / ``0700`` under ``077``).
    """
    return (0o777 if directory else 0o666) & ~current_umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new temporary directory in ``parent`` with :func:`default_mode` (not ``0700``)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    os.chmod(tmp, default_mode(directory=True))
    return tmp


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it over ``path``.

    A reader never sees a half-written file and an interrupted write leaves any previous
    file intact (``os.replace`` is atomic on one filesystem).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 (and a writer such as safetensors may recreate the file): give
        # the mode a plain open() would, under the umask
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(Path(path), write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(Path(path), write)


def atomic_write_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors to a safetensors file, atomically (tensors are made contiguous on CPU)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(Path(path), lambda tmp: save_file(cpu, tmp, metadata=metadata))


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file."""
    return load_file(str(path), device=str(device))
