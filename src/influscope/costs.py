"""Measured cost of one batch, behind the time and memory of ``--dry-run``.

A rule of thumb for the activations of an arbitrary model is off by a factor of two either
way, and the process's own footprint (Python, torch, the tokenizer, a dequantised GGUF) is
not a function of the parameter count at all. So ``--dry-run`` measures instead of guessing:

* ``resident``: the memory the process holds now, with the model loaded and the data encoded
  (resident set size on CPU, allocated device memory on an accelerator);
* one batch of the fit's objective, run twice (the first call pays one-off set-up), timed on
  the second: the forward + backward with the captures (``seconds_pass``), the covariance sums
  of that batch (``seconds_cov``), its gradients rotated into an eigenbasis (``seconds_rot``,
  identity bases: the same flops as real ones) and the peak memory above ``resident`` while it
  runs (``batch_peak``);
* one float64 eigendecomposition per distinct factor width, scaled by the number of factors of
  that width (``seconds_eigh``).

:func:`influscope.resources.estimate` turns these into per-stage memory and time.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass

import torch

from influscope.modules.passes import layer_passes, model_device
from influscope.modules.tracked import TrackedModel
from influscope.tasks.data import EncodedDataset

__all__ = ["BatchCost", "measure_batch", "peak_bytes", "reset_peak", "resident_bytes"]


def resident_bytes(device: torch.device | None = None) -> int:
    """Memory in use now: allocated CUDA memory, or this process's resident set size."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import resource  # no /proc: the peak is the best available figure

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak(device: torch.device | None = None) -> bool:
    """Restart the peak-memory counter (CUDA, or Linux ``VmHWM``); whether it could."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the resident high-water mark (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def peak_bytes(device: torch.device | None = None) -> int:
    """Peak memory since :func:`reset_peak` (or since the start, where it cannot reset)."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resident_bytes(device)


@dataclass(frozen=True)
class BatchCost:
    """What one batch of a fit costs here (see the module docstring).

    Attributes:
        resident: Bytes held before the batch (runtime, model, data).
        batch_peak: Peak bytes above ``resident`` during one batch's forward + backward.
        seconds_pass: Seconds of one batch's forward + backward with the captures.
        seconds_cov: Seconds of that batch's covariance sums.
        seconds_rot: Seconds of that batch's per-example gradients in an eigenbasis.
        tokens: Padded tokens of the measured batch (``B × T``), to scale to other batches.
        seconds_eigh: Seconds of every factor's float64 eigendecomposition (all layers).
        batch_size: Sequences in the measured batch.
        device: Where it ran.
    """

    resident: float
    batch_peak: float
    seconds_pass: float
    seconds_cov: float
    seconds_rot: float
    seconds_eigh: float
    batch_size: int
    tokens: int
    device: str


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _statistics(grads: dict, device: torch.device) -> tuple[float, float]:
    """Seconds of the covariance and of the eigenbasis work of one batch (identity bases)."""
    start = _sync(device)
    for lb in grads.values():
        a, s = lb.masked_tokens()  # (N_tok, in), (N_tok, out)
        (a.t() @ a).double()
        (s.t() @ s).double()
    mid = _sync(device)
    for lb in grads.values():
        eye_a = torch.eye(lb.a.shape[-1], dtype=lb.a.dtype, device=lb.a.device)
        eye_s = torch.eye(lb.s.shape[-1], dtype=lb.s.dtype, device=lb.s.device)
        torch.einsum("bto,bti->boi", lb.s @ eye_s, lb.a @ eye_a).square().sum(0).double()
    return mid - start, _sync(device) - mid


def _seconds_eigh(widths: Counter, device: torch.device) -> float:
    """Σ over widths ``d`` of ``count_d ×`` the time of one float64 ``eigh`` of ``d × d``."""
    total = 0.0
    gen = torch.Generator().manual_seed(0)
    for d, count in widths.items():
        x = torch.randn(d, d, dtype=torch.float64, generator=gen).to(device)
        m = x @ x.t() / d  # (d, d) symmetric positive semi-definite
        start = time.perf_counter()
        torch.linalg.eigh(m)
        total += count * (_sync(device) - start)
    return total


def measure_batch(
    tracked: TrackedModel,
    train: EncodedDataset,
    batch_size: int,
    sample_seed: int | None = 0,
    eigh: bool = True,
) -> BatchCost:
    """Run one batch of the fit's objective (the first ``batch_size`` sequences) and time it.

    Args:
        tracked: The model, task and tracked layers.
        train: Training data; only its first batch runs.
        batch_size: Sequences per batch (as the fit will use).
        sample_seed: Seed of sampled labels (true Fisher), or ``None`` for the data labels.
        eigh: Also time the eigendecompositions (K-FAC / EK-FAC).
    """
    device = model_device(tracked.model)
    first = train.subset(list(range(min(batch_size, len(train)))))
    resident = resident_bytes(device)
    can_reset = reset_peak(device)
    seconds_pass = seconds_cov = seconds_rot = 0.0
    tokens = 0
    for _ in range(2):  # the first run pays lazy initialisation; the second is timed
        start = _sync(device)
        passes = layer_passes(
            tracked.model,
            tracked.task,
            tracked.layers,
            first,
            batch_size=batch_size,
            objective="loss",
            sample_seed=sample_seed,
            desc="dry run: one timed batch",
        )
        for _, grads, _ in passes:
            seconds_pass = _sync(device) - start
            seconds_cov, seconds_rot = _statistics(grads, device)
            lb = next(iter(grads.values()))
            tokens = int(lb.a.shape[0] * lb.a.shape[1])
            del grads, lb
    peak = peak_bytes(device) if can_reset else resident_bytes(device)
    widths = Counter(d for layer in tracked.layers for d in (layer.in_dim, layer.out_dim))
    return BatchCost(
        resident=float(resident),
        batch_peak=float(max(peak - resident, 0)),
        seconds_pass=seconds_pass,
        seconds_cov=seconds_cov,
        seconds_rot=seconds_rot,
        seconds_eigh=_seconds_eigh(widths, device) if eigh else 0.0,
        batch_size=len(first),
        tokens=tokens,
        device=str(device),
    )
