"""Atomic file writes: write to a temporary file in the same directory, then ``os.replace``.

A crash leaves either the old file or the new one, never half of one. Tensors are stored as
safetensors and metadata as JSON; nothing is ever pickled.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from influscope.errors import StorageError


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


#: ``errno`` values of a full disk or an exhausted quota.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(path: Path, exc: OSError, size: int | None = None) -> StorageError:
    """A :class:`StorageError` for a write that ran out of space, naming the file, what it
    needed and what is free, and the way out."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    need = f"{size / 2**20:.1f} MiB needed, " if size is not None else ""
    err = StorageError(
        f"No space left on the device holding {str(path.parent)!r} while writing "
        f"{path.name!r} ({need}{free}; {exc.strerror or exc}). Nothing was kept: the partial "
        "file was removed and any previous version is intact. Fix: free disk space there, or "
        "write the run to another directory (CLI: --run / --out), then run the command again."
    )
    err.errno = exc.errno
    return err


def atomic_write(path: Path, write, size: int | None = None) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it over ``path``.

    A reader never sees a half-written file and an interrupted write leaves any previous
    file intact (``os.replace`` is atomic on one filesystem).

    Args:
        path: The file to write.
        write: ``write(tmp_path)`` writes the content.
        size: Bytes it will write, for the message of a full disk (optional).

    Raises:
        StorageError: The disk is full (or the quota exhausted); the partial file is removed.
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
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in DISK_FULL and not isinstance(exc, StorageError):
            raise disk_full_error(path, exc, size) from exc
        raise
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


#: torch dtype → safetensors dtype name.
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` as a safetensors file, one tensor at a time.

    ``safetensors.torch.save_file`` first copies every tensor into a Python ``bytes`` object
    and only then writes, so saving holds the tensors twice: +2.4 GiB at the end of a SmolLM2
    EK-FAC fit, its peak. This writes the same format (8-byte little-endian header length, a
    JSON header padded with spaces to a multiple of 8, then the raw little-endian bytes in
    header order, tensors ordered by decreasing element size for alignment) streaming from
    each tensor's own memory, so the only extra memory is one tensor's contiguous CPU copy
    when it is not already contiguous on the CPU. ``safetensors.torch.load_file`` reads it
    (tested for every dtype).
    """
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"Tensor {name!r} has dtype {t.dtype}, which safetensors cannot store.")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)  # (numel,)
            if t.numel():
                fh.write(memoryview(t.view(torch.uint8).numpy()))


def atomic_write_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors to a safetensors file, atomically, streaming one tensor at a time
    (:func:`write_safetensors`: no second copy of the whole set in memory)."""
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return atomic_write(
        Path(path), lambda tmp: write_safetensors(tmp, tensors, metadata), size=size
    )


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file."""
    return load_file(str(path), device=str(device))
