"""A killed refinement resumes at its first unfinished query block, with the same scores."""

from __future__ import annotations

import pytest
import torch

import influscope.solvers
from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.tasks import CausalLMTask

TASK = CausalLMTask()
CFG = ScoreConfig(query_rank=None, refine_steps=3, batch_size=1)  # blocks of 1 query


class Killed(RuntimeError):
    pass


def test_interrupted_refinement_resumes_and_matches(tmp_path, monkeypatch):
    model = tiny_gpt2(n_embd=8, n_layer=1, vocab=16, n_positions=16)
    train = random_lm_data(6, vocab=16, min_len=3, max_len=6, seed=1)
    queries = random_lm_data(3, vocab=16, min_len=3, max_len=6, seed=2)
    plain = Influence(model, TASK, modules="all")
    factors = plain.fit(train, FitConfig(curvature="ekfac", batch_size=4))
    expected = plain.score(queries, train, factors, CFG).pairwise  # all queries in one solve

    real = influscope.solvers.refine_queries
    calls = []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed("killed while refining block 1")
        return real(*args, **kwargs)

    inf = Influence(model, TASK, modules="all", run_dir=tmp_path / "run")
    monkeypatch.setattr(influscope.solvers, "refine_queries", dies_on_second)
    with pytest.raises(Killed, match="block 1"):
        inf.score(queries, train, factors, CFG, name="s")
    partial = tmp_path / "run" / "scores" / ".s.refine-partial"
    assert (partial / "refine" / "shard-00000.safetensors").is_file()
    assert not (partial / "refine" / "shard-00001.safetensors").exists()

    calls.clear()
    monkeypatch.setattr(
        influscope.solvers, "refine_queries", lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    )
    resumed = inf.score(queries, train, factors, CFG, name="s")
    assert len(calls) == 2  # block 0 loaded, blocks 1 and 2 refined
    torch.testing.assert_close(resumed.pairwise, expected, rtol=1e-9, atol=1e-12)
    assert not partial.exists()  # cleared once the stage is saved
    calls.clear()
    again = inf.score(queries, train, factors, CFG, name="s")  # the stored stage, no refinement
    assert calls == [] and torch.equal(again.pairwise, resumed.pairwise)
