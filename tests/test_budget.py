"""The memory budget (``FitConfig.memory_gb`` / ``ScoreConfig.memory_gb``, influscope.budget):
the peak stays under it (measured in a child process), a budget below one layer is refused
before any forward pass, the replay cache changes no bit of the factors, and the default
budget reads the free memory of the device the stage runs on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope import budget as budget_mod
from influscope.cli import main
from influscope.errors import ConfigError, MemoryBudgetError

ROOT = Path(__file__).resolve().parents[1]

# A child process: fit EK-FAC on a one-block width-128 GPT-2 whose full replay cache is
# ≈ 100 MiB (320 × 64 tokens × 1,282 floats), then report its own peak resident size.
CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from influscope import FitConfig, Influence
from influscope.toy import random_lm_data, tiny_gpt2
memory_gb = None if sys.argv[1] == "none" else float(sys.argv[1])
model = tiny_gpt2(n_embd=128, n_layer=1, n_positions=64, dtype=torch.float32)
train = random_lm_data(320, min_len=64, max_len=64, seed=1)
inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
op = inf.fit(train, FitConfig(fisher="empirical", batch_size=16, memory_gb=memory_gb))
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child of a large pytest
# process would report its parent's peak.
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({
    "peak": int(hwm.split()[1]) * 1024,
    "replayed": inf.last_fit_shards["replayed"],
    "lam": float(sum(v.sum() for v in op.tensors().values() if v.dtype == torch.float64)),
}))
"""
FULL_CACHE = 4 * 320 * 64 * (129 + 512 + 513 + 128)


def _child(memory_gb: float | None) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}", OMP_NUM_THREADS="1")
    env["INFLUSCOPE_PROGRESS"] = "0"
    arg = "none" if memory_gb is None else repr(memory_gb)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, arg], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_stays_under_a_small_budget():
    """Unbudgeted, the child holds the whole replay cache; with a budget half a cache below
    that peak it caches only part of the first pass, and its peak stays under the budget."""
    free = _child(None)
    assert free["replayed"] >= 1
    budget = free["peak"] - FULL_CACHE / 2
    held = _child(budget / 2**30)
    assert held["peak"] <= budget, (held["peak"] / 2**20, budget / 2**20)
    assert free["peak"] > budget  # the test can fail: without the budget the peak is above it
    assert held["replayed"] >= 1  # part of the cache was still used
    assert held["lam"] == free["lam"]  # same factors


