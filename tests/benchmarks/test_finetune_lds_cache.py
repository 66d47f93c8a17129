"""The score cache of ``benchmarks/finetune_lds.py``: reload, work sharing, peer failures."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.finetune_lds import Cache


def test_cache_reloads_and_refuses_another_tag(tmp_path):
    calls = []

    def job():
        calls.append(1)
        return torch.ones(2, 3), {"residuals": [0.5]}

    first = Cache(tmp_path, "tag-a").run({"ekfac": job})
    again = Cache(tmp_path, "tag-a")
    second = again.run({"ekfac": job})
    assert len(calls) == 1 and torch.equal(first["ekfac"], second["ekfac"])
    assert again.extra["ekfac"] == {"residuals": [0.5]}
    Cache(tmp_path, "tag-b").run({"ekfac": job})  # another bank: recomputed
    assert len(calls) == 2


def test_claimed_job_is_left_to_its_holder_and_stale_locks_are_taken(tmp_path):
    cache = Cache(tmp_path, "t")
    (cache.dir / "busy.lock").write_text(str(os.getpid()))  # held by a live process
    assert not cache._claim("busy")
    (cache.dir / "dead.lock").write_text("999999999")  # no such process
    assert cache._claim("dead")
    assert (cache.dir / "dead.lock").read_text() == str(os.getpid())


def test_peer_failure_is_recorded_and_own_failure_raises(tmp_path):
    def broken():
        raise RuntimeError("no such flag")

    cache = Cache(tmp_path, "t")
    got = cache.run({"bergson_ekfac": broken})
    assert got["bergson_ekfac"] is None
    assert "no such flag" in cache.notes["bergson_ekfac"]
    with pytest.raises(RuntimeError, match="no such flag"):
        cache.run({"ekfac": broken})
    assert not (cache.dir / "ekfac.lock").exists()  # released for a rerun
