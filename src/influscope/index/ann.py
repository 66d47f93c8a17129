"""Approximate nearest-neighbour (ANN) search over a projected gradient index, with FAISS.

The index scores query ``q`` against training row ``m`` by ``I_q(z_m) = -⟨q̃, g̃_m⟩`` with
``q̃ = (F̃ + λI)^{-1} g̃_q`` the preconditioned projected query (:mod:`influscope.index.store`).
Its top-``k`` is therefore a maximum-inner-product search for ``-q̃`` over the stored rows,
which FAISS answers with ``METRIC_INNER_PRODUCT``. Backends (:data:`ANN_BACKENDS`):

* ``exhaustive`` (default): :meth:`GradientIndex.search`, the chunked exact scan; nothing built.
* ``faiss-flat``: ``IndexFlatIP``, exact; every row in RAM as float32 (``N·D·4`` bytes). The
  reference the approximate backends are checked against.
* ``faiss-ivf``: ``IndexIVFFlat``. k-means on ``train_rows`` sampled rows puts every row into one
  of ``nlist`` lists, keyed by centroid; a query scans the ``nprobe`` lists whose centroids have
  the largest inner product with it, so about ``nprobe / nlist`` of the rows. Rows are float32.
* ``faiss-pq``: ``IndexPQ``. Each row is compressed to ``m`` codes of ``nbits`` bits (product
  quantisation: ``D/m``-wide sub-vectors, each replaced by the nearest of ``2^nbits`` learnt
  centroids). Search scans every code with table look-ups (asymmetric distance), which is cheaper
  than float32 but still visits every row.
* ``faiss-ivfpq``: ``IndexIVFPQ``. IVF lists holding PQ codes (of the rows' residuals from
  their centroids); the smallest and fastest.

Approximate scores are only for ranking candidates: :func:`influscope.index.rerank.rerank`
recomputes the exact index scores of the ``k'`` candidates (and ``retrieve(..., factors=...)``
the exact EK-FAC ones).

The ANN index is built from the memory-mapped shards in chunks of ``chunk`` rows (the whole
index is never loaded at once; FAISS itself holds what the backend stores) and written beside
the gradient index as ``ann/<name>.faiss`` (FAISS's own binary format, ``faiss.write_index``;
nothing is pickled) with ``ann/<name>.json``: the settings and the fingerprint of the gradient
index it was built from (:func:`index_fingerprint`). :func:`open_ann` refuses a FAISS index built
for another gradient index.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influscope.config import Settings, require
from influscope.errors import ConfigError, DataError, StaleArtifactError
from influscope.index.store import GradientIndex, TopK, from_storage, shard_path
from influscope.progress import track
from influscope.storage.atomic import atomic_write, atomic_write_json, read_json


@dataclass(frozen=True)
class AnnBackend:
    """One ANN backend.

    Attributes:
        name: Registry key.
        make: ``make(dim, n_rows, config) -> faiss.Index`` (an empty, untrained index), or
            ``None`` for the exhaustive scan.
        doc: One line for help texts.
    """

    name: str
    make: Callable[[int, int, AnnConfig], Any] | None
    doc: str


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigError(
            "FAISS backends need the 'faiss-cpu' package: pip install 'influscope[ann]' (or use "
            "ann='exhaustive', the exact scan)."
        ) from exc
    return faiss


def _nlist(n_rows: int, config: AnnConfig) -> int:
    """``config.nlist``, or ``≈ 4√N`` when 0, never more lists than training rows / 39."""
    want = config.nlist or max(1, round(4 * n_rows**0.5))
    return max(1, min(want, min(config.train_rows, n_rows) // 39 or 1))


def _quantizer(dim: int, config: AnnConfig):
    faiss = _faiss()
    return faiss.IndexFlatL2(dim) if config.mips == "augment" else faiss.IndexFlatIP(dim)


def _metric(config: AnnConfig) -> int:
    faiss = _faiss()
    return faiss.METRIC_L2 if config.mips == "augment" else faiss.METRIC_INNER_PRODUCT


def _flat(dim, n_rows, config):
    return _faiss().IndexFlatIP(dim)


def _ivf(dim, n_rows, config):
    # faiss's Python wrapper keeps a reference to the quantizer
    return _faiss().IndexIVFFlat(
        _quantizer(dim, config), dim, _nlist(n_rows, config), _metric(config)
    )


def _pq(dim, n_rows, config):
    return _faiss().IndexPQ(dim, config.m, config.nbits, _metric(config))


def _ivfpq(dim, n_rows, config):
    return _faiss().IndexIVFPQ(
        _quantizer(dim, config), dim, _nlist(n_rows, config), config.m, config.nbits,
        _metric(config),
    )  # fmt: skip


#: Registry of ANN backends (add an entry to extend).
ANN_BACKENDS: dict[str, AnnBackend] = {
    "exhaustive": AnnBackend("exhaustive", None, "exact chunked scan of the shards (default)"),
    "faiss-flat": AnnBackend("faiss-flat", _flat, "FAISS IndexFlatIP: exact, rows in RAM"),
    "faiss-ivf": AnnBackend("faiss-ivf", _ivf, "FAISS IndexIVFFlat: nlist lists, nprobe scanned"),
    "faiss-pq": AnnBackend("faiss-pq", _pq, "FAISS IndexPQ: m codes of nbits bits per row"),
    "faiss-ivfpq": AnnBackend("faiss-ivfpq", _ivfpq, "FAISS IndexIVFPQ: IVF lists of PQ codes"),
}

#: The backends that build something (every one but ``exhaustive``).
FAISS_BACKENDS = {k: b for k, b in ANN_BACKENDS.items() if b.make is not None}


#: Ways to search the maximum inner product (see :class:`AnnConfig`).
MIPS = ("augment", "direct")


@dataclass(frozen=True)
class AnnConfig(Settings):
    """How an ANN index over a gradient index is built and searched.

    Attributes:
        backend: Key of :data:`ANN_BACKENDS`.
        mips: How the approximate backends search the maximum inner product: ``"augment"``
            (default) reduces it to a Euclidean nearest-neighbour search (Bachrach et al. 2014):
            every row ``x`` gets an extra coordinate ``√(M² − ‖x‖²)`` (``M`` the largest row
            norm) and the query a ``0``, so ``‖x' − q'‖² = M² + ‖q‖² − 2⟨x, q⟩`` — clustering
            and quantisation then see rows of equal norm, which IVF needs: with rows of unequal
            norms the lists chosen by centroid inner product miss large-norm rows.
            ``"direct"``: FAISS's inner-product metric on the raw rows. ``faiss-flat`` is
            always exact inner product.
        nlist: IVF lists (``faiss-ivf``, ``faiss-ivfpq``); 0 picks ``≈ 4√N`` (capped so each
            list gets ≥ 39 training rows, FAISS's minimum for k-means).
        nprobe: IVF lists scanned per query (can be overridden at search time).
        m: PQ sub-quantisers (``faiss-pq``, ``faiss-ivfpq``); must divide the row width ``D``.
        nbits: Bits per PQ code (``2^nbits`` centroids per sub-quantiser).
        train_rows: Rows sampled (seeded, without replacement) to train k-means / PQ.
        seed: Seed of that sample and of FAISS's k-means.
        chunk: Rows read from the shards and added at a time (bounds the build's memory).
    """

    backend: str = "faiss-ivf"
    mips: str = "augment"
    nlist: int = 0
    nprobe: int = 32
    m: int = 64
    nbits: int = 8
    train_rows: int = 65_536
    seed: int = 0
    chunk: int = 16_384

    def __post_init__(self) -> None:
        require(
            self.backend in ANN_BACKENDS,
            f"backend must be one of {sorted(ANN_BACKENDS)}, received {self.backend!r}.",
        )
        require(self.mips in MIPS, f"mips must be one of {MIPS}, received {self.mips!r}.")
        require(self.nlist >= 0, f"nlist must be ≥ 0 (0: automatic), received {self.nlist}.")
        require(self.nprobe >= 1, f"nprobe must be ≥ 1, received {self.nprobe}.")
        require(self.m >= 1, f"m must be ≥ 1, received {self.m}.")
        require(1 <= self.nbits <= 16, f"nbits must be in 1..16, received {self.nbits}.")
        require(self.train_rows >= 1, f"train_rows must be ≥ 1, received {self.train_rows}.")
        require(self.chunk >= 1, f"chunk must be ≥ 1, received {self.chunk}.")

    def build_dict(self) -> dict:
        """The settings that determine the built index (``to_dict`` without ``nprobe``/``chunk``)."""
        out = self.to_dict()
        out.pop("nprobe")
        out.pop("chunk")
        return out


def index_fingerprint(index: GradientIndex) -> str:
    """A hash of the gradient index: its ``meta.json`` (config, model, data and factors
    fingerprints, layout, shard ranges, damping), each shard's size, and the bytes of each
    shard's first and last rows (which change whenever the rows are rewritten differently)."""
    h = hashlib.sha256(json.dumps(index.meta, sort_keys=True, default=str).encode())
    for k in range(len(index.meta["shards"])):
        h.update(str(shard_path(index.root, k).stat().st_size).encode())
        shard = index.shard(k)
        if shard.shape[0]:
            h.update(np.ascontiguousarray(shard[[0, -1]]).tobytes())
    return h.hexdigest()[:16]


def _paths(index: GradientIndex, name: str) -> tuple[Path, Path]:
    return index.root / "ann" / f"{name}.faiss", index.root / "ann" / f"{name}.json"


def _max_norm(index: GradientIndex, chunk: int) -> float:
    """The largest row norm ``M`` (one chunked pass over the shards)."""
    best = 0.0
    for k, (s, e) in enumerate(index.meta["shards"]):
        for lo in range(0, e - s, chunk):
            rows = from_storage(index.shard(k)[lo : lo + chunk], index.dtype)  # (n, D)
            best = max(best, float(rows.double().norm(dim=1).max()))
    return best


def _rows_in(x: np.ndarray, max_norm: float | None, width: int) -> np.ndarray:
    """Rows as FAISS stores them: raw, or ``[x, √(M² − ‖x‖²), 0…]`` (``(n, width)`` float32)."""
    if max_norm is None:
        return np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], width), dtype=np.float32)
    out[:, : x.shape[1]] = x
    sq = (x.astype(np.float64) ** 2).sum(axis=1)
    out[:, x.shape[1]] = np.sqrt(np.maximum(max_norm**2 - sq, 0.0))
    return out


