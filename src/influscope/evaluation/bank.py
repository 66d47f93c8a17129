"""The validation bank: counterfactual fine-tunes of *your* model, stored once, scored often.

A bank answers "how well does an attribution predict what retraining would do?" for one
fine-tune. It is built from

* a **recipe** ``weights (N,) → trained model``: a deterministic fine-tune in which training
  example ``i`` contributes ``w_i · L_i`` to its batch's loss (``w_i = 0``: dropped). The
  built-in recipe (:mod:`influscope.metagrad.recipe`) fixes one seeded data order over all
  ``N`` rows and filters it per subset, so a counterfactual differs from the full run *only*
  by the dropped rows; a user's own training function with the same signature works too;
* a **measure** ``model → (Q,)``: the query measurements ``f_q(θ)`` whose influence the
  attribution under test estimates (the same ``f`` as :mod:`influscope.tasks`).

Building (:func:`build_bank`) runs

1. the full fine-tune twice (``w = 1``) and compares the two measurements: a recipe that is
   not deterministic is refused, naming the likely cause (dropout with ``p > 0``,
   nondeterministic CUDA kernels, unseeded randomness), before any subset is retrained;
2. for each drop fraction ``k`` in :attr:`BankConfig.fractions` and each ``j < m``, the fine-tune
   without the subset ``D_{k,j}`` of ``round(k N)`` rows, drawn by :func:`drop_sets`
   (deterministic in ``(seed, k, j)`` alone), storing its ``(Q,)`` measurement.

The bank is a stage (``BANK/bank/<name>``) of the stage runner (:mod:`influscope.engine.stage`):
its ``meta.json`` holds the config and the fingerprints of base model, data, queries and
recipe, a stored bank is loaded when they match and refused with
:class:`~influscope.errors.StaleArtifactError` when they do not (before any training); every
finished retrain is kept in the partial store ``BANK/bank/.<name>.partial`` so a killed build
resumes, and under ``torchrun`` rank ``r`` trains the subsets ``j ≡ r (mod world)`` (the two
full runs go to ranks 0 and 1) and an all-reduce gathers the measurements. Nothing is written
for a recipe found nondeterministic or a refused configuration.

Scoring an attribution against a bank is :mod:`.bank_score`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from influscope.config import Settings, require
from influscope.engine.distributed import all_reduce_, barrier, rank_and_world
from influscope.engine.shards import PartialSums
from influscope.engine.stage import StageSpec, run_stage
from influscope.errors import ConfigError, DataError
from influscope.progress import track
from influscope.storage import RunDirectory
from influscope.storage.atomic import read_json

logger = logging.getLogger(__name__)

__all__ = [
    "Bank",
    "BankConfig",
    "WeightedRecipe",
    "bank_fingerprints",
    "build_bank",
    "diagnose_nondeterminism",
    "drop_count",
    "drop_sets",
    "load_bank",
]

#: ``weights (N,) float64 → trained model``; ``w_i = 0`` drops training example ``i``.
WeightedRecipe = Callable[[torch.Tensor], nn.Module]
#: ``trained model → (Q,)`` query measurements.
Measure = Callable[[nn.Module], torch.Tensor]

KIND = "bank"
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class BankConfig(Settings):
    """Which counterfactual fine-tunes a bank holds.

    Attributes:
        fractions: Leave-``k``-out drop fractions; each drops ``round(k · N)`` training rows,
            which must be at least 1 and fewer than ``N`` (checked against ``N`` by
            :func:`drop_count`). Default 1 %, 5 % and 50 %.
        subsets: ``m``, subsets per fraction (≥ 3: the LDS is a Spearman correlation over
            them). Default 8.
        seed: Seed of the subset draws (``D_{k,j}`` depends only on ``seed``, the number of
            dropped rows and ``j``, so adding a fraction leaves the others' subsets alone).
        tolerance: Largest allowed ``|f_a − f_b| / max(1, |f_a|)`` between the two full runs
            of the determinism check (default 0: bit-identical).
    """

    fractions: tuple[float, ...] = (0.01, 0.05, 0.5)
    subsets: int = 8
    seed: int = 0
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(float(k) for k in self.fractions))
        require(
            len(self.fractions) > 0 and all(0 < k < 1 for k in self.fractions),
            f"fractions must be drop shares in (0, 1), received {self.fractions}.",
        )
        require(
            len(set(self.fractions)) == len(self.fractions),
            f"fractions must be distinct, received {self.fractions}.",
        )
        require(
            self.subsets >= 3,
            f"subsets must be ≥ 3 (LDS is a rank correlation over them), received {self.subsets}.",
        )
        require(self.tolerance >= 0, f"tolerance must be ≥ 0, received {self.tolerance}.")


def drop_count(fraction: float, n_train: int) -> int:
    """``round(fraction · N)``, the rows a leave-``fraction``-out subset drops.

    Raises:
        ConfigError: Fewer than 1 row would be dropped, or all ``N`` of them.
    """
    n_drop = round(fraction * n_train)
    if n_drop < 1:
        raise ConfigError(
            f"Drop fraction {fraction} of N = {n_train} training rows removes {n_drop} rows "
            f"(round({fraction} × {n_train})); a counterfactual must remove at least one. Use a "
            f"fraction ≥ {0.5 / n_train:.3g} (1 row), or more training data."
        )
    if n_drop >= n_train:
        raise ConfigError(
            f"Drop fraction {fraction} of N = {n_train} training rows removes all {n_drop} of "
            f"them: nothing would be left to train on. Use a fraction ≤ "
            f"{(n_train - 1) / n_train:.3g} (N − 1 rows)."
        )
    return n_drop


def drop_sets(n_train: int, config: BankConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank's dropped subsets: ``(S, N)`` 0/1 drop masks and ``(S,)`` fraction index.

    Subset ``j`` of fraction ``k`` drops ``round(k N)`` distinct rows drawn with
    ``numpy.random.default_rng([seed, round(k N), j])``; rows ``j·|fractions| …`` follow the
    order of :attr:`BankConfig.fractions`, ``m`` subsets each.

    Raises:
        ConfigError: A fraction drops fewer than one row or all of them (before any work).
    """
    counts = [drop_count(k, n_train) for k in config.fractions]  # all checked first
    masks = np.zeros((len(counts) * config.subsets, n_train), dtype=np.float64)
    which = np.zeros(len(counts) * config.subsets, dtype=np.int64)
    for f, n_drop in enumerate(counts):
        for j in range(config.subsets):
            rng = np.random.default_rng([config.seed, n_drop, j])
            row = f * config.subsets + j
            masks[row, rng.choice(n_train, size=n_drop, replace=False)] = 1.0
            which[row] = f
    return torch.from_numpy(masks), torch.from_numpy(which)  # (S, N), (S,)


@dataclass
class Bank:
    """A built validation bank.

    Attributes:
        config: What it holds.
        dropped: ``(S, N)`` 0/1 masks of the dropped rows (``S = |fractions| · m``).
        fraction_index: ``(S,)`` position of each subset's fraction in ``config.fractions``.
        full: ``(Q,)`` measurement of the full fine-tune ``f_q(θ)``.
        measured: ``(S, Q)`` measurement of each counterfactual fine-tune ``f_q(θ_{−D_s})``.
        fingerprints: ``{"model", "data", "queries", "recipe"}`` the bank was built for.
        repeat_gap: Largest relative gap between the two full runs (0 when bit-identical).
    """

    config: BankConfig
    dropped: torch.Tensor
    fraction_index: torch.Tensor
    full: torch.Tensor
    measured: torch.Tensor
    fingerprints: dict[str, Any] = field(default_factory=dict)
    repeat_gap: float = 0.0

    @property
    def n_train(self) -> int:
        return int(self.dropped.shape[1])

    @property
    def n_queries(self) -> int:
        return int(self.full.shape[0])

    def of_fraction(self, f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, N)`` drop masks and ``(m, Q)`` measurements of fraction ``config.fractions[f]``."""
        rows = self.fraction_index == f
        return self.dropped[rows], self.measured[rows]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "dropped": self.dropped.to(torch.uint8).contiguous(),
            "fraction_index": self.fraction_index.contiguous(),
            "full": self.full.contiguous(),
            "measured": self.measured.contiguous(),
        }


def fingerprint_text(text: str) -> str:
    """A short SHA-256 digest of a string (recipe descriptions, user tags)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def bank_fingerprints(
    model: nn.Module,
    data: Any,
    queries: Any,
    recipe: Settings | dict[str, Any] | str,
) -> dict[str, str]:
    """The ``fingerprints`` of :func:`build_bank` for a base model, data and queries.

    Args:
        model: The base model before fine-tuning (every parameter enters through an evenly
            strided sample, :func:`~influscope.storage.fingerprint.model_fingerprint`).
        data: The training set (an ``EncodedDataset``, or a string fingerprint).
        queries: The queries (an ``EncodedDataset``, or a string fingerprint).
        recipe: The recipe's settings (a ``Settings`` dataclass or dict), or a description of
            a user's training function that changes whenever it does.

    ``data`` and ``queries`` are fingerprinted exactly as a scores stage records them, so a
    stored attribution run can be checked against the bank.
    """
    from influscope.storage.fingerprint import model_fingerprint

    def fp(x: Any) -> str:
        return x if isinstance(x, str) else x.fingerprint()

    if isinstance(recipe, Settings):
        recipe = recipe.to_dict()
    text = recipe if isinstance(recipe, str) else json.dumps(recipe, sort_keys=True, default=str)
    return {
        "model": model_fingerprint(model, []),
        "data": fp(data),
        "queries": fp(queries),
        "recipe": fingerprint_text(text),
    }


def _expected(config: BankConfig, n_train: int, fingerprints: dict[str, Any]) -> dict[str, Any]:
    missing = sorted({"model", "data", "queries", "recipe"} - set(fingerprints))
    if missing:
        raise ConfigError(
            f"fingerprints must name the base model, data, queries and recipe the bank is built "
            f"for; missing {missing}. Use influscope.evaluation.bank_fingerprints(...) or pass "
            "strings that change whenever those do."
        )
    # as JSON reads it back (tuples become lists), so a stored bank compares equal
    return json.loads(
        json.dumps({"config": config.to_dict(), "n_train": n_train, **fingerprints}, default=str)
    )


def _spec(run: RunDirectory | None, name: str, expected: dict[str, Any]) -> StageSpec[Bank]:
    fix = (
        "Build a new bank with another --bank directory or --name, or pass overwrite=True "
        "(CLI: --overwrite) to rebuild this one."
    )

    def load(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Bank:
        return Bank(
            config=BankConfig.from_dict(
                {**meta["config"], "fractions": tuple(meta["config"]["fractions"])}
            ),
            dropped=tensors["dropped"].double(),
            fraction_index=tensors["fraction_index"],
            full=tensors["full"],
            measured=tensors["measured"],
            fingerprints={k: meta[k] for k in ("model", "data", "queries", "recipe")},
            repeat_gap=float(meta.get("repeat_gap", 0.0)),
        )

    return StageSpec(
        run,
        KIND,
        name,
        expected,
        load=load,
        dump=lambda bank: (bank.tensors(), {"repeat_gap": bank.repeat_gap}),
        fix=fix,
    )


def load_bank(bank_dir: str | Path, name: str = "bank") -> Bank:
    """Read a stored bank without checking it against a model (scoring checks the scores).

    Raises:
        DataError: No bank ``name`` under ``bank_dir``.
    """
    run = RunDirectory(bank_dir)
    if not run.exists(KIND, name):
        raise DataError(
            f"No validation bank {name!r} under {bank_dir} (expected "
            f"{run.stage_dir(KIND, name)}/meta.json). Build it first: `influscope validate "
            f"build --bank {bank_dir} ...`, or pass the --bank / --name it was built with."
        )
    meta = read_json(run.stage_dir(KIND, name) / "meta.json")
    expected = {k: meta[k] for k in ("config", "n_train", "model", "data", "queries", "recipe")}
    return _spec(run, name, expected).read()


def diagnose_nondeterminism(model: nn.Module) -> list[str]:
    """Likely causes of two runs of a fine-tune differing, read off the trained model.

    Looks for ``nn.Dropout`` modules (and ``*dropout*`` / ``*pdrop*`` config fields) with
    ``p > 0``, and for parameters on CUDA while ``torch.are_deterministic_algorithms_enabled()``
    is false. Returns one sentence per cause found (empty when none is visible: then the
    recipe itself draws unseeded randomness).
    """
    causes = []
    drop = [n for n, m in model.named_modules() if isinstance(m, _DROPOUT) and m.p > 0]
    cfg = getattr(model, "config", None)
    fields = {}
    if cfg is not None and hasattr(cfg, "to_dict"):
        fields = {
            k: v
            for k, v in cfg.to_dict().items()
            if ("dropout" in k or "pdrop" in k) and isinstance(v, float) and v > 0
        }
    if drop or fields:
        shown = ", ".join(drop[:4]) + (f" (+{len(drop) - 4} more)" if len(drop) > 4 else "")
        causes.append(
            "dropout is on (p > 0"
            + (f" in modules {shown}" if drop else "")
            + (f"; config {fields}" if fields else "")
            + "): set every dropout probability to 0 (e.g. config.*_pdrop / *_dropout = 0.0) "
            "or train with model.eval()"
        )
    on_cuda = any(p.is_cuda for p in model.parameters())
    if on_cuda and not torch.are_deterministic_algorithms_enabled():
        causes.append(
            "nondeterministic CUDA kernels: torch.are_deterministic_algorithms_enabled() is "
            "False; call torch.use_deterministic_algorithms(True) and set "
            "CUBLAS_WORKSPACE_CONFIG=:4096:8 before training"
        )
    return causes


def _measure(recipe: WeightedRecipe, measure: Measure, weights: torch.Tensor):
    model = recipe(weights)
    with torch.no_grad():
        values = measure(model).detach().double().reshape(-1).cpu()  # (Q,)
    return model, values


def _full_runs(
    recipe: WeightedRecipe,
    measure: Measure,
    n_train: int,
    store: PartialSums | None,
    config: BankConfig,
    keep_full: Callable[[nn.Module], None] | None,
) -> tuple[torch.Tensor, float]:
    """The two full runs (ranks 0 and 1 in parallel when there are two), compared."""
    rank, world = rank_and_world()
    ones = torch.ones(n_train, dtype=torch.float64)  # (N,)
    runs = [None, None]
    causes: list[str] = []
    first: nn.Module | None = None
    live = False  # a dropout module left in training mode
    for r in range(2):
        if r % world != rank:
            continue
        got = store.get("full", r) if store is not None else None
        if got is not None:
            runs[r] = got["measured"]
            continue
        model, values = _measure(recipe, measure, ones)
        causes = diagnose_nondeterminism(model) or causes
        live = live or any(
            isinstance(m, _DROPOUT) and m.p > 0 and m.training for m in model.modules()
        )
        if r == 0 and keep_full is not None:
            first = model  # handed to keep_full only once the runs agree
        del model
        runs[r] = values
    q = max((v.numel() for v in runs if v is not None), default=0)
    if world > 1:  # ranks beyond 1 made no full run: take Q from those that did
        width = torch.tensor([q], dtype=torch.float64)
        torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)
        q = int(width)
    both = torch.zeros(2, q, dtype=torch.float64)  # (2, Q)
    for r in range(2):
        if runs[r] is not None:
            both[r] = runs[r]
    if world > 1:  # every run was made on exactly one rank
        all_reduce_(both)
    a, b = both[0], both[1]
    gap = float(((a - b).abs() / a.abs().clamp_min(1.0)).max()) if q else 0.0
    if not gap <= config.tolerance:  # also catches NaN
        if store is not None:
            store.clear()  # leave nothing of a refused bank behind
        found = causes or [
            "no dropout or CUDA found in the trained model, so the recipe itself draws "
            "unseeded randomness (data order, initialisation, sampling): seed every "
            "generator inside it, from a fixed seed, on every call"
        ]
        raise ConfigError(
            f"The fine-tune recipe is not deterministic: two full runs on the same data give "
            f"query measurements that differ by up to {gap:.3g} (relative; tolerance "
            f"{config.tolerance}). A counterfactual bank needs identical runs, so that a "
            f"retrain differs from the full run only by the dropped rows. Likely cause: "
            + "; ".join(found)
            + ". Nothing was stored."
        )
    if live:  # identical runs, but seeded dropout masks still shift with the dropped rows
        logger.warning(
            "the two full runs agree, but the trained model has dropout in training mode: "
            "with seeded masks a counterfactual also changes every later mask; prefer p = 0"
        )
    if first is not None:
        keep_full(first)  # type: ignore[misc]
    if store is not None:
        for r in range(2):
            if runs[r] is not None and r % world == rank:
                store.put("full", r, {"measured": runs[r]})
    return a, gap


def build_bank(
    recipe: WeightedRecipe,
    measure: Measure,
    n_train: int,
    fingerprints: dict[str, Any],
    config: BankConfig | None = None,
    bank_dir: str | Path | None = None,
    name: str = "bank",
    overwrite: bool = False,
    keep_full: Callable[[nn.Module], None] | None = None,
) -> Bank:
    """Build (or load, or resume) a validation bank.

    Args:
        recipe: ``weights (N,) → trained model`` (``w_i ∈ {0, 1}`` here; 0 = dropped). Must be
            deterministic: two calls with the same weights must give the same model.
        measure: ``model → (Q,)`` query measurements.
        n_train: ``N``, the training rows the recipe's weights run over.
        fingerprints: ``{"model", "data", "queries", "recipe"}``: strings (or JSON values) that
            change whenever the base model, training data, queries or recipe settings do
            (:func:`influscope.evaluation.bank_fingerprints` computes them).
        config: The subsets (default :class:`BankConfig`).
        bank_dir: Where the bank is stored (``None``: in memory, nothing resumable).
        name: Stage name (``BANK/bank/<name>``).
        overwrite: Rebuild even when a bank is stored (a stale one is then replaced).
        keep_full: Called with the first full-run model (e.g. to save it for scoring).

    Returns:
        The :class:`Bank`.

    Raises:
        ConfigError: A fraction drops fewer than one row or all of them; the recipe is not
            deterministic (the cause is named). Either leaves nothing stored.
        StaleArtifactError: A bank stored under ``name`` was built for another model, data,
            queries, recipe or config (raised before any training).
    """
    config = config or BankConfig()
    if n_train < 2:
        raise ConfigError(f"A bank needs at least 2 training rows, received N = {n_train}.")
    dropped, which = drop_sets(n_train, config)  # refuses bad fractions before any work
    expected = _expected(config, n_train, fingerprints)
    run = RunDirectory(bank_dir) if bank_dir is not None else None
    spec = _spec(run, name, expected)

    def compute(store: PartialSums | None) -> Bank:
        full, gap = _full_runs(recipe, measure, n_train, store, config, keep_full)
        rank, world = rank_and_world()
        measured = torch.zeros(dropped.shape[0], full.numel(), dtype=torch.float64)  # (S, Q)
        own = [s for s in range(dropped.shape[0]) if s % world == rank]
        for s in track(own, desc="bank retrains", unit="retrain"):
            got = store.get("subset", s) if store is not None else None
            if got is None:
                weights = 1.0 - dropped[s]  # (N,)
                _, values = _measure(recipe, measure, weights)
                if values.shape != full.shape:
                    raise ConfigError(
                        f"The measure returned {values.numel()} values for subset {s} but "
                        f"{full.numel()} for the full run: it must measure the same queries "
                        "every time."
                    )
                got = {"measured": values}
                if store is not None:
                    store.put("subset", s, got)
            measured[s] = got["measured"]
        all_reduce_(measured)  # each subset was trained on exactly one rank
        barrier()
        return Bank(config, dropped, which, full, measured, dict(fingerprints), gap)

    return run_stage(spec, compute, overwrite)
