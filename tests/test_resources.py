"""``--dry-run``: one measured batch gives time as well as memory; the memory model has the
resident process, a pass, the float64 statistics and the replay cache."""

from __future__ import annotations

import pytest

from conftest import random_lm_data, tiny_gpt2
from influscope import Influence
from influscope.cli import main
from influscope.costs import BatchCost, measure_batch, peak_bytes, reset_peak, resident_bytes
from influscope.resources import describe, estimate, padded_tokens

TEXTS = ["The capital of Velmora is Tarsk.", "Zorin Quell was born in Ostrava.", "To be."]


@pytest.fixture(scope="module")
def setup():
    inf = Influence(tiny_gpt2(n_embd=16), "causal_lm", modules="mlp", device="cpu")
    return inf, random_lm_data(10, seed=1, min_len=5, max_len=9)


def test_memory_probes_read_this_process():
    assert resident_bytes() > 10 * 2**20  # python + torch
    if reset_peak():
        buf = bytearray(64 * 2**20)  # touched: resident
        assert peak_bytes() - resident_bytes() > -(2**20)
        assert peak_bytes() >= 64 * 2**20
        del buf


def test_one_batch_is_measured(setup):
    inf, train = setup
    cost = measure_batch(inf.tracked, train, batch_size=4)
    longest = max(int(ex["input_ids"].shape[-1]) for ex in train.examples[:4])
    assert cost.batch_size == 4 and cost.tokens == 4 * longest and cost.device == "cpu"
    assert cost.resident > 0 and cost.batch_peak >= 0
    assert cost.seconds_pass > 0 and cost.seconds_cov > 0 and cost.seconds_rot > 0
    assert cost.seconds_eigh > 0
    assert padded_tokens(train, 4) >= cost.tokens


def test_estimate_from_a_measured_batch(setup):
    """Memory = resident + the stage's tensors; time = the batch scaled by padded tokens."""
    inf, train = setup
    dims = [(layer.in_dim, layer.out_dim) for layer in inf.layers]
    k = sum(i * i + o * o for i, o in dims)
    p = sum(i * o for i, o in dims)
    tokens = padded_tokens(train, 4)
    cost = BatchCost(1e9, 1e8, 2.0, 0.5, 1.0, 30.0, 4, tokens // 3, "cpu")
    full_cache = 4 * tokens * sum(i + o for i, o in dims) + tokens
    rows = {e.stage: e for e in estimate(inf, train, batch_size=4, cost=cost, memory_gb=64)}
    cov, eig = rows["fit: covariance"], rows["fit: eigenvalues"]
    assert cov.memory == pytest.approx(1.1e9 + 8 * k + full_cache)  # one shard: sums once
    assert rows["fit: eigendecomposition"].memory == pytest.approx(
        1e9 + 8 * k + 40 * max(max(d) for d in dims) ** 2 + full_cache
    )
    widest = max(i * o for i, o in dims)
    assert eig.memory == pytest.approx(1.1e9 + 8 * k + 16 * p + 32 * widest + full_cache)
    assert eig.disk == 8 * (k + p)
    scale = tokens / (tokens // 3)
    assert cov.seconds == pytest.approx(scale * 2.5)
    assert rows["fit: eigendecomposition"].seconds == 30.0
    assert eig.seconds == pytest.approx(scale * 1.0)  # replayed: no forward
    # a cache too small for the first pass: the eigenvalue pass runs the model again
    small = {e.stage: e for e in estimate(inf, train, batch_size=4, cost=cost, cache_mb=0)}
    assert small["fit: eigenvalues"].seconds == pytest.approx(scale * 3.0)
    assert small["fit: covariance"].memory == pytest.approx(1.1e9 + 8 * k)
    # the score row: the measured batch scaled to the score's batch (8 here, the fit's 4)
    score = {
        b: next(
            e
            for e in estimate(inf, train, 4, 3, cost=cost, score_batch_size=b)
            if e.stage == "score"
        )
        for b in (None, 8)
    }
    assert score[8].memory - score[None].memory == pytest.approx(1e8)  # one more batch peak
    assert "batch 8" in score[8].note and "batch" not in score[None].note
    text = describe(list(rows.values()), cost)
    assert "time" in text.splitlines()[0] and "fit peak ≈" in text and "measured on cpu" in text
    # without a measured batch: no time column
    assert "time" not in describe(estimate(inf, train, batch_size=4)).splitlines()[0]


def test_fit_dry_run_prints_time_and_memory(workdir, capsys):
    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    assert main(["fit", *args, "--run", str(workdir / "run"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "peak memory" in err and "time" in err and "fit: eigendecomposition" in err
    assert "fit peak ≈" in err and "time ≈" in err and "one batch of 3 sequences" in err
    assert not (workdir / "run" / "factors").exists()
