"""The same pipeline on a CUDA device: placement, agreement with the CPU, bf16, offload, NCCL.

Every test here is marked ``cuda`` and skipped (not failed) on a machine without CUDA; the
prepared script ``benchmarks/gpu_check.py`` runs them on a GPU machine with
``pytest -m cuda tests/test_cuda.py``. The CPU bfloat16-vs-float32 agreement test lives in
``tests/test_demo_model.py``; here the same check runs under CUDA autocast.

Models are tiny GPT-2s built from a config (no download), so the whole file takes seconds.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import random_lm_data, tiny_gpt2, train_lm
from influscope import FitConfig, Influence, ScoreConfig
from influscope.curvature.base import CurvatureOperator
from influscope.demo.pipeline import spearman
from influscope.scoring.queries import PreconditionedQueries, precondition_queries
from influscope.storage import atomic_write_tensors, read_tensors
from influscope.tasks import EncodedDataset

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FIT = FitConfig(curvature="ekfac", batch_size=4, shard_size=4)
SCORE_FULL = ScoreConfig(query_rank=None, batch_size=4, per_layer=True)


def _tensors_of(pq: PreconditionedQueries) -> list[torch.Tensor]:
    """Every tensor held by preconditioned queries."""
    out = list(pq.dense.values())
    for u, v in pq.factors.values():
        out += [u, v]
    if pq.measurements is not None:
        out.append(pq.measurements)
    return out


def _run(
    model: torch.nn.Module,
    device: str,
    train: EncodedDataset,
    queries: EncodedDataset,
    fit: FitConfig = FIT,
    score: ScoreConfig = SCORE_FULL,
    offload: bool = False,
) -> tuple[Influence, CurvatureOperator, PreconditionedQueries, torch.Tensor, torch.Tensor]:
    """Fit, precondition and score on ``device``; the model is deep-copied first.

    Returns:
        ``(influence, factors, preconditioned queries, pairwise (Q, N), per-layer (Q, N, L))``.
    """
    inf = Influence(
        copy.deepcopy(model), "causal_lm", modules="all", device=device, offload=offload
    )
    op = inf.fit(train, fit)
    pq = inf.precondition(queries, op, score)
    scores = inf.score(pq, train, op, score)
    return inf, op, pq, scores.pairwise, scores.per_layer


@pytest.fixture(scope="module")
def data() -> tuple[EncodedDataset, EncodedDataset]:
    return random_lm_data(10, seed=1), random_lm_data(3, seed=2, prompt_len=2)


def test_default_device_is_cuda():
    inf = Influence(tiny_gpt2(), "causal_lm", modules="mlp")
    assert inf.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in inf.model.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu_float64(data, dtype):
    """Factors, query gradients and scores live on CUDA and equal the CPU float64 results."""
    train, queries = data
    model = tiny_gpt2(dtype=torch.float64)
    _, op_cpu, _, ref, ref_layers = _run(model, "cpu", train, queries)

    _, op, pq, pairwise, per_layer = _run(model.to(dtype), "cuda", train, queries)
    for key, t in op.tensors().items():
        assert t.device.type == "cuda", key
    assert all(t.device.type == "cuda" for t in _tensors_of(pq))
    assert pairwise.device.type == "cuda" and per_layer.device.type == "cuda"

    rtol = 1e-7 if dtype == torch.float64 else 1e-4  # float32 on the CPU: ~1e-6
    scale = ref.abs().max()
    torch.testing.assert_close(pairwise.cpu().double(), ref, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(
        per_layer.cpu().double(), ref_layers, rtol=rtol, atol=rtol * ref_layers.abs().max()
    )
    for name in op_cpu.damping:
        assert op.damping[name] == pytest.approx(op_cpu.damping[name], rel=100 * rtol)


def test_low_rank_query_factors_on_cuda(data):
    """Rank-r query factors (kept factored) stay on CUDA and score like the CPU."""
    train, queries = data
    model = tiny_gpt2(n_embd=32, dtype=torch.float64)
    low = ScoreConfig(query_rank=2, batch_size=4)
    got = {}
    for device in ("cpu", "cuda"):
        inf = Influence(copy.deepcopy(model), "causal_lm", modules="all", device=device)
        op = inf.fit(train, FIT)
        pq = precondition_queries(inf.tracked, op, queries, low, dense_budget=0)
        assert pq.factors and not pq.dense  # the factored (U, V) path, not a reconstruction
        assert all(t.device.type == device for t in _tensors_of(pq))
        got[device] = inf.score(pq, train, op, low).pairwise
    ref = got["cpu"]
    torch.testing.assert_close(got["cuda"].cpu(), ref, rtol=1e-7, atol=1e-7 * ref.abs().max())


def test_bfloat16_autocast_on_cuda_keeps_float32_ranking():
    """bf16 autocast on CUDA keeps the float32 ranking (Spearman ≥ 0.96, as on the CPU).

    The fit uses the empirical Fisher so that the test measures arithmetic precision only: with
    the true Fisher the labels are sampled from the (bf16 vs float32) logits, a few samples flip,
    and on a fit set this small the Monte Carlo noise of the Fisher alone puts the mean Spearman
    between 0.94 and 0.97 (three seeds, measured on the CPU; 0.997 with the empirical Fisher),
    which says nothing about bf16.
    """
    train = random_lm_data(48, vocab=64, min_len=8, max_len=24, seed=3)
    queries = random_lm_data(6, vocab=64, min_len=8, max_len=24, seed=4, prompt_len=3)
    model = train_lm(tiny_gpt2(n_embd=64, vocab=64, dtype=torch.float32), train, steps=150)
    fit32 = FitConfig(curvature="ekfac", batch_size=8, fisher="empirical")
    fit16 = FitConfig(curvature="ekfac", batch_size=8, fisher="empirical", amp_dtype="bfloat16")
    score32 = ScoreConfig(query_rank=32, batch_size=8)
    score16 = ScoreConfig(query_rank=32, batch_size=8, amp_dtype="bfloat16")
    _, _, _, ref, _ = _run(model, "cuda", train, queries, fit32, score32)
    _, _, _, low, _ = _run(model, "cuda", train, queries, fit16, score16)
    assert low.device.type == "cuda"
    assert torch.isfinite(low).all()
    rho = sum(spearman(low[q].cpu(), ref[q].cpu()) for q in range(len(queries))) / len(queries)
    assert rho >= 0.96, rho


def test_offload_keeps_factors_on_cpu_and_scores_equal(data):
    """offload=True: factors stay in CPU memory, scores equal the on-device run."""
    train, queries = data
    model = tiny_gpt2(dtype=torch.float64)
    _, _, _, ref, _ = _run(model, "cuda", train, queries)
    inf, op, pq, got, _ = _run(model, "cuda", train, queries, offload=True)
    assert inf.device.type == "cuda"
    for key, t in op.tensors().items():
        assert t.device.type == "cpu", key
    assert all(t.device.type == "cuda" for t in _tensors_of(pq))
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_stored_stages_load_where_computed_ones_live(data, tmp_path):
    """From a run directory: ``load_factors`` keeps ``offload=True`` factors in CPU memory (it
    loaded them onto the model's device), and scores read back from the run directory are on
    the device like freshly computed ones (they came back on the CPU)."""
    train, queries = data
    inf = Influence(
        tiny_gpt2(dtype=torch.float64), "causal_lm", device="cuda", offload=True, run_dir=tmp_path
    )
    op = inf.fit(train, FIT)
    loaded = inf.load_factors(train)
    for factors in (op, loaded):
        assert all(t.device.type == "cpu" for t in factors.tensors().values())
    first = inf.score(queries, train, loaded, SCORE_FULL, name="scores")
    again = inf.score(queries, train, loaded, SCORE_FULL, name="scores")  # read back
    assert first.pairwise.device.type == "cuda" and again.pairwise.device.type == "cuda"
    torch.testing.assert_close(again.pairwise, first.pairwise, rtol=0, atol=0)


# --- distributed: 2 NCCL ranks, one GPU each ----------------------------------------------
WORLD = 2


def _nccl_pipeline(device: str) -> dict[str, torch.Tensor]:
    model = tiny_gpt2(n_embd=16)
    train = random_lm_data(17, seed=1)
    queries = random_lm_data(3, seed=2, prompt_len=2)
    inf, op, _, pairwise, per_layer = _run(
        model, device, train, queries, FitConfig(curvature="ekfac", batch_size=3, shard_size=3)
    )
    # Not the raw eigenvectors: ranks sum the shards in another order, and eigenvectors of
    # (near-)degenerate eigenvalues then differ by far more than 1e-9 (seen with gloo on the
    # CPU: q_s of c_attn off by 9e-10 absolute). The damped curvature G + λI is basis-free.
    out = {f"curvature::{n}": op.dense(n).cpu() for n in inf.layer_names}
    out["pairwise"] = pairwise.cpu()
    out["per_layer"] = per_layer.cpu()
    return out


def _nccl_worker(rank: int, tmp: str) -> None:
    os.environ["INFLUSCOPE_PROGRESS"] = "0"
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        result = _nccl_pipeline(f"cuda:{rank}")
        atomic_write_tensors(Path(tmp) / f"rank{rank}.safetensors", result)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < WORLD,
    reason=f"NCCL test needs {WORLD} CUDA devices",
)
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_nccl_available(), reason="NCCL not built"
)
def test_two_nccl_ranks_equal_one_process(tmp_path):
    mp.start_processes(_nccl_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    single = _nccl_pipeline("cuda:0")
    for rank in range(WORLD):
        got = read_tensors(tmp_path / f"rank{rank}.safetensors")
        assert set(got) == set(single)
        for key, value in single.items():
            torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_eigen_index_and_randomized_query_svd_on_cuda(data, tmp_path):
    """An ``eigen`` index built and queried on CUDA scores like the CPU; randomized rank-r
    queries (seeded sketch on the device) stay on CUDA and track the exact SVD."""
    from influscope.index import IndexConfig, preconditioned_queries
    from influscope.metrics import spearman

    train, queries = data
    model = tiny_gpt2(n_embd=48, dtype=torch.float64)  # c_fc 49 → 192: 4 · (2 + 8) ≤ 49
    cfg = IndexConfig(k_in=8, k_out=8, init="eigen", dtype="float32", batch_size=4)
    got = {}
    for device in ("cpu", "cuda"):
        inf = Influence(copy.deepcopy(model), "causal_lm", modules="mlp", device=device)
        op = inf.fit(train, FIT)
        index = inf.build_index(train, cfg, op, root=tmp_path / device)
        q = preconditioned_queries(inf.tracked, queries, index)
        got[device] = index.search(q, k=3, return_all=True)[1]
        if device == "cuda":
            # queries and positions handed over on the GPU: the CPU-side index accepts them
            on_gpu = index.search(q.to(device), k=3, return_all=True)[1]
            torch.testing.assert_close(on_gpu, got[device], rtol=0, atol=0)
            rows = index.rows(torch.tensor([0, 2], device=device))
            torch.testing.assert_close(rows, index.rows([0, 2]), rtol=0, atol=0)
            fast = ScoreConfig(query_rank=2, query_svd="randomized", batch_size=4)
            pq = inf.precondition(queries, op, fast)
            assert all(t.device.type == "cuda" for t in _tensors_of(pq))
            approx = inf.score(pq, train, op, fast).pairwise.cpu()
            exact_cfg = ScoreConfig(query_rank=2, query_svd="exact", batch_size=4)
            exact = inf.score(queries, train, op, exact_cfg).pairwise.cpu()
            assert min(spearman(approx[i], exact[i]) for i in range(len(queries))) > 0.95
    ref = got["cpu"]
    torch.testing.assert_close(got["cuda"].cpu(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
