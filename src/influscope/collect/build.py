"""What collected gradients are turned into, without another pass over the training data.

* :func:`collected_index` — a :class:`~influscope.index.GradientIndex` (same on-disk format as
  :func:`influscope.index.build_index`) whose row for example ``m`` is its most recently
  collected projected gradient, with identity curvature in the projected space (a preconditioned
  index needs curvature statistics, i.e. a pass; build it with ``build_index`` afterwards).
  When all rows come from one parameter step ``s`` it equals ``build_index(θ_s, …,
  IndexConfig(curvature="identity"))`` on those examples (tested).
* :func:`collected_tracin` — TracIn over the collected steps (Pruthi et al. 2020, the
  per-step "TracIn-ideal" sum restricted to collected steps):

  .. math:: I(q, z) = \\sum_{s:\\ z ∈ B_{s+1}} η_{s+1} \\big(-\\tilde ∇f_q(θ_s)^⊤ \\tilde ∇L(z, θ_s)\\big)

  with projected gradients; ``θ_s`` is the checkpoint of parameter step ``s`` (the training
  rows are read from disk, only the *query* gradients are computed, at each ``θ_s``).
* :func:`recompute_rows` — the same rows recomputed afterwards from a checkpoint (the check
  that the collection is exact, and a fallback).

Trajectory-aware influence (SOURCE, TracIn-CP) reads the saved checkpoints directly:
``influscope.trajectory.from_directory(OUT / "checkpoints")``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from influscope.collect.store import CollectedGradients, checkpoint_dir
from influscope.errors import DataError, StaleArtifactError
from influscope.index.build import flatten
from influscope.index.config import IndexConfig
from influscope.index.store import GradientIndex, shard_path, to_storage, write_shard
from influscope.modules.passes import layer_passes, model_device
from influscope.modules.selection import TrackedLayer, select_layers
from influscope.scoring.pairwise import Scores
from influscope.storage import atomic_write_json, atomic_write_tensors, model_fingerprint
from influscope.tasks.base import Task
from influscope.tasks.data import EncodedDataset

__all__ = ["collected_index", "collected_tracin", "load_checkpoint", "recompute_rows"]


def load_checkpoint(
    root: str | Path, step: int, dtype: torch.dtype = torch.float64, model_class=None
):
    """``θ_step`` saved by a collector (``initial/`` for step 0), in eval mode.

    Raises:
        DataError: No checkpoint of that step was saved.
    """
    folder = checkpoint_dir(root, step)
    if not (folder / "config.json").is_file():
        raise DataError(
            f"No checkpoint of parameter step {step} under {root} (expected {folder}). Collect "
            "with checkpoint_every equal to gradient_every so every collected step has one."
        )
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    return model_class.from_pretrained(folder, dtype=dtype).eval()


def _layers(model: nn.Module, collected: CollectedGradients) -> list[TrackedLayer]:
    return select_layers(model, collected.layer_names)


def recompute_rows(
    model: nn.Module,
    task: Task,
    data: EncodedDataset,
    collected: CollectedGradients | str | Path,
    batch_size: int = 8,
) -> torch.Tensor:
    """Projected per-example training gradients of ``data`` at ``model``: ``(N, D)``.

    Uses the collection's projections and layout, so the rows are comparable with
    :meth:`CollectedGradients.load` of the step whose checkpoint ``model`` is.
    """
    collected = (
        collected if isinstance(collected, CollectedGradients) else CollectedGradients(collected)
    )
    projector = collected.projector().to(model_device(model))
    layers = _layers(model, collected)
    rows = []
    for _, grads, _ in layer_passes(
        model, task, layers, data, batch_size=batch_size, objective="loss", desc="recompute"
    ):
        rows.append(flatten(projector.gradients(grads), collected.layout).cpu())  # (B, D)
    return torch.cat(rows)


def collected_index(
    collected: CollectedGradients | str | Path,
    root: str | Path,
    model: nn.Module | None = None,
    steps: Sequence[int] | None = None,
    dtype: str = "float32",
    shard_size: int = 1024,
    overwrite: bool = False,
) -> GradientIndex:
    """Write a gradient index from collected rows (no pass over the data).

    Row ``m`` of the index is the ``m``-th smallest collected example index (``meta.json``
    ``row_indices``), taken from that example's most recent step among ``steps``
    (``row_steps``). Curvature: identity (scores are projected gradient dot products).

    Args:
        collected: The collection (or its directory).
        root: The index directory to write (``RUN/index/<name>``).
        model: The model queries will be computed with (its fingerprint is recorded, and
            :func:`influscope.index.query_index` refuses other models); default: the
            checkpoint of the newest step used.
        steps: Parameter steps to draw rows from (default: all collected).
        dtype: Storage dtype of the index (``IndexConfig.dtype``).
        shard_size: Rows per shard.
        overwrite: Replace an existing index at ``root``.

    Raises:
        StaleArtifactError: An index exists at ``root`` and ``overwrite`` is off.
        DataError: Nothing collected among ``steps``.
    """
    collected = (
        collected if isinstance(collected, CollectedGradients) else CollectedGradients(collected)
    )
    root = Path(root)
    if (root / "meta.json").is_file():
        if not overwrite:
            raise StaleArtifactError(
                f"An index already exists in {root}. Pass overwrite=True or choose another name."
            )
        shutil.rmtree(root)
    indices, rows, row_steps = collected.latest(list(steps) if steps is not None else None)
    if model is None:
        model = load_checkpoint(collected.root, max(row_steps), torch.float32)
    cfg = collected.meta["config"]
    config = IndexConfig(
        k_in=cfg["k_in"], k_out=cfg["k_out"], init=cfg["init"], seed=cfg["seed"],
        curvature="identity", dtype=dtype, shard_size=shard_size,
    )  # fmt: skip
    layers = _layers(model, collected)
    shards = [(s, min(s + shard_size, len(indices))) for s in range(0, len(indices), shard_size)]
    for k, (start, end) in enumerate(shards):
        write_shard(shard_path(root, k), to_storage(rows[start:end].float(), dtype))
    atomic_write_tensors(root / "projector.safetensors", collected.projector().tensors())
    meta = {
        "config": config.fingerprint_dict(),
        "model": model_fingerprint(model, layers),
        "data": f"collected:{sorted(set(row_steps))[:50]}",
        "layers": collected.layer_names,
        "layout": collected.layout,
        "dim": collected.dim,
        "shards": shards,
        "n_examples": len(indices),
        "operator": "identity",
        "damping": {n: 0.0 for n in collected.layer_names},
        "row_indices": indices.tolist(),
        "row_steps": row_steps,
        "source": str(collected.root),
    }
    atomic_write_json(root / "meta.json", meta)
    return GradientIndex(root)


def collected_tracin(
    collected: CollectedGradients | str | Path,
    task: Task,
    queries: EncodedDataset,
    n_train: int | None = None,
    steps: Sequence[int] | None = None,
    batch_size: int = 8,
    model_class=None,
    dtype: torch.dtype = torch.float64,
) -> Scores:
    """TracIn over the collected steps: ``Σ_s η_{s+1} (−∇̃f_q(θ_s)ᵀ ∇̃L(z, θ_s))`` (Q, N).

    Only the query gradients are computed, once per collected step at its checkpoint
    ``θ_s``; the training gradients are the collected rows. An example not in any collected
    batch scores 0. Sign as everywhere in influscope: positive = the steps on ``z`` raised
    the query's measurement.

    Args:
        collected: The collection (or its directory); needs a checkpoint of every step used.
        task: Defines the query measurement.
        queries: The queries.
        n_train: Number of training examples (columns); default: largest index + 1.
        steps: Parameter steps to sum over (default: all collected).
        batch_size: Queries per pass.
        model_class: Loads a checkpoint folder (default ``AutoModelForCausalLM``).
        dtype: dtype of the loaded checkpoints.

    Raises:
        DataError: A step has no checkpoint, or an index is ≥ ``n_train``.
    """
    collected = (
        collected if isinstance(collected, CollectedGradients) else CollectedGradients(collected)
    )
    chosen = collected.steps if steps is None else sorted(steps)
    loaded = [(s, *collected.load(s)) for s in chosen]
    if not loaded:
        raise DataError(f"No collected steps to sum over under {collected.root}.")
    top = max(int(idx.max()) for _, idx, _, _ in loaded) + 1
    n = top if n_train is None else int(n_train)
    if top > n:
        raise DataError(
            f"Collected example index {top - 1} is ≥ n_train={n}; pass n_train ≥ {top}."
        )
    total = torch.zeros(len(queries), n, dtype=torch.float64)  # (Q, N)
    for s, idx, rows, lr in loaded:
        model = load_checkpoint(collected.root, s, dtype, model_class)
        q = _query_rows(model, task, queries, collected, batch_size)  # (Q, D)
        total.index_add_(1, idx, -lr * (q.double() @ rows.double().t()))  # (Q, B) into columns
    return Scores(pairwise=total, layer_names=collected.layer_names, train_indices=list(range(n)))


def _query_rows(model, task, queries, collected, batch_size) -> torch.Tensor:
    projector = collected.projector().to(model_device(model))
    layers = _layers(model, collected)
    out = []
    for _, grads, _ in layer_passes(
        model, task, layers, queries, batch_size=batch_size, objective="measurement",
        desc="query gradients",
    ):  # fmt: skip
        out.append(flatten(projector.gradients(grads), collected.layout).cpu())
    return torch.cat(out)  # (Q, D)
