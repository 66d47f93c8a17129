"""Runs on disk: stages reload identically, writes are atomic, fingerprints detect change."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.storage import RunDirectory, atomic_write_json


def test_factors_and_scores_roundtrip(tmp_path):
    model = tiny_gpt2()
    data, queries = random_lm_data(8), random_lm_data(2, seed=3, prompt_len=2)
    inf = Influence(model, run_dir=tmp_path)
    op = inf.fit(data, FitConfig(curvature="ekfac"))
    s = inf.score(queries, data, op, ScoreConfig(per_layer=True), name="s")
    stage = tmp_path / "factors" / "factors"
    meta = json.loads((stage / "meta.json").read_text())
    assert meta["config"]["curvature"] == "ekfac" and set(meta["damping"]) == set(inf.layer_names)
    assert not list(tmp_path.rglob("*.tmp"))
    again = Influence(model, run_dir=tmp_path)
    op2 = again.fit(data, FitConfig(curvature="ekfac"))  # loaded, not refitted
    for name in op.eigenvalues:
        torch.testing.assert_close(op2.eigenvalues[name], op.eigenvalues[name])
    s2 = again.score(queries, data, op2, ScoreConfig(per_layer=True), name="s")
    torch.testing.assert_close(s2.pairwise, s.pairwise)
    torch.testing.assert_close(s2.per_layer, s.per_layer)


def test_interrupted_stage_write_leaves_previous_stage(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path)
    run.save("factors", "x", {"a": torch.ones(2)}, {"k": 1})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("influscope.storage.run.atomic_write_json", boom)
    with pytest.raises(KeyboardInterrupt, match="killed mid-write"):
        run.save("factors", "x", {"a": torch.zeros(2)}, {"k": 2})
    tensors, _ = run.load("factors", "x", {"k": 1})
    torch.testing.assert_close(tensors["a"], torch.ones(2))
    assert [p.name for p in (tmp_path / "factors").iterdir()] == ["x"]


def test_atomic_json_no_temp_files(tmp_path):
    path = atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
