"""Factors read from disk one layer at a time: :class:`StreamedOperator`.

A fit too large to hold (a 1.1 B Llama's EK-FAC factors are ≈ 25 GB in float64) is written
to disk per module partition (:mod:`influscope.curvature.run`), and used layer by layer: each
method ``m(layer, ...)`` loads that layer's tensors (``"{layer}::{key}"`` entries of a
safetensors file, read lazily with ``safe_open``: the other layers' bytes are not read), builds
the fitted operator's class over that one layer and applies it. The last layer used stays
loaded (a cache of one), so a caller that works layer after layer — the query stage — holds
one layer's factors at a time, and reads each layer once per query batch.

The arithmetic is the fitted class's own, on the same tensors, so streamed results are
bit-identical to those of the operator held in memory (tested).

On CUDA (``device`` a CUDA device) a layer's tensors are read into pinned host memory and
copied with ``non_blocking=True``: the copy of the next tensor overlaps the work on the
previous one, and no layer but the current one occupies device memory.
"""

from __future__ import annotations

import json
import shutil
import struct
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from influscope.curvature.base import CurvatureOperator
from influscope.curvature.registry import CURVATURES

__all__ = ["StreamedOperator", "aligned", "layer_sizes", "partition_files"]


def aligned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors copied out of a memory-mapped file into the allocator's (64-byte aligned)
    memory.

    safetensors hands out views of the mapped file, aligned only as the tensor's offset in
    the file happens to be; BLAS kernels (the SVD of rank-``r`` queries) take other code paths
    on other alignments and round differently in the last bit. A layer's offset differs between
    a single-file stage and a partition's file, so both readers copy: factors read either way
    give bit-identical scores.
    """
    return {k: v.clone() if v.device.type == "cpu" else v for k, v in tensors.items()}


def partition_files(op: StreamedOperator) -> tuple[list[dict], dict[str, Path]]:
    """How a stage stores ``op``'s files: ``([{"file", "layers"}, ...], {file: source})``,
    one ``partition-<k>.safetensors`` per distinct file, in layer order."""
    groups: dict[Path, list[str]] = {}
    for layer, path in op.files.items():
        groups.setdefault(path, []).append(layer)
    parts, files = [], {}
    for k, (path, layers) in enumerate(groups.items()):
        name = f"partition-{k:03d}.safetensors"
        parts.append({"file": name, "layers": layers})
        files[name] = path
    return parts, files


def layer_sizes(path: str | Path) -> dict[str, int]:
    """Bytes of each layer's tensors in a safetensors file, from its header (nothing else read).

    Keys ``"{layer}::{key}"`` are grouped by layer.
    """
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    out: dict[str, int] = {}
    for key, info in header.items():
        if key == "__metadata__" or "::" not in key:
            continue
        lo, hi = info["data_offsets"]
        layer = key.rsplit("::", 1)[0]
        out[layer] = out.get(layer, 0) + hi - lo
    return out


class _LayerMap(Mapping):
    """``op.<attr>[layer]`` of a streamed operator: loads that layer (e.g. ``op.q_a``)."""

    def __init__(self, op: StreamedOperator, attr: str) -> None:
        self.op, self.attr = op, attr

    def __getitem__(self, layer: str) -> torch.Tensor:
        if layer not in self.op.files:
            raise KeyError(layer)
        return getattr(self.op.layer(layer), self.attr)[layer]

    def __iter__(self) -> Iterator[str]:
        return iter(self.op.layer_names)

    def __len__(self) -> int:
        return len(self.op.files)


class StreamedOperator(CurvatureOperator):
    """A fitted operator whose per-layer tensors live in safetensors files.

    Args:
        curvature: The fitted approximation (a key of :data:`CURVATURES`).
        files: ``{layer: file holding its "{layer}::{key}" tensors}``, in layer order.
        damping: ``{layer: λ_ℓ}``.
        device: Where a loaded layer's tensors are placed (CUDA: through pinned memory).
        owned: A directory deleted when the operator is garbage-collected (the partitions of
            a fit made without a run directory), or ``None``.
        pin: Copy each layer to ``device`` through pinned host memory with
            ``non_blocking=True``; ``None`` (default): when ``device`` is a CUDA device.
    """

    def __init__(
        self,
        curvature: str,
        files: Mapping[str, str | Path],
        damping: Mapping[str, float],
        device: torch.device | str = "cpu",
        owned: str | Path | None = None,
        pin: bool | None = None,
    ) -> None:
        super().__init__(dict(damping))
        self.name = curvature  # type: ignore[misc]  # the fitted approximation's name
        self.curvature = curvature
        self.files = {k: Path(v) for k, v in files.items()}
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" if pin is None else bool(pin)
        self._cached: tuple[str, CurvatureOperator] | None = None
        #: Layers loaded so far (a count per layer; tests check the one-at-a-time order).
        self.loads: list[str] = []
        self._owned = owned
        self._owned_ref: StreamedOperator | None = None  # a copy keeps its source alive
        if owned is not None:
            weakref.finalize(self, shutil.rmtree, str(owned), True)

    @property
    def layer_names(self) -> list[str]:
        return list(self.files)

    # --- loading ------------------------------------------------------------------------
    def read_layer(self, layer: str) -> dict[str, torch.Tensor]:
        """The stored ``"{layer}::{key}"`` tensors of one layer, on :attr:`device`."""
        path = self.files[layer]
        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key.rsplit("::", 1)[0] == layer:
                    out[key] = fh.get_tensor(key)
        out = aligned(out)  # not views of the mapped file (see aligned)
        if self.pin:
            # pinned host memory: the host-to-device copy is asynchronous (non_blocking); the
            # kernels that use the tensors run after it on the same stream
            out = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in out.items()}
        elif self.device.type != "cpu":
            out = {k: v.to(self.device) for k, v in out.items()}
        return out

    def layer(self, layer: str) -> CurvatureOperator:
        """The fitted operator over ``layer`` alone (loaded unless it is the cached one)."""
        if self._cached is not None and self._cached[0] == layer:
            return self._cached[1]
        self._cached = None  # free the previous layer before reading the next
        op = CURVATURES[self.curvature].operator.from_tensors(
            self.read_layer(layer), {layer: self.damping[layer]}
        )
        self.loads.append(layer)
        self._cached = (layer, op)
        return op

    def release(self) -> None:
        """Drop the cached layer."""
        self._cached = None

    def layer_bytes(self) -> dict[str, int]:
        """Bytes of each layer's stored tensors (from the files' headers)."""
        out: dict[str, int] = {}
        for path in dict.fromkeys(self.files.values()):
            out.update(layer_sizes(path))
        return {k: out.get(k, 0) for k in self.files}

    def held_bytes(self) -> int:
        """Most factor bytes held at once: the largest layer's."""
        return max(self.layer_bytes().values(), default=0)

    # --- the operator, one layer at a time --------------------------------------------
    def precondition(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        return self.layer(layer).precondition(layer, g)

    def precondition_low_rank(self, layer, g, rank, method="auto"):
        return self.layer(layer).precondition_low_rank(layer, g, rank, method)

    def precondition_batch(self, layer, batch):
        return self.layer(layer).precondition_batch(layer, batch)

    def precondition_low_rank_batch(self, layer, batch, rank, method="auto"):
        return self.layer(layer).precondition_low_rank_batch(layer, batch, rank, method)

    def quadratic(self, layer: str, g: torch.Tensor) -> torch.Tensor:
        return self.layer(layer).quadratic(layer, g)

    def dense(self, layer: str) -> torch.Tensor:
        return self.layer(layer).dense(layer)

    # --- the fitted operator's per-layer dictionaries, loaded on access -------------------
    @property
    def q_a(self) -> _LayerMap:
        return _LayerMap(self, "q_a")

    @property
    def q_s(self) -> _LayerMap:
        return _LayerMap(self, "q_s")

    @property
    def eigenvalues(self) -> _LayerMap:
        return _LayerMap(self, "eigenvalues")

    @property
    def diag(self) -> _LayerMap:
        return _LayerMap(self, "diag")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every layer's tensors — all of them in memory at once (prefer :meth:`layer`)."""
        out = {}
        for name in self.files:
            out.update(self.read_layer(name))
        return out

    @classmethod
    def from_tensors(cls, tensors, damping):
        raise TypeError(
            "A StreamedOperator is built from files (StreamedOperator(curvature, files, "
            "damping)); use CURVATURES[name].operator.from_tensors for tensors in memory."
        )

    def with_damping(self, damping: Mapping[str, float]) -> StreamedOperator:
        """The same files with another damping (nothing is read)."""
        out = StreamedOperator(self.curvature, self.files, damping, self.device, pin=self.pin)
        out._owned_ref = self  # keep an owned directory alive as long as the copy
        return out

    def to(self, device: torch.device | str) -> StreamedOperator:
        """The same files, loading each layer onto ``device`` (nothing is read now)."""
        out = StreamedOperator(self.curvature, self.files, self.damping, device)
        out._owned_ref = self
        return out

    def in_memory(self) -> CurvatureOperator:
        """The fitted operator with every layer loaded (tests, small fits)."""
        return CURVATURES[self.curvature].operator.from_tensors(self.tensors(), self.damping)
