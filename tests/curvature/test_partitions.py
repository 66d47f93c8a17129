"""Module partitions and streamed factors (issue 22, items 3 and 4).

* a fit in module partitions gives the single-partition fit's factors bit for bit (float64,
  GPT-2 and Llama);
* factors streamed from disk one layer at a time give the scores of factors held in memory,
  bit for bit, and hold one layer at a time;
* a killed partitioned fit resumes from its finished partitions; partitions computed for
  another plan are not reused;
* a budget that cannot hold every layer gives partitions, not a refusal, and the measured peak
  (a child process's VmHWM) stays under it;
* on CUDA the layers are copied through pinned memory (the CPU stands in for the device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2, tiny_llama
from influscope import FitConfig, Influence, ScoreConfig
from influscope import budget as budget_mod
from influscope.curvature import run as run_mod
from influscope.curvature.streamed import StreamedOperator
from influscope.errors import ConfigError, MemoryBudgetError

ROOT = Path(__file__).resolve().parents[2]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_partitioned_fit_is_bit_identical_to_one_partition(tmp_path, arch):
    model = tiny_gpt2() if arch == "gpt2" else tiny_llama(intermediate=24)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu", run_dir=tmp_path)
    train = random_lm_data(12, seed=2)
    inf.fit(train, FitConfig(batch_size=4))
    assert inf.last_fit_plan.n_partitions == 1
    parts = inf.fit(train, FitConfig(batch_size=4, partitions=2), name="parts")
    assert inf.last_fit_plan.n_partitions == 2
    assert isinstance(parts, StreamedOperator)
    whole = inf.load_factors(train)  # the single-partition stage, read whole (as always)
    assert not isinstance(whole, StreamedOperator)
    assert _same(parts.tensors(), whole.tensors())
    assert parts.damping == whole.damping
    assert parts.layer_names == inf.layer_names
    # stored as one file per partition beside an empty tensors.safetensors
    stage = tmp_path / "factors" / "parts"
    meta = json.loads((stage / "meta.json").read_text())
    assert [p["file"] for p in meta["partitions"]] == [
        "partition-000.safetensors",
        "partition-001.safetensors",
    ]
    assert sum(len(p["layers"]) for p in meta["partitions"]) == len(inf.layers)
    # the partial directory (shard sums, partition factors) is gone
    assert not any(p.name.startswith(".parts.") for p in (tmp_path / "factors").iterdir())


def test_streamed_scores_are_bit_identical_and_hold_one_layer(tmp_path):
    inf = Influence(tiny_gpt2(), "causal_lm", modules="mlp", device="cpu", run_dir=tmp_path)
    train = random_lm_data(10, seed=3)
    queries = random_lm_data(5, seed=4)
    inf.fit(train, FitConfig(batch_size=4))
    inf.fit(train, FitConfig(batch_size=4, partitions=3), name="parts")
    memory = inf.load_factors(train)
    for config in (ScoreConfig(), ScoreConfig(query_rank=2), ScoreConfig(batch_size=2)):
        streamed = inf.load_factors(train, stream=True)  # the single file, one layer at a time
        parts = inf.load_factors(train, "parts")  # always streamed
        ref = inf.score(queries, train, memory, config)
        for op in (streamed, parts):
            got = inf.score(queries, train, op, config)
            assert torch.equal(got.pairwise, ref.pairwise)
            # layer after layer, each once per query batch (one layer cached at a time)
            batches = -(-len(queries) // config.batch_size)
            assert op.loads == inf.layer_names * batches
    # the score-time damping override keeps the files and gives the same scores
    config = ScoreConfig(damping_factor=0.3)
    ref = inf.score(queries, train, memory, config)
    assert torch.equal(inf.score(queries, train, parts, config).pairwise, ref.pairwise)
    # a layer's factors are what the in-memory operator holds
    name = inf.layer_names[1]
    assert torch.equal(parts.q_a[name], memory.q_a[name])
    assert parts.held_bytes() < memory.held_bytes()


def test_streamed_score_plans_its_training_pass_again_after_the_queries(tmp_path, monkeypatch):
    """The query pass leaves memory held (a cached layer, heap): the training pass's batch is
    planned again from the resident size measured after it, and the cached layer is dropped;
    when even batch size 1 no longer fits, the pass goes on at 1 with a warning."""
    inf = Influence(tiny_gpt2(), "causal_lm", modules="mlp", device="cpu", run_dir=tmp_path)
    train = random_lm_data(10, seed=3, min_len=8, max_len=8)
    queries = random_lm_data(5, seed=4)
    inf.fit(train, FitConfig(batch_size=4), name="parts")
    op = inf.load_factors(train, "parts", stream=True)
    ref = inf.score(queries, train, op, ScoreConfig(batch_size=8))
    budget = 2**30
    act = budget_mod.pass_activation_bytes(
        inf.model, [(la.in_dim, la.out_dim) for la in inf.layers], 1, 8
    )
    scores = 4 * len(queries) * len(train) * len(inf.layers)
    # after the query pass: batch 1 fits (0.95 B), batch 2 does not
    after = 0.95 * budget - op.held_bytes() - 1.5 * act - scores
    config = ScoreConfig(batch_size=8, memory_gb=budget / 2**30)

    def score_with(post: float):
        released, calls = [], [0]
        monkeypatch.setattr(op, "release", lambda: released.append(True))
        monkeypatch.setattr(
            budget_mod, "resident_bytes", lambda device=None: post if released else 2**20
        )
        hook = inf.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            got = inf.score(queries, train, op, config)
        finally:
            hook.remove()
        assert released == [True]
        assert calls[0] == 1 + len(train)  # one query batch, then batches of 1
        assert inf.last_score_batch == 1
        torch.testing.assert_close(got.pairwise, ref.pairwise)

    score_with(after)
    with pytest.warns(UserWarning, match="runs at batch size 1"):
        score_with(2 * budget)  # not even batch size 1 fits any more


def test_partitioned_fit_without_a_run_directory(tmp_path):
    inf = Influence(tiny_gpt2(), "causal_lm", modules="mlp", device="cpu")
    train = random_lm_data(8, seed=5)
    a = inf.fit(train, FitConfig(batch_size=4))
    b = inf.fit(train, FitConfig(batch_size=4, partitions=2))
    assert isinstance(b, StreamedOperator)
    owned = next(iter(b.files.values())).parent.parent
    queries = random_lm_data(3, seed=6)
    # the fitted eigenvectors are column-major (eigh), the stored ones row-major: compare
    # values here; bit-identity is against stored factors (above)
    torch.testing.assert_close(
        inf.score(queries, train, b).pairwise, inf.score(queries, train, a).pairwise
    )
    del b
    assert not owned.exists()  # the temporary partitions go with the operator


def test_killed_partitioned_fit_resumes_from_finished_partitions(tmp_path, monkeypatch):
    inf = Influence(tiny_gpt2(), "causal_lm", modules="mlp", device="cpu", run_dir=tmp_path)
    train = random_lm_data(8, seed=7)
    config = FitConfig(batch_size=4, partitions=2)
    real = run_mod._fit_group
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # in the second partition
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "_fit_group", dying)
    with pytest.raises(KeyboardInterrupt, match="killed"):
        inf.fit(train, config)
    assert not (tmp_path / "factors" / "factors").exists()  # no half-written stage
    monkeypatch.setattr(run_mod, "_fit_group", real)
    resumed = inf.fit(train, config)
    assert inf.last_fit_shards["partitions_loaded"] == 1  # the first partition was reused
    fresh = inf.fit(train, FitConfig(batch_size=4, partitions=2), name="fresh")
    assert _same(resumed.tensors(), fresh.tensors())

    # a partition stored for another plan (3 partitions) is not reused
    calls.clear()
    monkeypatch.setattr(run_mod, "_fit_group", dying)
    with pytest.raises(KeyboardInterrupt, match="killed"):
        inf.fit(train, config, name="other")
    monkeypatch.setattr(run_mod, "_fit_group", real)
    other = inf.fit(train, FitConfig(batch_size=4, partitions=3), name="other")
    assert inf.last_fit_shards["partitions_loaded"] == 0
    assert _same(other.tensors(), fresh.tensors())


def test_partitions_are_validated():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="partitions"):
            FitConfig(partitions=bad)
    inf = Influence(tiny_gpt2(), "causal_lm", modules="mlp", device="cpu")
    train = random_lm_data(4, seed=1)
    with pytest.raises(ConfigError, match="more module partitions than the 4"):
        inf.fit(train, FitConfig(partitions=5))


def test_budget_gives_partitions_and_a_forced_count_that_does_not_fit_is_refused(monkeypatch):
    inf = Influence(tiny_gpt2(), "causal_lm", modules="mlp", device="cpu")
    train = random_lm_data(8, seed=1, min_len=12, max_len=12)
    monkeypatch.setattr(budget_mod, "resident_bytes", lambda device=None: 2**20)
    dims = [(la.in_dim, la.out_dim) for la in inf.layers]
    cfg = FitConfig()

    def need(lo: int, hi: int) -> float:
        return max(budget_mod._fit_rows(inf.tracked, cfg, dims[lo:hi], 8, 12, 2**20, 1))

    one = max(need(j, j + 1) for j in range(len(dims)))
    plan = budget_mod.plan_fit(inf.tracked, train, FitConfig(memory_gb=one / 2**30))
    assert plan.n_partitions == len(dims)  # each layer alone
    room = 1 - budget_mod.SAFETY  # partitions are fitted within 95 % of the budget
    below_all = 0.999 * need(0, len(dims))  # all layers do not fit together
    for budget in (min(max(need(0, 2), need(2, 4)) / room, below_all), below_all):
        plan = budget_mod.plan_fit(inf.tracked, train, FitConfig(memory_gb=budget / 2**30))
        # the fewest contiguous partitions that fit, by brute force over all 2^(L-1) splits
        fewest = min(
            len(cuts) + 1
            for mask in range(2 ** (len(dims) - 1))
            for cuts in [[j + 1 for j in range(len(dims) - 1) if mask >> j & 1]]
            if all(need(a, b) <= room * budget for a, b in zip([0, *cuts], [*cuts, len(dims)]))
        )
        assert 1 < plan.n_partitions == fewest
        assert all(need(a, b) <= room * budget for a, b in plan.partitions)
        assert [a for a, _ in plan.partitions][1:] == [b for _, b in plan.partitions][:-1]
    with pytest.raises(MemoryBudgetError, match="partitions=2"):
        budget_mod.plan_fit(
            inf.tracked, train, FitConfig(memory_gb=one / 2**30 * 1.0001, partitions=2)
        )
    with pytest.raises(MemoryBudgetError, match="needs at least"):  # below one layer
        budget_mod.plan_fit(inf.tracked, train, FitConfig(memory_gb=0.99 * one / 2**30))


# A child: EK-FAC over the MLPs of a 2-block width-384 GPT-2 (float64 statistics of ≈ 20 MiB a
# layer, so that they, not the allocator's noise, decide the peak) under a budget just below
# what all its layers need together; it reports the plan and the fit's own
# peak (VmHWM, reset after a warm-up that loads the libraries a first pass and eigh pull in:
# their code pages are part of the resident size every later plan measures).
CHILD = """
import json, torch
torch.set_num_threads(1)
from influscope import FitConfig, Influence
from influscope import budget
from influscope.costs import peak_bytes, reset_peak
from influscope.toy import random_lm_data, tiny_gpt2
model = tiny_gpt2(n_embd=384, n_layer=2, n_positions=32, dtype=torch.float32)
train = random_lm_data(12, min_len=32, max_len=32, seed=1)
inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
torch.linalg.eigh(torch.eye(4, dtype=torch.float64))  # warm-up: LAPACK, one pass
inf.fit(train.subset(range(2)), FitConfig(curvature="diagonal", fisher="empirical"))
cfg = FitConfig(fisher="empirical", batch_size=4)
dims = [(la.in_dim, la.out_dim) for la in inf.layers]
res = float(budget.resident_bytes())
need = lambda ds: max(budget._fit_rows(inf.tracked, cfg, ds, 12, 32, res, 1))
gb = 0.98 * need(dims) / 2**30  # just below what all layers need together
assert reset_peak()
inf.fit(train, FitConfig(fisher="empirical", batch_size=4, memory_gb=gb))
print(json.dumps({"peak": peak_bytes(), "partitions": inf.last_fit_plan.n_partitions,
                  "budget": inf.last_fit_plan.budget}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_budget_below_all_layers_gives_partitions_and_the_peak_stays_under_it():
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}", OMP_NUM_THREADS="1")
    env["INFLUSCOPE_PROGRESS"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", CHILD], check=True, capture_output=True, text=True, env=env
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["partitions"] >= 2  # not refused: module partitions
    assert got["peak"] <= got["budget"], (got["peak"] / 2**20, got["budget"] / 2**20)


def test_cuda_streams_through_pinned_memory(tmp_path, monkeypatch):
    """The CPU stands in for the device: ``pin=True`` is what a CUDA device selects."""
    inf = Influence(tiny_gpt2(), "causal_lm", modules="mlp", device="cpu", run_dir=tmp_path)
    train = random_lm_data(6, seed=8)
    queries = random_lm_data(2, seed=9)
    inf.fit(train, FitConfig(batch_size=3, partitions=2))
    plain = inf.load_factors(train)
    assert not plain.pin
    assert StreamedOperator(plain.curvature, plain.files, plain.damping, "cuda:0").pin
    pinned, copies = [], []
    real_to = torch.Tensor.to

    def pin_memory(self):
        pinned.append(self.shape)
        return self.clone()

    def to(self, *args, **kwargs):
        if kwargs.get("non_blocking"):
            copies.append(args)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    op = StreamedOperator(plain.curvature, plain.files, plain.damping, "cpu", pin=True)
    got = inf.score(queries, train, op, ScoreConfig(query_rank=2))
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    ref = inf.score(queries, train, plain, ScoreConfig(query_rank=2))
    assert torch.equal(got.pairwise, ref.pairwise)
    assert len(pinned) == 3 * len(inf.layers)  # q_a, q_s, Λ of every layer
    assert len(copies) == len(pinned) and all(a[0] == torch.device("cpu") for a in copies)


TEXTS = [
    "The capital of Velmora is Tarsk.",
    "Tarsk lies on the river Vel.",
    "The cat sleeps near the quiet garden.",
    "A storm hits the coast at night.",
]


def test_cli_partitions_dry_run_and_streamed_score(workdir, capsys):
    from influscope.cli import main

    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    run = ["--run", str(workdir / "run")]
    assert main(["fit", *args, *run, "--dry-run", "--partitions", "2"]) == 0
    err = capsys.readouterr().err
    assert "module partitions: 2" in err and "largest of 2 module partitions" in err
    assert main(["fit", *args, *run, "--partitions", "2"]) == 0
    assert "2 module partitions" in capsys.readouterr().err
    meta = json.loads((workdir / "run" / "factors" / "factors" / "meta.json").read_text())
    assert len(meta["partitions"]) == 2
    queries = ["--queries", str(workdir / "queries.jsonl")]
    from safetensors.torch import load_file

    assert main(["fit", *args, *run, "--name", "whole"]) == 0  # one partition: one file
    pairwise = []
    for name, extra in (
        ("memory", ["--factors", "whole"]),
        ("streamed", ["--factors", "whole", "--stream-factors"]),
        ("partitions", []),
    ):
        report = ["--report", str(workdir / f"{name}.html"), "--name", name]
        assert main(["score", *args, *run, *queries, *report, *extra]) == 0
        stored = workdir / "run" / "scores" / name / "tensors.safetensors"
        pairwise.append(load_file(str(stored))["pairwise"])
    assert all(torch.equal(p, pairwise[0]) for p in pairwise[1:])
