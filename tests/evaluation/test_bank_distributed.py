"""Two gloo ranks build the same validation bank, and run the same removal test, as one process.

Rank 0 makes full run A and rank 1 full run B of the determinism check; the 2 × 3 subsets are
dealt to the ranks (subset ``s`` on rank ``s mod 2``) and gathered by an all-reduce in which
every row is non-zero on exactly one rank, so the float64 bank equals the single-process one
exactly. The removal retrains are dealt the same way through the bank directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bank_toys import FINGERPRINTS, RegressionRecipe, measure

from influscope.evaluation import BankConfig, ScoreBankConfig, build_bank, score_bank
from influscope.storage import atomic_write_tensors, read_tensors

WORLD = 2
CFG = BankConfig(fractions=(0.1, 0.5), subsets=3, seed=1)
TOP = ScoreBankConfig(top_k=(2,))


def _run(bank_dir: Path) -> dict[str, torch.Tensor]:
    recipe = RegressionRecipe()
    bank = build_bank(recipe, measure, 20, FINGERPRINTS, CFG, bank_dir)
    gen = torch.Generator().manual_seed(5)
    tau = torch.randn(4, 20, generator=gen, dtype=torch.float64)  # (Q, N)
    result = score_bank(bank, tau, config=TOP, recipe=recipe, measure=measure, bank_dir=bank_dir)
    out = bank.tensors()
    out["lds"] = torch.tensor([r.per_query for r in result.lds], dtype=torch.float64)
    out["top"] = torch.tensor(result.removal[0].per_query_top, dtype=torch.float64)
    out["random"] = torch.tensor(result.removal[0].per_query_random, dtype=torch.float64)
    out["calls"] = torch.tensor([recipe.calls])
    return out


def _worker(rank: int, tmp: str) -> None:
    os.environ["INFLUSCOPE_PROGRESS"] = "0"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        atomic_write_tensors(Path(tmp) / f"rank{rank}.safetensors", _run(Path(tmp) / "bank"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_build_and_score_the_same_bank_as_one_process(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    single = _run(tmp_path / "single")
    # full runs, subsets, (top, random) × 4 queries (distinct removal sets with this seed)
    assert int(single["calls"]) == 2 + 6 + 8
    got = [read_tensors(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)]
    # the work was split: each rank trained one full run and half of the subsets
    assert int(got[0]["calls"]) + int(got[1]["calls"]) <= int(single["calls"])
    assert int(got[0]["calls"]) >= 4 and int(got[1]["calls"]) >= 4
    for rank in range(WORLD):
        for key, value in single.items():
            if key != "calls":
                assert torch.equal(got[rank][key], value), (rank, key)
    assert (tmp_path / "bank" / "bank" / "bank" / "meta.json").is_file()
    assert not (tmp_path / "bank" / "bank" / ".bank.partial").exists()
