"""One pass over a dataset with tracked layers: batches → ``{layer: LayerBatch}``.

Every stage (curvature statistics, query gradients, training gradients) is a pass of this
kind; only the objective differs:

* ``"loss"`` — the per-example training loss, with labels sampled from the model when a
  ``sample_seed`` is given (true Fisher) or the data labels otherwise;
* ``"measurement"`` — the per-example measurement ``f``.

Under ``torch.distributed`` each rank takes every ``world_size``-th batch; the statistics
collectors all-reduce their sums, so the result equals a single-process run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from influscope.engine.distributed import rank_and_world
from influscope.errors import NumericalError
from influscope.modules.capture import Capture, LayerBatch
from influscope.modules.selection import TrackedLayer
from influscope.progress import track
from influscope.tasks.base import Task
from influscope.tasks.data import EncodedDataset, example_seeds


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def compute_dtype(model: nn.Module) -> torch.dtype:
    """float64 for float64 models (oracle tests), float32 otherwise."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; the previous train/eval mode is restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def layer_passes(
    model: nn.Module,
    task: Task,
    layers: Sequence[TrackedLayer],
    data: EncodedDataset,
    *,
    batch_size: int,
    objective: str = "loss",
    sample_seed: int | None = None,
    amp_dtype: torch.dtype | None = None,
    desc: str = "pass",
    shard: bool = False,
    trim_heap: bool = False,
) -> Iterator[tuple[list[int], dict[str, LayerBatch], torch.Tensor]]:
    """Yield ``(positions, {layer name: LayerBatch}, objective values (B,))`` per batch.

    Args:
        model: The model (put in eval mode for the pass; restored afterwards).
        task: Defines the objective.
        layers: Tracked layers.
        data: The examples.
        batch_size: Examples per batch.
        objective: ``"loss"`` or ``"measurement"``.
        sample_seed: With ``objective="loss"``, sample targets from the model with per-example
            seeds derived from this seed and each example's global index.
        amp_dtype: Autocast dtype, or ``None``.
        desc: Progress-bar label.
        shard: Under ``torch.distributed``, process only this rank's batches.
        trim_heap: After each batch, drop this generator's references to it and give the
            freed heap back to the system (:func:`influscope.budget.release_heap`), so that
            freed blocks do not pile up batch after batch; effective when the caller also
            drops its references (``del grads``) before asking for the next batch.

    Raises:
        NumericalError: When an example's objective is NaN/Inf (the message names it).
    """
    device = model_device(model)
    rank, world = rank_and_world() if shard else (0, 1)
    chunks = list(data.batches(batch_size))[rank::world]
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    with eval_mode(model), Capture(layers, task.rows_per_example, compute_dtype(model)) as cap:
        for pos, examples in track(chunks, desc, total=len(chunks)):
            batch = {k: v.to(device) for k, v in task.collate(examples).items()}
            with autocast:
                if objective == "loss":
                    seeds = (
                        example_seeds(sample_seed, [data.indices[p] for p in pos])
                        if sample_seed is not None
                        else None
                    )
                    values = task.training_loss(model, batch, seeds)
                else:
                    values = task.measurement(model, batch)
            bad = ~torch.isfinite(values.detach())
            if bad.any():
                which = [data.indices[p] for p, b in zip(pos, bad.tolist()) if b]
                raise NumericalError(
                    f"The {objective} is NaN/Inf for example(s) {which} (expected finite "
                    "values). Check those inputs, the model weights, and that the loss "
                    "masks leave at least one token."
                )
            grads = cap.backward(
                values.sum(),
                task.token_mask(batch),
                len(pos),
                rows_per_example=task.batch_rows(batch),
            )
            cap.clear()
            yield pos, grads, values.detach()
            if trim_heap:
                from influscope.budget import release_heap  # (budget imports this module)

                del grads, values, batch
                release_heap()


def n_batches(n: int, batch_size: int) -> int:
    """Number of batches of ``batch_size`` in ``n`` examples."""
    return math.ceil(n / batch_size)
