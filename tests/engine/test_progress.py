"""Every long step reports progress: the passes (computed and replayed), the
eigendecomposition, the query preconditioning and the saves, each with a time left."""

from __future__ import annotations

import re
import time

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig, progress
from influscope.progress import recording, tmp_bytes, track, watch


def test_fit_and_score_announce_a_bar_for_every_long_step(tmp_path):
    train = random_lm_data(10, seed=1)
    queries = random_lm_data(3, seed=2, prompt_len=2)
    inf = Influence(tiny_gpt2(), "causal_lm", modules="mlp", run_dir=tmp_path, device="cpu")
    with recording() as bars:
        op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4, shard_size=8))
        inf.score(queries, train, op, ScoreConfig(query_rank=3), name="s")
    seen = {desc: (total, unit) for desc, total, unit in bars}
    # two shards of 8 (rounded to whole batches of 4): covariance computed, eigenvalues replayed
    assert seen["covariance 1/2"] == (2, "batch") and seen["covariance 2/2"] == (1, "batch")
    assert seen["eigenvalues 1/2 (replayed from memory)"] == (2, "batch")
    assert seen["eigendecomposition"] == (len(inf.layers), "layer")
    assert seen["query gradients"] == (1, "batch")
    assert seen["query gradients: preconditioning"] == (len(inf.layers), "layer")
    factors = sum(t.numel() * t.element_size() for t in op.tensors().values())
    assert seen["saving factors/factors"] == (factors, "B")
    assert "saving scores/s" in seen
    assert any(d.startswith("saving covariance shard") for d in seen)  # resume store


def test_bars_show_elapsed_and_time_left(monkeypatch, capsys):
    monkeypatch.setenv("INFLUSCOPE_PROGRESS", "1")
    monkeypatch.setattr(progress, "_on_terminal", lambda: True)
    for _ in track(range(3), "eigendecomposition", unit="layer"):
        time.sleep(0.15)  # tqdm redraws at most every 0.1 s
    err = capsys.readouterr().err
    assert "eigendecomposition" in err and re.search(r"\d\d:\d\d<\d\d:\d\d", err), err


def test_off_a_terminal_bars_are_timed_lines(monkeypatch, capsys):
    """A log file gets one plain line per interval (and a last one), not redrawn bars."""
    monkeypatch.setenv("INFLUSCOPE_PROGRESS", "1")
    monkeypatch.setattr(progress, "_on_terminal", lambda: False)
    monkeypatch.setenv("INFLUSCOPE_PROGRESS_SECONDS", "0")
    assert list(track(range(3), "eigendecomposition", unit="layer")) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2].split(",")[0] for line in lines] == [
        "1/3 layer (33 %)",
        "2/3 layer (67 %)",
        "3/3 layer (100 %)",
    ], lines
    assert all(line.startswith("influscope: eigendecomposition: ") for line in lines)
    assert "left" in lines[0] and "\r" not in "".join(lines)
    monkeypatch.setenv("INFLUSCOPE_PROGRESS_SECONDS", "3600")  # a short step says nothing
    assert list(track(range(3), "covariance")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_watch_off_a_terminal_prints_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INFLUSCOPE_PROGRESS", "1")
    monkeypatch.setattr(progress, "_on_terminal", lambda: False)
    monkeypatch.setenv("INFLUSCOPE_PROGRESS_SECONDS", "0")
    with watch("saving factors", 2 * 2**30, lambda: 2**30, interval=0.01):
        time.sleep(0.1)
    err = capsys.readouterr().err
    assert "influscope: saving factors: 1.00/2.00 GiB (50 %)" in err, err
    assert err.splitlines()[-1].startswith("influscope: saving factors: 2.00/2.00 GiB (100 %)")


def test_watch_follows_the_bytes_of_a_save(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INFLUSCOPE_PROGRESS", "1")
    monkeypatch.setattr(progress, "_on_terminal", lambda: True)
    (tmp_path / ".factors.abc.tmp").mkdir()
    (tmp_path / ".factors.abc.tmp" / "tensors.safetensors").write_bytes(b"x" * 300)
    (tmp_path / ".meta.json.q.tmp").write_bytes(b"y" * 50)  # another file's temporary
    (tmp_path / "factors").mkdir()  # a finished stage is not counted
    assert tmp_bytes(tmp_path, "factors") == 300
    assert tmp_bytes(tmp_path, "meta.json") == 50
    polled = []

    def done() -> float:
        polled.append(1)
        return tmp_bytes(tmp_path, "factors")

    with recording() as bars, watch("saving factors", 600, done, interval=0.01):
        time.sleep(0.1)  # the long call
    assert bars == [("saving factors", 600, "B")] and polled
    assert "saving factors" in capsys.readouterr().err


def test_manual_bar_off_a_terminal_prints_lines_with_postfix(monkeypatch, capsys):
    """The refinement's bar (update / set_postfix / close) as lines in a log."""
    monkeypatch.setenv("INFLUSCOPE_PROGRESS", "1")
    monkeypatch.setattr(progress, "_on_terminal", lambda: False)
    monkeypatch.setenv("INFLUSCOPE_PROGRESS_SECONDS", "0")
    with recording() as bars:
        b = progress.bar(2, "refine (neumann)")
    assert bars == [("refine (neumann)", 2, "step")] and isinstance(b, progress.LineBar)
    b.set_postfix(residual="0.5")
    b.update(1)
    b.update(1)
    b.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("influscope: refine (neumann): 1/2 step (50 %)")
    assert lines[0].endswith("[residual=0.5]") and "left" in lines[0]
    assert lines[-1].startswith("influscope: refine (neumann): 2/2 step (100 %)")
    monkeypatch.setenv("INFLUSCOPE_PROGRESS", "0")
    assert progress.bar(2, "refine (neumann)") is None
