"""A fit killed with SIGKILL in the middle resumes from its saved shards and ends identical.

The test runs a real subprocess (a slowed-down fit), kills it once some shards of the
eigenvalue pass are on disk, reruns the same command, and compares the factors bit for bit
with an uninterrupted run in another directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from influscope.storage import read_tensors

TESTS = Path(__file__).parents[1]  # tests/, where conftest.py is

PRELUDE = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
os.environ["INFLUSCOPE_PROGRESS"] = "0"
import torch
torch.set_num_threads(1)
from conftest import random_lm_data, tiny_gpt2
from influscope import CausalLMTask, FitConfig, Influence

class SlowTask(CausalLMTask):
    def training_loss(self, model, batch, seeds):
        time.sleep(float(os.environ.get("SLOW", "0")))
        return super().training_loss(model, batch, seeds)
"""

SCRIPT = """
{prelude}run, out = sys.argv[1], sys.argv[2]
inf = Influence(tiny_gpt2(n_embd=16), SlowTask(), modules="mlp", run_dir=run, device="cpu")
op = inf.fit(random_lm_data(48, seed=1), FitConfig(batch_size=4, shard_size=4, cache_mb=float(sys.argv[3])))
with open(out, "w") as fh:
    json.dump(inf.last_fit_shards, fh)
"""


def _cmd(tmp: Path, run: str, cache_mb: float = 0.0) -> list[str]:
    script = tmp / "fit_script.py"
    script.write_text(SCRIPT.format(prelude=PRELUDE.format(tests=str(TESTS))))
    return [sys.executable, str(script), str(tmp / run), str(tmp / f"{run}.json"), str(cache_mb)]


def _factors(tmp: Path, run: str) -> dict[str, torch.Tensor]:
    return read_tensors(tmp / run / "factors" / "factors" / "tensors.safetensors")


@pytest.mark.slow
def test_fit_killed_mid_pass_resumes_identically(tmp_path):
    env = {**os.environ, "SLOW": "0.15"}
    proc = subprocess.Popen(_cmd(tmp_path, "killed"), env=env)
    shards = tmp_path / "killed" / "factors" / ".factors.partial" / "eigenvalues"
    deadline = time.monotonic() + 90
    while len(list(shards.glob("shard-*.safetensors"))) < 2:
        assert proc.poll() is None, "the fit ended before it could be killed"
        assert time.monotonic() < deadline, "no eigenvalue shard appeared in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "factors" / "factors").exists()

    subprocess.run(_cmd(tmp_path, "killed"), check=True, env={**os.environ, "SLOW": "0"})
    resumed = json.loads((tmp_path / "killed.json").read_text())
    # 12 covariance shards + ≥ 2 eigenvalue shards came from the killed run
    assert resumed["loaded"] >= 14 and resumed["computed"] <= 10, resumed

    # An uninterrupted run that replays the eigenvalue pass from its in-memory cache: the
    # 12 eigenvalue shards are not recomputed by the model, and the factors are the same bits.
    subprocess.run(_cmd(tmp_path, "fresh", 64.0), check=True, env={**os.environ, "SLOW": "0"})
    fresh = json.loads((tmp_path / "fresh.json").read_text())
    assert fresh == {"loaded": 0, "computed": 24, "replayed": 12}
    a, b = _factors(tmp_path, "killed"), _factors(tmp_path, "fresh")
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not (tmp_path / "killed" / "factors" / ".factors.partial").exists()


INDEX_SCRIPT = """
{prelude}from influscope.index import IndexConfig, build_index
inf = Influence(tiny_gpt2(n_embd=16), SlowTask(), modules="mlp", device="cpu")
cfg = IndexConfig(k_in=8, k_out=8, dtype="float32", batch_size=4, shard_size=4)
build_index(inf.tracked, random_lm_data(40, seed=1), sys.argv[1], cfg)
"""


def _index_cmd(tmp: Path, root: str) -> list[str]:
    script = tmp / "index_script.py"
    script.write_text(INDEX_SCRIPT.format(prelude=PRELUDE.format(tests=str(TESTS))))
    return [sys.executable, str(script), str(tmp / root)]


@pytest.mark.slow
def test_index_killed_mid_build_resumes_identically(tmp_path):
    """SIGKILL while the projected gradient shards are being written; the rerun keeps the
    finished shards and writes the rest, and every file equals an uninterrupted build."""
    import numpy as np

    proc = subprocess.Popen(_index_cmd(tmp_path, "killed"), env={**os.environ, "SLOW": "0.1"})
    shards = tmp_path / "killed" / "shards"
    deadline = time.monotonic() + 90
    while len(list(shards.glob("shard-*.npy"))) < 2:
        assert proc.poll() is None, "the index build ended before it could be killed"
        assert time.monotonic() < deadline, "no gradient shard appeared in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npy")}
    assert 2 <= len(done_before) < 10, done_before

    env = {**os.environ, "SLOW": "0"}
    subprocess.run(_index_cmd(tmp_path, "killed"), check=True, env=env)
    subprocess.run(_index_cmd(tmp_path, "fresh"), check=True, env=env)
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npy")}
    assert len(after) == 10
    for name, mtime in done_before.items():  # finished shards were kept, not rewritten
        assert after[name] == mtime, name
    assert not list(shards.glob(".*.tmp")), "a temporary file survived"
    for name in after:
        a = np.load(shards / name)
        b = np.load(tmp_path / "fresh" / "shards" / name)
        assert np.array_equal(a, b), name
    for name in ("projector.safetensors", "curvature.safetensors"):
        ta = read_tensors(tmp_path / "killed" / name)
        tb = read_tensors(tmp_path / "fresh" / name)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
