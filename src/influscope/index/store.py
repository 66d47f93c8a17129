"""A sharded, memory-mapped index of projected training gradients, and chunked top-k search.

Layout of ``RUN/index/<name>/``::

    meta.json                 config, fingerprints, layer layout, shard ranges, damping
    projector.safetensors     P_in, P_out per layer
    curvature.safetensors     the projected curvature (EK-FAC on projected factors)
    shards/shard-00000.npy    (n_k, D) projected gradients of sequences [start_k, end_k)

Row ``m`` of the index is ``concat_ℓ vec(P_out,ℓ ∇_{W_ℓ} L(z_m) P_in,ℓ^⊤)`` (``D = Σ_ℓ k_out k_in``)
in the storage dtype (``bfloat16`` is stored as its raw 16 bits, ``uint16``). Shards are plain
``.npy`` files opened with ``numpy.load(mmap_mode="r")``: a query reads them chunk by chunk and
never holds the whole index, nor the full ``(Q, N)`` score matrix, in memory.

Scores (same sign as :mod:`influscope.scoring.pairwise`):
``I_q(z_m) = -Σ_ℓ ⟨(F̃_ℓ + λ_ℓ I)^{-1} g̃_{q,ℓ}, g̃_{m,ℓ}⟩`` with ``g̃`` projected gradients and
``F̃`` the projected curvature.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influscope.errors import DataError
from influscope.storage.atomic import atomic_write_json, default_mode, read_json

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """``(n, D)`` float tensor → numpy array in the storage dtype."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Numpy rows in the storage dtype → float32 tensor."""
    t = torch.from_numpy(np.array(a))  # a writable copy of the (memory-mapped) rows
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.float()