def _sample(index: GradientIndex, config: AnnConfig) -> np.ndarray:
    """``(min(train_rows, N), D)`` float32 rows at seeded random positions (only those read)."""
    n = index.n_rows
    rng = np.random.default_rng(config.seed)
    pos = np.sort(rng.choice(n, size=min(config.train_rows, n), replace=False))
    return index.rows(torch.from_numpy(pos)).numpy()


def build_ann(
    index: GradientIndex,
    config: AnnConfig | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> AnnIndex:
    """Build (or reuse) a FAISS index over ``index``'s rows, stored as ``ann/<name>.faiss``.

    Args:
        index: The gradient index.
        config: Backend and parameters (must name a FAISS backend).
        name: File name under ``ann/`` (default: the backend's name).
        overwrite: Replace an ANN index of that name built with other settings or for another
            gradient index (otherwise refused).

    Raises:
        ConfigError: ``exhaustive`` (nothing to build), ``faiss-cpu`` missing, or (with
            ``mips="direct"``) PQ's ``m`` does not divide ``D``.
        StaleArtifactError: An ANN index of that name exists for other settings or another
            gradient index, and ``overwrite`` is off.
    """
    config = config or AnnConfig()
    backend = ANN_BACKENDS[config.backend]
    if backend.make is None:
        raise ConfigError(
            f"backend={config.backend!r} scans the gradient index itself; there is nothing to "
            f"build. Choose a FAISS backend: {', '.join(FAISS_BACKENDS)}."
        )
    faiss = _faiss()  # a missing package is reported before any work
    dim, n_rows = int(index.meta["dim"]), index.n_rows
    augment = config.mips == "augment" and config.backend != "faiss-flat"
    width = dim + 1 if augment else dim  # the augmented coordinate; PQ pads to a multiple of m
    if "pq" in config.backend and augment:
        width = -(-width // config.m) * config.m
    if "pq" in config.backend and width % config.m:
        divisors = [d for d in range(1, min(dim, 256) + 1) if dim % d == 0]
        raise ConfigError(
            f"PQ splits each row into m sub-vectors, so m must divide the row width D = {dim}; "
            f"received m={config.m}. Choose m from {divisors[-8:]} (CLI: --m), or "
            "mips='augment', which pads the rows."
        )
    name = name or config.backend
    path, meta_path = _paths(index, name)
    expected = {"config": config.build_dict(), "index": index_fingerprint(index)}
    if meta_path.is_file() and path.is_file():
        meta = read_json(meta_path)
        same = {k: meta.get(k) for k in expected} == expected
        if same:
            ann = faiss.read_index(str(path))
            return AnnIndex(index, name, config, ann, meta.get("max_norm"), meta.get("width", dim))
        if not overwrite:
            what = "settings" if meta.get("index") == expected["index"] else "gradient index"
            raise StaleArtifactError(
                f"The ANN index {path} was built with other {what} ({meta.get('config')}, for "
                f"index fingerprint {meta.get('index')}). Refusing to replace it. Pass "
                "overwrite=True (CLI: --overwrite) or another name (CLI: --name)."
            )
    max_norm = _max_norm(index, config.chunk) if augment else None
    ann = backend.make(width, n_rows, config)
    if not ann.is_trained:
        sample = _rows_in(_sample(index, config), max_norm, width)  # (n_train, width)
        for holder in (ann, getattr(ann, "pq", None)):  # k-means seeds (IVF lists, PQ codes)
            if holder is not None and hasattr(holder, "cp"):
                holder.cp.seed = config.seed
        ann.train(sample)
        del sample
    n_chunks = sum(-(-(e - s) // config.chunk) for s, e in index.meta["shards"])
    chunks = (
        (k, lo)
        for k, (s, e) in enumerate(index.meta["shards"])
        for lo in range(0, e - s, config.chunk)
    )
    for k, lo in track(chunks, f"ann {config.backend}", total=n_chunks, unit="chunk"):
        rows = from_storage(index.shard(k)[lo : lo + config.chunk], index.dtype)  # (n, D)
        ann.add(_rows_in(rows.numpy(), max_norm, width))  # (n, width)
    atomic_write(path, lambda tmp: faiss.write_index(ann, tmp))
    atomic_write_json(
        meta_path,
        {**expected, "backend": config.backend, "nprobe": config.nprobe, "n_rows": n_rows,
         "dim": dim, "width": width, "max_norm": max_norm, "index_root": str(index.root)},
    )  # fmt: skip
    return AnnIndex(index, name, config, ann, max_norm, width)


def open_ann(index: GradientIndex, name: str, nprobe: int | None = None) -> AnnIndex:
    """Load ``ann/<name>.faiss`` of ``index``, checking that it was built for this index.

    Raises:
        DataError: No such ANN index.
        StaleArtifactError: It was built for another gradient index (or this one was rebuilt).
    """
    path, meta_path = _paths(index, name)
    if not (path.is_file() and meta_path.is_file()):
        have = sorted(p.stem for p in (index.root / "ann").glob("*.json"))
        raise DataError(
            f"No ANN index {name!r} under {index.root / 'ann'} (found: {have or 'none'}). "
            f"Build it first: `influscope ann --index {index.root.name} --backend faiss-ivf` "
            "(Python: influscope.index.build_ann)."
        )
    meta = read_json(meta_path)
    now = index_fingerprint(index)
    if meta.get("index") != now:
        raise StaleArtifactError(
            f"The ANN index {path} was built for another gradient index ({meta.get('index_root')}"
            f", fingerprint {meta.get('index')}) than {index.root} (fingerprint {now}); its row "
            "numbers would name the wrong training sequences. Rebuild it for this index: "
            f"`influscope ann --index {index.root.name} --backend {meta.get('backend')} --name "
            f"{name} --overwrite` (Python: build_ann(index, config, name, overwrite=True))."
        )
    config = AnnConfig(**meta["config"], nprobe=nprobe or meta.get("nprobe", 32))
    ann = _faiss().read_index(str(path))
    return AnnIndex(index, name, config, ann, meta.get("max_norm"), meta.get("width", meta["dim"]))


class AnnIndex:
    """A FAISS index over a :class:`GradientIndex` (from :func:`build_ann` / :func:`open_ann`)."""

    def __init__(
        self,
        index: GradientIndex,
        name: str,
        config: AnnConfig,
        faiss_index,
        max_norm: float | None = None,
        width: int | None = None,
    ) -> None:
        self.index, self.name, self.config, self.faiss_index = index, name, config, faiss_index
        self.max_norm = max_norm  # M of the augmented search, None for a direct one
        self.width = width or int(index.meta["dim"])

    def search(self, queries: torch.Tensor, k: int = 10, nprobe: int | None = None) -> TopK:
        """Approximate top-``k`` rows of ``-queries @ rows^⊤`` (approximate scores; see
        :func:`influscope.index.rerank.rerank` for exact ones).

        Args:
            queries: ``(Q, D)`` preconditioned projected queries.
            k: Rows per query.
            nprobe: IVF lists to scan (default: the config's).

        Returns:
            :class:`TopK` on the CPU; missing hits (fewer than ``k`` rows reachable) have row
            ``-1`` and score ``-inf``.
        """
        if hasattr(self.faiss_index, "nprobe"):
            self.faiss_index.nprobe = nprobe or self.config.nprobe
        q = -queries.double().cpu().numpy()  # (Q, D): max ⟨-q̃, g̃⟩
        wide = np.zeros((q.shape[0], self.width), dtype=np.float32)
        wide[:, : q.shape[1]] = q  # the augmented coordinates of a query are 0
        scores, rows = self.faiss_index.search(wide, min(k, self.index.n_rows))
        if self.max_norm is not None:  # ‖x' − q'‖² = M² + ‖q‖² − 2⟨x, q⟩
            scores = (self.max_norm**2 + (q**2).sum(axis=1, keepdims=True) - scores) / 2
        s = torch.from_numpy(scores).float()  # (Q, k)
        i = torch.from_numpy(rows).long()  # (Q, k)
        return TopK(i, s.masked_fill(i < 0, float("-inf")))
