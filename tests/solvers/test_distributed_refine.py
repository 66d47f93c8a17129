"""Two gloo ranks give the same refinement, SOURCE, TracIn-CP and ensemble as one process.

The paths of issue 13 under ``torch.distributed``:

* refinement: every rank holds all queries; the Gauss-Newton product deals the training
  examples to ranks (example ``n`` on rank ``n mod 2``) and all-reduces ``Σ_n J_nᵀ H_n J_n v``,
  so every CG / Neumann iterate is the single-process one up to the order of the sum;
* SOURCE and TracIn-CP: per-checkpoint fits and score passes, each distributed as usual;
* the ensemble: one fit and score per label-sampling seed.

Rank 0 and rank 1 each write what they got; the test compares both with a single-process run
in float64 (tolerance 1e-9 relative: only summation order differs). Seven training sequences
in batches of three deal unevenly to the ranks on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.reference import flatten, per_example_gradients
from influscope.solvers import GaussNewtonProduct, refine_queries
from influscope.storage import atomic_write_tensors, read_tensors
from influscope.trajectory import from_models, source_scores, tracin_scores

WORLD = 2
FIT = FitConfig(curvature="ekfac", batch_size=3, shard_size=3)
SCORE = ScoreConfig(query_rank=None, batch_size=3)


def _model(seed: int = 0):
    return tiny_gpt2(n_embd=8, n_layer=1, vocab=16, n_positions=16, seed=seed)


def _run() -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _paths()
    finally:
        torch.set_num_threads(threads)


def _paths() -> dict[str, torch.Tensor]:
    train = random_lm_data(7, vocab=16, min_len=3, max_len=6, seed=1)
    queries = random_lm_data(2, vocab=16, min_len=3, max_len=6, seed=2, prompt_len=1)
    model = _model()
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    factors = inf.fit(train, FIT)
    out: dict[str, torch.Tensor] = {}
    # refinement through the public API: CG over all examples, and over seeded subsets
    for key, extra in (("cg", {}), ("cg_subset", {"refine_examples": 4})):
        cfg = ScoreConfig(query_rank=None, batch_size=3, refine_steps=4, **extra)
        pq = inf.precondition(queries, factors, cfg, train)
        out[f"refine_{key}"] = flatten(pq.dense, inf.layers)  # (Q, P)
        out[f"refine_{key}_residuals"] = pq.refine_residuals  # (Q, 5)
        out[f"refine_{key}_scores"] = inf.score(pq, train, factors, cfg).pairwise
    # Neumann with a small step (α = 1 diverges on this untrained model)
    product = GaussNewtonProduct(model, inf.task, inf.layers, factors.damping, batch_size=3)
    q = per_example_gradients(model, inf.task, inf.layers, queries, "measurement")
    start = {n: factors.precondition(n, g) for n, g in q.items()}
    refined, history = refine_queries(
        product, factors, q, start, train, steps=3, method="neumann", alpha=0.05
    )
    out["refine_neumann"], out["refine_neumann_residuals"] = flatten(refined, inf.layers), history
    # SOURCE (two segments, finite horizons) and TracIn-CP over two checkpoints
    traj = from_models([_model(1), _model(2)], [5, 10], [0.4, 0.1])
    total, parts = source_scores(
        traj, "causal_lm", "mlp", train, queries, FIT, batch_size=3, return_segments=True
    )
    out["source"], out["source_segment0"] = total.pairwise, parts[0].pairwise
    out["tracin"] = tracin_scores(traj, "causal_lm", "mlp", train, queries, batch_size=3).pairwise
    # ensemble over two true-Fisher seeds
    ens = inf.score_ensemble(queries, train, FIT, SCORE, seeds=(0, 1))
    out["ensemble_mean"], out["ensemble_sem"] = ens.mean, ens.sem
    out["ensemble_stability"] = ens.stability(3)
    return out


def _worker(rank: int, tmp: str) -> None:
    os.environ["INFLUSCOPE_PROGRESS"] = "0"
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        atomic_write_tensors(Path(tmp) / f"rank{rank}.safetensors", _run())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_for_issue13_paths(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    single = _run()
    # the refinement did move (a no-op would pass the comparison trivially)
    residuals = single["refine_cg_residuals"]  # (Q, k+1)
    assert bool((residuals[:, -1] < residuals[:, 0]).all())
    assert float(single["ensemble_sem"].max()) > 0
    for rank in range(WORLD):
        got = read_tensors(tmp_path / f"rank{rank}.safetensors")
        assert set(got) == set(single)
        for key, value in single.items():
            assert got[key].dtype == torch.float64, key
            torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)
