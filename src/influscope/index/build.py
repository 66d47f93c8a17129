"""Building a projected gradient index (resumable, sharded across ranks) and querying it.

:func:`build_index` runs three steps, each resumable after a crash:

1. the projections: LoGra (seeded orthogonal or Gaussian, or PCA of given K-FAC factors), or
   the selection of EK-FAC eigen-coordinates (``init="eigen"``, from given EK-FAC factors);
2. the projected curvature — EK-FAC fitted on the *projected* activations and output gradients
   (``Ã = P_in A P_in^⊤``, ``S̃ = P_out S P_out^⊤``, eigenvalues refitted on projected
   per-sequence gradients), its statistics passes split into shards whose partial sums are saved;
   with ``init="eigen"`` no pass is needed: the given EK-FAC is diagonal on the kept coordinates;
3. the projected training gradients, one ``.npy`` shard per ``shard_size`` sequences; shard ``k``
   is written by rank ``k mod world`` and skipped when it already exists.

:func:`query_index` computes the queries' preconditioned projected gradients
``(F̃ + λI)^{-1} g̃_q`` and scores them against the stored rows (chunked top-k).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from influscope.config import FitConfig
from influscope.curvature.base import CurvatureOperator
from influscope.curvature.registry import CURVATURES
from influscope.curvature.run import fit_curvature
from influscope.engine.distributed import barrier, rank_and_world
from influscope.engine.shards import PartialSums
from influscope.errors import ConfigError, StaleArtifactError
from influscope.index.config import IndexConfig
from influscope.index.store import GradientIndex, TopK, shard_path, to_storage, write_shard
from influscope.index.trackstar import (
    SCALE_FILE,
    adam_scales,
    scaled_gradients,
    scales_fingerprint,
    unit_rows,
)
from influscope.modules.passes import compute_dtype, layer_passes, model_device
from influscope.modules.tracked import TrackedModel
from influscope.projection import EigenSelection, LograProjector, projector_from_tensors
from influscope.storage import atomic_write_json, atomic_write_tensors, model_fingerprint
from influscope.storage.atomic import read_json, read_tensors
from influscope.storage.fingerprint import operator_fingerprint
from influscope.storage.run import check_writable, differences
from influscope.tasks.data import EncodedDataset


def gradient_layout(projector: LograProjector | EigenSelection) -> list[dict]:
    """Where each layer's projected gradient sits in a flat index row: ``[{name, offset, size}]``."""
    out, offset = [], 0
    for name in projector.layer_names:
        entry = {"name": name, "size": projector.size(name), "offset": offset}
        if isinstance(projector, LograProjector):
            entry["k_out"], entry["k_in"] = projector.shape(name)
        out.append(entry)
        offset += entry["size"]
    return out


def flatten(grads: dict[str, torch.Tensor], layout: list[dict]) -> torch.Tensor:
    """``{layer: (B, k_out, k_in) or (B, K_ℓ)}`` → ``(B, D)`` in the index's layer order."""
    return torch.cat([grads[e["name"]].flatten(1) for e in layout], dim=1)


