"""The stage runner: load or refuse before computing, resume store, save, clear."""

from __future__ import annotations

import pytest
import torch

from influscope.engine.stage import StageSpec, run_stage
from influscope.errors import StaleArtifactError
from influscope.storage import RunDirectory


def _spec(run, expected, name="s", partial="partial"):
    return StageSpec(
        run,
        "scores",
        name,
        expected,
        load=lambda tensors, meta: (tensors["x"], meta["extra"]),
        dump=lambda result: ({"x": result[0]}, {"extra": result[1]}),
        partial=partial,
    )


def test_without_a_run_directory_it_computes_with_no_store() -> None:
    stores = []
    out = run_stage(_spec(None, {}), lambda store: (stores.append(store), (torch.ones(2), 1))[1])
    assert stores == [None] and out[1] == 1


def test_it_computes_once_then_loads_and_refuses_stale_before_computing(tmp_path) -> None:
    run = RunDirectory(tmp_path)
    calls = []

    def compute(store):
        calls.append(store)
        assert store is not None and store.directory.name == ".s.partial"
        store.put("blocks", 0, {"y": torch.zeros(1)})  # a partial result, cleared after saving
        return torch.arange(3.0), "first"

    first = run_stage(_spec(run, {"data": "a"}), compute)
    assert len(calls) == 1 and not (tmp_path / "scores" / ".s.partial").exists()
    again = run_stage(_spec(run, {"data": "a"}), compute)
    assert len(calls) == 1  # loaded, not recomputed
    torch.testing.assert_close(again[0], first[0])
    assert again[1] == "first"
    with pytest.raises(
        StaleArtifactError, match=r"data: fingerprint 'a' → 'b' \(the training data's tokens"
    ):
        run_stage(_spec(run, {"data": "b"}), compute)
    assert len(calls) == 1  # refused before any computation
    redone = run_stage(_spec(run, {"data": "b"}), lambda s: (torch.ones(1), "second"), True)
    assert redone[1] == "second"
    assert run_stage(_spec(run, {"data": "b"}), compute)[1] == "second"


def test_before_load_runs_only_when_a_stored_stage_is_read(tmp_path) -> None:
    run = RunDirectory(tmp_path)
    seen = []
    spec = _spec(run, {}, partial=None)
    run_stage(spec, lambda s: (torch.ones(1), 0), before_load=lambda: seen.append("x"))
    assert seen == []
    with pytest.raises(RuntimeError, match="refused"):
        run_stage(spec, lambda s: (torch.ones(1), 0), before_load=_refuse)


def _refuse() -> None:
    raise RuntimeError("refused")
