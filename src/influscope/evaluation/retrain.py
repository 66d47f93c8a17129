"""The retraining harness: train on index subsets, measure queries, keep every result.

A *recipe* is a plain function ``(training indices, seed) → trained model``; a *measure* maps a
model to the ``(Q,)`` measurements of the queries (the same ``f`` whose influence is scored).
:class:`RetrainingHarness` runs retraining jobs ``(subset, seed)``:

* in parallel worker processes (``workers > 1``; forked, so recipes may be closures),
* saving each job's measurements atomically as ``<out_dir>/retrains/<key>.json`` where ``key``
  hashes the sorted subset and the seed, so an interrupted evaluation resumes where it stopped
  and two protocols that need the same retrain (e.g. the full-data model) share it.

The protocols built on it (leave-one-out, LDS, brittleness) are in :mod:`.counterfactual`.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influscope.errors import ConfigError, DataError, StaleArtifactError
from influscope.storage.atomic import atomic_write_json, read_json

logger = logging.getLogger(__name__)

#: ``(training indices, seed) → trained model``.
Recipe = Callable[[Sequence[int], int], nn.Module]
#: ``model → (Q,)`` query measurements.
Measure = Callable[[nn.Module], torch.Tensor]

MANIFEST = "harness.json"


@dataclass(frozen=True)
class Job:
    """One retraining: train on ``subset`` with ``seed``.

    Attributes:
        subset: Sorted training indices.
        seed: Retraining seed.
    """

    subset: tuple[int, ...]
    seed: int

    @staticmethod
    def make(subset: Sequence[int], seed: int) -> Job:
        return Job(tuple(sorted(int(i) for i in subset)), int(seed))

    @property
    def key(self) -> str:
        """Content hash of the subset and seed (file name of the stored result)."""
        h = hashlib.sha256(f"{self.seed}:".encode())
        h.update(",".join(map(str, self.subset)).encode())
        return h.hexdigest()[:20]


# Worker state, set before the pool forks so that recipes need not be picklable.
_STATE: dict[str, Any] = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run(recipe: Recipe, measure: Measure, job: Job) -> tuple[list[float], float]:
    start = time.perf_counter()
    model = recipe(list(job.subset), job.seed)
    with torch.no_grad():
        values = measure(model).detach().double().reshape(-1).cpu()
    return values.tolist(), time.perf_counter() - start


def _run_forked(job: Job) -> tuple[Job, list[float], float]:
    values, seconds = _run(_STATE["recipe"], _STATE["measure"], job)
    return job, values, seconds


class RetrainingHarness:
    """Runs and stores retraining jobs for one recipe, measure and training-set size.

    Args:
        recipe: ``(training indices, seed) → trained model``.
        measure: ``model → (Q,)`` measurements of the queries.
        n_train: Size ``N`` of the full training set (indices ``0 … N-1``).
        out_dir: Where results are stored (``None``: in memory only).
        workers: Parallel worker processes (``1``: run in this process).
        threads_per_worker: ``torch`` threads in each worker.
        tag: A free-form description of recipe and queries, stored in the manifest; reusing a
            directory with another ``tag`` or ``n_train`` is refused.

    Example:
        >>> harness = RetrainingHarness(recipe, measure, n_train=200, out_dir="runs/lds")  # doctest: +SKIP
        >>> measured = harness.measure_jobs([Job.make(range(100), 0)])  # doctest: +SKIP
    """

    def __init__(
        self,
        recipe: Recipe,
        measure: Measure,
        n_train: int,
        out_dir: str | Path | None = None,
        workers: int = 1,
        threads_per_worker: int = 1,
        tag: str = "",
    ) -> None:
        if n_train < 2:
            raise ConfigError(f"n_train must be ≥ 2, received {n_train}.")
        if workers < 1 or threads_per_worker < 1:
            raise ConfigError(
                f"workers and threads_per_worker must be ≥ 1, received {workers}, "
                f"{threads_per_worker}."
            )
        self.recipe, self.measure = recipe, measure
        self.n_train, self.workers, self.threads = n_train, workers, threads_per_worker
        self.tag = tag
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._memory: dict[str, list[float]] = {}
        self.trained = 0  # retrains run by this object (not loaded from disk)
        if self.out_dir is not None:
            self._check_manifest()

    # --- storage ------------------------------------------------------------------------
    def _check_manifest(self) -> None:
        assert self.out_dir is not None
        path = self.out_dir / MANIFEST
        expected = {"n_train": self.n_train, "tag": self.tag}
        if path.is_file():
            stored = read_json(path)
            diffs = [k for k in expected if stored.get(k) != expected[k]]
            if diffs:
                raise StaleArtifactError(
                    f"{self.out_dir} holds retrains of another setup ({', '.join(diffs)}: stored "
                    f"{[stored.get(k) for k in diffs]}, now {[expected[k] for k in diffs]}). "
                    "Use another out_dir, or delete it to start over."
                )
        else:
            atomic_write_json(path, expected)

    def _path(self, job: Job) -> Path:
        assert self.out_dir is not None
        return self.out_dir / "retrains" / f"{job.key}.json"

    def load(self, job: Job) -> list[float] | None:
        """Stored measurements of a job, or ``None`` when it has not run."""
        if job.key in self._memory:
            return self._memory[job.key]
        if self.out_dir is not None and self._path(job).is_file():
            values = read_json(self._path(job))["measurements"]
            self._memory[job.key] = values
            return values
        return None

    def _store(self, job: Job, values: list[float], seconds: float) -> None:
        self._memory[job.key] = values
        self.trained += 1
        if self.out_dir is not None:
            atomic_write_json(
                self._path(job),
                {
                    "seed": job.seed,
                    "subset": list(job.subset),
                    "measurements": values,
                    "seconds": seconds,
                },
            )

    # --- running ------------------------------------------------------------------------
    def measure_jobs(self, jobs: Sequence[Job]) -> torch.Tensor:
        """Measurements after each job: ``(len(jobs), Q)`` float64 (runs the missing ones).

        Raises:
            DataError: A subset holds an index outside ``0 … N-1`` or is empty.
        """
        for job in jobs:
            if not job.subset or job.subset[0] < 0 or job.subset[-1] >= self.n_train:
                raise DataError(
                    f"A retraining subset must be non-empty with indices in [0, {self.n_train}); "
                    f"received {len(job.subset)} indices spanning "
                    f"{job.subset[:1]}…{job.subset[-1:]}."
                )
        todo = list({job.key: job for job in jobs if self.load(job) is None}.values())
        if todo:
            logger.info("retraining %d of %d jobs", len(todo), len(jobs))
            self._execute(todo)
        rows = [self.load(job) for job in jobs]
        width = {len(r) for r in rows if r is not None}
        if len(width) != 1:
            raise DataError(
                f"Measurements differ in length across retrains ({sorted(width)}): the measure "
                "must return one value per query, the same queries every time."
            )
        return torch.tensor(rows, dtype=torch.float64)  # (J, Q)

    def _execute(self, todo: list[Job]) -> None:
        if self.workers == 1 or len(todo) == 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                for job in todo:
                    values, seconds = _run(self.recipe, self.measure, job)
                    self._store(job, values, seconds)
            finally:
                torch.set_num_threads(threads)
            return
        if "fork" not in mp.get_all_start_methods():
            raise ConfigError(
                "Parallel retraining forks worker processes, which this platform cannot do "
                f"(start methods: {mp.get_all_start_methods()}). Use workers=1."
            )
        _STATE.update(recipe=self.recipe, measure=self.measure)
        try:
            with ProcessPoolExecutor(
                max_workers=min(self.workers, len(todo)),
                mp_context=mp.get_context("fork"),
                initializer=_worker_init,
                initargs=(self.threads,),
            ) as pool:
                futures = [pool.submit(_run_forked, job) for job in todo]
                for fut in as_completed(futures):
                    job, values, seconds = fut.result()
                    self._store(job, values, seconds)  # saved as soon as it finishes
        finally:
            _STATE.clear()

    def full_model_measurement(self, seeds: Sequence[int] = (0,)) -> torch.Tensor:
        """Mean measurement of models trained on all ``N`` sequences: ``(Q,)``."""
        jobs = [Job.make(range(self.n_train), s) for s in seeds]
        return self.measure_jobs(jobs).mean(0)

    def stored(self) -> int:
        """How many job results are stored on disk."""
        if self.out_dir is None:
            return len(self._memory)
        folder = self.out_dir / "retrains"
        return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def default_workers() -> int:
    """Worker processes that fit the CPU cores this process may use (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