def build_index(
    tracked: TrackedModel,
    train: EncodedDataset,
    root: str | Path,
    config: IndexConfig | None = None,
    factors: CurvatureOperator | None = None,
    overwrite: bool = False,
    second_moments: dict[str, torch.Tensor] | None = None,
) -> GradientIndex:
    """Write (or resume, or reuse) the projected gradient index of ``train`` under ``root``.

    Args:
        tracked: The model, the task that defines its training loss, and the tracked layers.
        train: Training sequences (row ``m`` of the index is ``train.examples[m]``).
        root: The index directory (``RUN/index/<name>``).
        config: Projection, curvature and storage settings.
        factors: A fitted K-FAC/EK-FAC operator (only for ``init="pca"`` and ``"eigen"``).
        overwrite: Discard an existing index built from a different model/data/config.
        second_moments: Adam's ``exp_avg_sq`` by parameter name, for ``optimizer="adam"``
            (:func:`influscope.index.trackstar.load_adam_moments`).

    Raises:
        StaleArtifactError: An index built from something else exists and ``overwrite`` is off.
        StorageError: ``root`` cannot be written.
        ConfigError: ``init`` is ``"pca"`` or ``"eigen"`` and no ``factors`` are given, or
            ``optimizer="adam"`` and no ``second_moments``.
        DataError: ``second_moments`` lacks a tracked layer's weight or bias.
    """
    model, task, layers = tracked.model, tracked.task, list(tracked.layers)
    config = config or IndexConfig()
    root = Path(root)
    rank, _ = rank_and_world()
    layers = list(layers)
    expected = {
        "config": config.fingerprint_dict(),
        "model": model_fingerprint(model, layers),
        "data": train.fingerprint(),
        "layers": [layer.name for layer in layers],
    }
    if config.init in ("pca", "eigen"):
        if factors is None:
            raise ConfigError(
                f"init={config.init!r} derives the projection from fitted K-FAC/EK-FAC factors, "
                "but none were given. Fit them first and pass factors=... (CLI: `influscope fit "
                "--curvature ekfac`, then `influscope index --init "
                f"{config.init} --factors <stage>`), or use init='orthogonal'."
            )
        expected["factors"] = operator_fingerprint(factors)
    scales = None
    if config.optimizer == "adam":
        if second_moments is None:
            raise ConfigError(
                "optimizer='adam' scales gradients by Adam's second moments, but none were "
                "given. Pass second_moments=load_adam_moments('checkpoint/optimizer.pt', model) "
                "(CLI: --optimizer-state PATH), or use optimizer='none'."
            )
        scales = adam_scales(layers, second_moments, config.adam_eps)  # {layer: (out, in)}
        expected["optimizer_scale"] = scales_fingerprint(scales)
    if (root / "meta.json").is_file():  # every rank checks before rank 0 writes anything
        meta = read_json(root / "meta.json")
        diffs = [k for k, v in expected.items() if meta.get(k) != v]
        if diffs and not overwrite:
            changed = "; ".join(differences({k: meta.get(k) for k in diffs}, expected))
            raise StaleArtifactError(
                f"The index in {root} was built with a different {', '.join(diffs)} "
                f"({changed}). Refusing to reuse it. Pass --overwrite (Python: overwrite=True) "
                "to rebuild it, or --name OTHER to build a second index beside it."
            )
        if diffs and rank == 0:
            shutil.rmtree(root)
    if rank == 0:
        check_writable(root, "index directory")  # before any pass (StorageError)
    barrier()

    # 1. projections
    if (root / "projector.safetensors").is_file():
        projector = projector_from_tensors(
            config.init, read_tensors(root / "projector.safetensors")
        )
    elif config.init == "eigen":
        budget = sum(min(config.k_out, t.out_dim) * min(config.k_in, t.in_dim) for t in layers)
        projector = EigenSelection.from_operator(factors, layers, budget, compute_dtype(model))
    elif config.init == "pca":
        projector = LograProjector.pca(factors, layers, config.k_in, config.k_out)
    elif config.init == "orthogonal":
        projector = LograProjector.orthogonal(layers, config.k_in, config.k_out, config.seed)
    else:
        projector = LograProjector.gaussian(layers, config.k_in, config.k_out, config.seed)
    layout = gradient_layout(projector)
    shards = [
        (s, min(s + config.shard_size, len(train))) for s in range(0, len(train), config.shard_size)
    ]
    if rank == 0 and not (root / "meta.json").is_file():
        atomic_write_tensors(root / "projector.safetensors", projector.tensors())
        if scales is not None:
            atomic_write_tensors(root / SCALE_FILE, scales)
        dim = layout[-1]["offset"] + layout[-1]["size"]
        meta = {**expected, "layout": layout, "dim": dim, "shards": shards}
        atomic_write_json(root / "meta.json", {**meta, "n_examples": len(train)})
    barrier()
    projector = projector.to(model_device(model))  # once, not per batch and layer

    # 2. projected curvature
    operator = _projected_curvature(tracked, train, root, config, projector, expected)

    # 3. projected training gradients, one shard at a time
    for k, (start, end) in enumerate(shards):
        if k % rank_and_world()[1] != rank or shard_path(root, k).is_file():
            continue
        rows = []
        for _, grads, _ in layer_passes(
            model,
            task,
            layers,
            train.subset(range(start, end)),
            batch_size=config.batch_size,
            objective="loss",
            desc=f"index shard {k + 1}/{len(shards)}",
        ):
            g = (
                scaled_gradients(projector, grads, scales)
                if scales is not None
                else projector.gradients(grads)
            )  # {layer: (B, k_out, k_in) or (B, K_ℓ)}
            rows.append(flatten(g, layout).float().cpu())  # (B, D)
        rows = torch.cat(rows)  # (n_k, D)
        rows = unit_rows(rows) if config.normalize else rows
        write_shard(shard_path(root, k), to_storage(rows, config.dtype))
    barrier()
    del operator
    return GradientIndex(root)


