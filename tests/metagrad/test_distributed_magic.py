"""Two gloo ranks split MAGIC's queries and give every rank the single-process scores."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from influscope.metagrad import FinetuneConfig, MagicConfig, magic_scores
from influscope.modules.tracked import TrackedModel
from influscope.storage import atomic_write_tensors, read_tensors
from influscope.toy import MLP, VectorClassificationTask, make_classification

WORLD = 2
CONFIG = MagicConfig(
    recipe=FinetuneConfig(epochs=2, lr=0.01, batch_size=3, weight_decay=0.1), query_batch=1
)


def _run() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    data = make_classification(n=7, n_queries=3, seed=2)  # 3 queries: uneven over 2 ranks
    torch.manual_seed(0)
    tracked = TrackedModel.select(MLP(4, 5, 4).double().eval(), VectorClassificationTask(), "all")
    scores = magic_scores(tracked, data.train(), data.queries(), CONFIG)
    return {"pairwise": scores.pairwise, "measurements": scores.measurements}


def _worker(rank: int, tmp: str) -> None:
    os.environ["INFLUSCOPE_PROGRESS"] = "0"
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        atomic_write_tensors(Path(tmp) / f"rank{rank}.safetensors", _run())
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    # forked (not spawned) ranks inherit the imported modules: seconds instead of a minute
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="fork")
    single = _run()
    assert single["pairwise"].abs().min() > 0  # every query scored
    for rank in range(WORLD):
        got = read_tensors(tmp_path / f"rank{rank}.safetensors")
        for key, value in single.items():
            # each query is computed whole on one rank: the same operations, bit for bit
            assert torch.equal(got[key], value), (rank, key)
