"""Two gloo processes give the same factors and scores as one process.

Each rank runs the same :class:`~influscope.Influence` code under ``torch.distributed``: the
statistics passes deal their shards to ranks and all-reduce the sums; the score pass scores each
rank's batches and all-reduces the ``(Q, N, L)`` matrix. Rank 0 writes what it got to disk and
the test compares it with a single-process run (float64, so tolerances are tight).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.index import IndexConfig, build_index, preconditioned_queries
from influscope.storage import atomic_write_tensors, read_tensors

WORLD = 2
FIT = FitConfig(curvature="ekfac", batch_size=3, shard_size=3)


def _run(run_dir: Path) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    model = tiny_gpt2(n_embd=16)
    train = random_lm_data(17, seed=1)  # 6 batches of 3 → shards dealt unevenly is fine
    queries = random_lm_data(3, seed=2, prompt_len=2)
    inf = Influence(model, "causal_lm", modules="mlp", run_dir=run_dir, device="cpu")
    op = inf.fit(train, FIT)
    scores = inf.score(
        queries, train, op, ScoreConfig(query_rank=None, per_layer=True), self_influence=True
    )
    # Eigenvectors are defined up to sign: compare the damped curvature G + λI itself.
    out = {f"curvature::{n}": op.dense(n) for n in inf.layer_names}
    out["pairwise"] = scores.pairwise
    out["per_layer"] = scores.per_layer
    out["self_influence"] = scores.self_influence
    # index shards are dealt to ranks (shard k on rank k mod 2) and written by their rank
    cfg = IndexConfig(k_in=8, k_out=8, dtype="float32", batch_size=3, shard_size=4)
    index = build_index(inf.tracked, train, run_dir / "index", cfg)
    out["index_rows"] = index.rows(list(range(len(train))))
    # the eigen-coordinate index from the fitted factors (scores: eigenvector signs cancel)
    cfg = IndexConfig(k_in=8, k_out=8, init="eigen", dtype="float32", batch_size=3, shard_size=4)
    eigen = build_index(inf.tracked, train, run_dir / "eigen", cfg, factors=op)
    q = preconditioned_queries(inf.tracked, queries, eigen)
    out["index_rows_eigen_scores"] = eigen.search(q, k=3, return_all=True)[1]
    return out


def _late(model_device):
    """``model_device`` that makes this rank arrive late at the index's curvature step."""

    def late(model):
        time.sleep(1.0)
        return model_device(model)

    return late


def _worker(rank: int, tmp: str) -> None:
    os.environ["INFLUSCOPE_PROGRESS"] = "0"
    if rank == 1:
        # Rank 0 writes the eigen index's curvature without a collective step; a rank that
        # arrived after the write once skipped a barrier and read the index before rank 0's
        # shards existed ("incomplete: shards [0, 2, 4] are missing"). Make it arrive late.
        import influscope.index.build as build

        build.model_device = _late(build.model_device)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        result = _run(Path(tmp) / "run")
        atomic_write_tensors(Path(tmp) / f"rank{rank}.safetensors", result)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    # `single` fits in its own run directory; the two ranks share `run`.
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    single = _run(tmp_path / "single")
    for rank in range(WORLD):
        got = read_tensors(tmp_path / f"rank{rank}.safetensors")
        assert set(got) == set(single)
        for key, value in single.items():
            tol = 1e-5 if key.startswith("index_rows") else 1e-9  # float32 storage
            torch.testing.assert_close(got[key], value, rtol=tol, atol=tol * 1e-3, msg=key)
    # the distributed fit stored its factors (rank 0) and cleaned up its partial sums
    assert (tmp_path / "run" / "factors" / "factors" / "meta.json").is_file()
    assert not (tmp_path / "run" / "factors" / ".factors.partial").exists()