def _projected_curvature(tracked, train, root, config, projector, expected):
    path = root / "curvature.safetensors"
    stored = path.is_file()
    # Every rank looks before any rank can write: rank 0 writes the eigen operator without a
    # collective step, so a rank arriving later would otherwise see the file, skip the barrier
    # below, and pair its next barrier with this one (then read the index before rank 0's
    # shards exist).
    barrier()
    if stored:
        return load_curvature(root)
    if isinstance(projector, EigenSelection):  # diagonal on the kept eigen-coordinates
        if rank_and_world()[0] == 0:
            _save_curvature(root, projector.operator())
        barrier()
        return load_curvature(root)
    fit = FitConfig(
        curvature=config.curvature,
        fisher=config.fisher,
        damping_factor=config.damping_factor,
        batch_size=config.batch_size,
        shard_size=config.shard_size,
        cache_mb=config.cache_mb,
        seed=config.seed,
    )
    store = PartialSums(root / ".partial", expected)
    op, _ = fit_curvature(
        tracked,
        train,
        fit,
        store=store,
        wrap=projector.wrap,
        fit_layers=projector.layers(list(tracked.layers)),
        desc_prefix="projected ",
    )
    if rank_and_world()[0] == 0:
        _save_curvature(root, op)
    store.clear()
    barrier()
    return load_curvature(root)


def _save_curvature(root: Path, op: CurvatureOperator) -> None:
    atomic_write_tensors(root / "curvature.safetensors", op.tensors())
    meta = read_json(root / "meta.json")
    atomic_write_json(root / "meta.json", {**meta, "operator": op.name, "damping": op.damping})


def load_curvature(root: str | Path) -> CurvatureOperator:
    """The projected curvature stored with an index."""
    root = Path(root)
    meta = read_json(root / "meta.json")
    op_cls = CURVATURES[meta.get("operator", meta["config"]["curvature"])].operator
    damping = meta.get("damping", {e["name"]: 0.0 for e in meta["layout"]})
    path = root / "curvature.safetensors"
    return op_cls.from_tensors(read_tensors(path) if path.is_file() else {}, damping)


def preconditioned_queries(
    tracked: TrackedModel,
    queries: EncodedDataset,
    index: GradientIndex,
    batch_size: int = 8,
) -> torch.Tensor:
    """``(F̃ + λI)^{-1} g̃_q`` for every query, flattened in the index layout: ``(Q, D)``.

    Raises:
        StaleArtifactError: If the index was built from another model or other layers.
    """
    model, task, layers = tracked.model, tracked.task, list(tracked.layers)
    if index.meta["model"] != model_fingerprint(model, list(layers)):
        raise StaleArtifactError(
            f"The index in {index.root} was built from a different model (fingerprint "
            f"{index.meta['model']}, now {model_fingerprint(model, list(layers))}). Rebuild it "
            "with `influscope index --overwrite`, or load the model it was built from."
        )
    projector = projector_from_tensors(
        index.meta["config"]["init"], read_tensors(index.root / "projector.safetensors")
    ).to(model_device(model))
    operator = load_curvature(index.root)
    layout = index.meta["layout"]
    scales = None
    if index.meta["config"].get("optimizer", "none") == "adam":
        scales = read_tensors(index.root / SCALE_FILE)  # {layer: (out, in)}
    out = []
    for _, grads, _ in layer_passes(
        model, task, layers, queries, batch_size=batch_size, objective="measurement",
        desc="query gradients",
    ):  # fmt: skip
        g = (
            scaled_gradients(projector, grads, scales)
            if scales is not None
            else projector.gradients(grads)
        )  # {layer: (B, k_out, k_in) or (B, K_ℓ)}
        pre = {n: operator.precondition(n, v.to(_dtype(operator, n, v))) for n, v in g.items()}
        out.append(flatten(pre, layout).float().cpu())
    q = torch.cat(out)  # (Q, D)
    return unit_rows(q) if index.meta["config"].get("normalize", False) else q


def _dtype(operator: CurvatureOperator, name: str, g: torch.Tensor) -> torch.dtype:
    q = getattr(operator, "q_a", {}).get(name)
    return torch.float64 if q is not None and q.dtype == torch.float64 else g.dtype


def query_index(
    tracked: TrackedModel,
    queries: EncodedDataset,
    index: GradientIndex,
    k: int = 10,
    candidates: list[list[int]] | None = None,
    batch_size: int = 8,
) -> TopK:
    """Top-``k`` training sequences of each query from the index (see :meth:`GradientIndex.search`)."""
    q = preconditioned_queries(tracked, queries, index, batch_size)
    return index.search(q, k=k, candidates=candidates)