def write_shard(path: Path, rows: np.ndarray) -> None:
    """Write one ``.npy`` shard atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, default_mode())  # mkstemp creates 0600: honour the umask instead
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_path(root: Path, k: int) -> Path:
    return root / "shards" / f"shard-{k:05d}.npy"


@dataclass
class TopK:
    """The best training sequences per query.

    Attributes:
        indices: ``(Q, k)`` row numbers of the index (positions in the indexed training set).
        scores: ``(Q, k)`` their influence, best first.
    """

    indices: torch.Tensor
    scores: torch.Tensor


class GradientIndex:
    """Read access to a finished index directory.

    Args:
        root: ``RUN/index/<name>``.

    Raises:
        DataError: If the directory holds no complete index.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / "meta.json").is_file():
            raise DataError(
                f"No index under {self.root} (expected meta.json). Build it with "
                "`influscope index` (or influscope.index.build_index) first."
            )
        self.meta: dict[str, Any] = read_json(self.root / "meta.json")
        missing = [
            k for k in range(len(self.meta["shards"])) if not shard_path(self.root, k).is_file()
        ]
        if missing:
            raise DataError(
                f"The index under {self.root} is incomplete: shards {missing[:10]} are missing. "
                "Rerun the same `influscope index` command; it resumes where it stopped."
            )

    @property
    def n_rows(self) -> int:
        return int(self.meta["n_examples"])

    @property
    def dtype(self) -> str:
        return self.meta["config"]["dtype"]

    def shard(self, k: int) -> np.ndarray:
        """Shard ``k`` memory-mapped, ``(n_k, D)``."""
        return np.load(shard_path(self.root, k), mmap_mode="r")

    def rows(self, positions: torch.Tensor | list[int]) -> torch.Tensor:
        """Selected rows as float32 ``(len(positions), D)`` on the CPU (reads only those rows)."""
        pos = torch.as_tensor(positions, dtype=torch.long).cpu()  # indexes numpy shards
        starts = torch.tensor([s for s, _ in self.meta["shards"]])
        which = torch.searchsorted(starts, pos, right=True) - 1
        out = torch.empty(len(pos), int(self.meta["dim"]))
        for k in which.unique().tolist():
            sel = (which == k).nonzero().squeeze(1)
            local = (pos[sel] - starts[k]).numpy()
            out[sel] = from_storage(self.shard(k)[local], self.dtype)
        return out

    def search(
        self,
        queries: torch.Tensor,
        k: int = 10,
        candidates: list[list[int]] | None = None,
        chunk: int = 4096,
        return_all: bool = False,
    ) -> TopK | tuple[TopK, torch.Tensor]:
        """Chunked top-``k`` of ``-queries @ rows^⊤`` over the whole index.

        Args:
            queries: ``(Q, D)`` preconditioned projected query gradients.
            k: How many training sequences to keep per query.
            candidates: Optional allowed rows per query (e.g. BM25 top-K); others are skipped.
            chunk: Rows read and multiplied at a time.
            return_all: Also return the full ``(Q, N)`` score matrix (small indexes, tests).

        Returns:
            :class:`TopK` (and the full matrix when ``return_all``), on the CPU.
        """
        q = queries.float().cpu()  # (Q, D); the rows are read on the CPU
        n_q = q.shape[0]
        allowed = None
        if candidates is not None:
            allowed = torch.zeros(n_q, self.n_rows, dtype=torch.bool)
            for i, rows in enumerate(candidates):
                allowed[i, torch.as_tensor(rows, dtype=torch.long)] = True
        best_s = torch.full((n_q, 0), float("-inf"))
        best_i = torch.zeros((n_q, 0), dtype=torch.long)
        full = torch.empty(n_q, self.n_rows) if return_all else None
        for j, (start, _) in enumerate(self.meta["shards"]):
            shard = self.shard(j)
            for lo in range(0, shard.shape[0], chunk):
                rows = from_storage(shard[lo : lo + chunk], self.dtype)  # (n, D)
                s = -(q @ rows.t())  # (Q, n)
                idx = torch.arange(start + lo, start + lo + rows.shape[0])
                if full is not None:
                    full[:, idx] = s
                if allowed is not None:
                    s = s.masked_fill(~allowed[:, idx], float("-inf"))
                best_s = torch.cat([best_s, s], dim=1)
                best_i = torch.cat([best_i, idx.expand(n_q, -1)], dim=1)
                keep = min(k, best_s.shape[1])
                best_s, top = best_s.topk(keep, dim=1)  # (Q, keep)
                best_i = best_i.gather(1, top)
        result = TopK(best_i, best_s)
        return (result, full) if return_all else result


def write_rows_index(
    root: str | Path, shards: list[torch.Tensor | np.ndarray], dtype: str = "float32", **meta
) -> GradientIndex:
    """An index directory holding given rows, shard by shard (synthetic benchmarks, tests, rows
    computed elsewhere); it has no projector or curvature, so it is searched with queries that
    are already preconditioned.

    Args:
        root: Directory to write (``meta.json`` and ``shards/``).
        shards: ``(n_k, D)`` rows of each shard, in order (generated lazily if an iterator).
        dtype: Storage dtype (one of :data:`NUMPY_DTYPES`).
        **meta: Extra ``meta.json`` entries (e.g. a ``data`` fingerprint).
    """
    root = Path(root)
    ranges, start, dim = [], 0, None
    for k, rows in enumerate(shards):
        rows = torch.as_tensor(rows)
        dim = rows.shape[1] if dim is None else dim
        if rows.ndim != 2 or rows.shape[1] != dim:
            raise DataError(f"Shard {k} has shape {tuple(rows.shape)}; expected (n, {dim}).")
        write_shard(shard_path(root, k), to_storage(rows, dtype))
        ranges.append([start, start + rows.shape[0]])
        start += rows.shape[0]
    atomic_write_json(
        root / "meta.json",
        {"config": {"dtype": dtype}, "n_examples": start, "dim": int(dim or 0),
         "shards": ranges, **meta},
    )  # fmt: skip
    return GradientIndex(root)