def _counting(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_budget_below_one_layer_is_refused_before_any_forward(monkeypatch):
    model = tiny_gpt2(n_embd=16)
    calls = _counting(model)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    train = random_lm_data(8, seed=2)
    # a fixed resident size, so the minimum does not depend on this process's history
    monkeypatch.setattr(budget_mod, "resident_bytes", lambda device=None: 2**20)
    widest = max(inf.layers, key=lambda la: la.in_dim**2 + la.out_dim**2)
    with pytest.raises(MemoryBudgetError, match="needs at least") as err:
        inf.fit(train, FitConfig(memory_gb=2**20 / 2**30))  # 1 MiB: the process alone
    msg = str(err.value)
    assert f"{widest.name!r}" in msg and "needs at least" in msg and "--memory-gb" in msg
    assert "received 1.0 MiB" in msg
    assert calls[0] == 0  # no forward pass ran
    op = inf.fit(train, FitConfig(memory_gb=1.0))
    assert calls[0] > 0 and op is not None
    calls[0] = 0
    with pytest.raises(MemoryBudgetError, match="needs at least") as err:
        inf.score(train, train, op, ScoreConfig(memory_gb=2**20 / 2**30))
    assert calls[0] == 0


def test_budget_lowers_the_batch_size(monkeypatch):
    """A budget that holds the statistics but not a batch of 8 fits with smaller batches."""
    model = tiny_gpt2(n_embd=16)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    train = random_lm_data(16, seed=3, min_len=12, max_len=12)
    monkeypatch.setattr(budget_mod, "resident_bytes", lambda device=None: 2**20)
    dims = [(la.in_dim, la.out_dim) for la in inf.layers]
    cfg = FitConfig(batch_size=8)

    def need(batch: int) -> float:  # the estimate the plan uses, all layers
        return max(budget_mod._fit_rows(inf.tracked, cfg, dims, 16, 12, 2**20, batch))

    between = (need(2) + need(4)) / 2  # a batch of 2 fits, one of 4 does not
    for gb, batch in ((1.0, 8), (between / 2**30, 2), (need(1) / 2**30, 1)):
        plan = budget_mod.plan_fit(inf.tracked, train, FitConfig(batch_size=8, memory_gb=gb))
        assert plan.batch_size == batch and plan.n_partitions == 1
    # below all layers together: module partitions instead of a refusal; the gradient index's
    # projected fit, which cannot be partitioned, is still refused
    low = FitConfig(batch_size=8, memory_gb=0.999 * need(1) / 2**30)
    plan = budget_mod.plan_fit(inf.tracked, train, low)
    assert plan.n_partitions == 2 and plan.partitions[0][0] == 0
    assert plan.partitions[0][1] == plan.partitions[1][0] and plan.partitions[1][1] == len(dims)
    with pytest.raises(MemoryBudgetError, match="layers need together"):
        budget_mod.plan_fit(inf.tracked, train, low, partitionable=False)


def test_factors_are_bit_identical_with_and_without_the_replay_cache():
    """float64: no cache, a cache that fills up inside the first shard (the rest of that shard
    is recomputed), and the whole pass cached give the same bits."""
    model = tiny_gpt2(n_embd=16)  # float64
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    train = random_lm_data(40, seed=4)
    results = {}
    for cache_mb in (0.0, 0.25, None):
        cfg = FitConfig(batch_size=4, shard_size=16, cache_mb=cache_mb, memory_gb=4.0)
        results[cache_mb] = (inf.fit(train, cfg).tensors(), dict(inf.last_fit_shards))
    assert results[0.0][1]["replayed"] == 0
    assert 1 <= results[0.25][1]["replayed"] < 3  # part of the first pass
    assert results[None][1]["replayed"] == 3  # all three shards
    ref = results[0.0][0]
    for tensors, _ in results.values():
        assert tensors.keys() == ref.keys()
        assert all(torch.equal(tensors[k], ref[k]) for k in ref)


def test_default_budget_reads_the_device_free_memory(monkeypatch):
    """CPU: MemAvailable; CUDA: torch.cuda.mem_get_info (the CPU stands in for the device)."""
    monkeypatch.setattr(budget_mod, "host_available", lambda: 10 * 2**30)
    monkeypatch.setattr(budget_mod, "resident_bytes", lambda device=None: 2**30)
    seen = []

    def mem_get_info(device):
        seen.append(torch.device(device))
        return 4 * 2**30, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert budget_mod.free_memory("cpu") == 10 * 2**30
    assert budget_mod.default_budget("cpu") == pytest.approx(2**30 + 0.9 * 10 * 2**30)
    assert budget_mod.free_memory("cuda:0") == 4 * 2**30
    assert budget_mod.default_budget("cuda:0") == pytest.approx(2**30 + 0.9 * 4 * 2**30)
    assert seen == [torch.device("cuda:0")] * 2
    assert budget_mod.budget_bytes(None, "cpu") == budget_mod.default_budget("cpu")
    assert budget_mod.budget_bytes(2.5, "cuda:0") == 2.5 * 2**30


def test_real_free_memory_is_positive():
    assert budget_mod.host_available() > 0
    assert budget_mod.default_budget("cpu") > budget_mod.resident_bytes()


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "2", True])
def test_memory_gb_is_validated_on_creation(bad):
    with pytest.raises(ConfigError, match="memory_gb"):
        FitConfig(memory_gb=bad)
    with pytest.raises(ConfigError, match="memory_gb"):
        ScoreConfig(memory_gb=bad)


def test_memory_gb_is_not_fingerprinted():
    assert FitConfig(memory_gb=3.0).fingerprint_dict() == FitConfig().fingerprint_dict()
    assert ScoreConfig(memory_gb=3.0).fingerprint_dict() == ScoreConfig().fingerprint_dict()


TEXTS = ["The capital of Velmora is Tarsk.", "Zorin Quell was born in Ostrava.", "To be."]


def test_cli_fit_refuses_a_budget_below_one_layer(workdir, capsys):
    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    run = workdir / "run"
    assert main(["fit", *args, "--run", str(run), "--memory-gb", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "below what one layer needs" in err and "--memory-gb" in err
    assert not (run / "factors" / "factors").exists()
