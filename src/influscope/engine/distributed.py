"""``torch.distributed`` helpers every stage uses; each is a no-op without a process group.

Ranks split the data (``layer_passes(shard=True)`` deals batches round-robin); sums are
all-reduced (:func:`all_reduce_`); only rank 0 writes to disk, and :func:`barrier` orders the
writes before any rank reads them.
"""

from __future__ import annotations

import torch

__all__ = ["all_reduce_", "barrier", "is_writer", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Whether this process writes shared results (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op without a process group)."""
    if rank_and_world()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()
