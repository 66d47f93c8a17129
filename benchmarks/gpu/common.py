"""Sizes, timing, device memory and the device choice shared by the GPU check's stages."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")
#: When the check started (the log's clock and the budget's).
START = time.perf_counter()


@dataclass(frozen=True)
class Sizes:
    """Model and data sizes of one benchmark run."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    n_train: int
    seq_len: int
    n_queries: int
    batch_size: int
    query_rank: int


#: ~1.1 B parameters (the TinyLlama shape), 256 × 512 training tokens, 16 queries.
FULL = Sizes(2048, 5632, 22, 32, 4, 32000, 256, 512, 16, 8, 32)
#: Runs end to end on a CPU in seconds.
QUICK = Sizes(64, 176, 3, 4, 2, 512, 16, 64, 4, 4, 8)


# --- small helpers ----------------------------------------------------------------------------
def log(msg: str) -> None:
    """Print a progress line with the time since the script started."""
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], T]) -> tuple[T, float]:
    """``(fn(), seconds)`` with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since :func:`reset_peak`, in GiB (``None`` on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def free_memory(device: torch.device) -> None:
    """Drop cached allocations so that the next stage starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resolve_device(name: str | None) -> torch.device:
    """The benchmark's device: ``name``, else CUDA when available, else the CPU.

    A bare ``"cuda"`` gets the current device's index: ``torch.cuda.set_device`` refuses a CUDA
    device without one (``ValueError: Expected a torch.device with a specified index``).

    Raises:
        SystemExit: A CUDA device is asked for on a machine without CUDA.
    """
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"gpu_check: --device {name} asks for CUDA, but torch {torch.__version__} sees no "
                "CUDA device. Run on a CUDA machine, or pass --device cpu (with --quick)."
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def rate(amount: float, seconds: float | None) -> float | None:
    """``amount / seconds`` or ``None``."""
    return amount / seconds if seconds else None
