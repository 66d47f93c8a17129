"""Units of ``benchmarks/gpu_check.py`` (``benchmarks/gpu/``) that only a CUDA machine would
otherwise exercise.

The prepared GPU script must work the first time it meets a GPU, so the parts that take
CUDA-only code paths are checked here on the CPU: the device it picks (a bare ``"cuda"`` must
get an index before ``torch.cuda.set_device``) and the watchdog around the CUDA test subprocess
(a hung grandchild, e.g. an NCCL worker, must not stall the check).
"""

from __future__ import annotations

import importlib
import json
import sys
import time

import pytest
import torch
from torch.cuda._utils import _get_device_index


@pytest.fixture(scope="module")
def gpu_check():
    return importlib.import_module("benchmarks.gpu_check")


@pytest.mark.parametrize("name", [None, "cuda"])
def test_default_cuda_device_gets_an_index(gpu_check, monkeypatch, name):
    """``torch.cuda.set_device(torch.device("cuda"))`` raises ValueError; the script's device
    must carry the current index (what ``set_device`` resolves it with is checked directly)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    device = gpu_check.resolve_device(name)
    assert device == torch.device("cuda", 0)
    assert _get_device_index(device) == 0  # the call inside torch.cuda.set_device
    with pytest.raises(ValueError, match="specified index"):
        _get_device_index(torch.device("cuda"))  # what the script passed before


def test_explicit_devices_are_kept(gpu_check, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_check.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert gpu_check.resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_cuda_is_a_clear_error(gpu_check, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.resolve_device(None) == torch.device("cpu")
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        gpu_check.resolve_device("cuda")


#: A child that starts a grandchild (inheriting the output pipe, like pytest's spawned NCCL
#: ranks), then either hangs too or exits at once, leaving the grandchild behind.
_FAMILY = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print('started', flush=True); "
    "time.sleep({child_sleep})"
)


def test_watchdog_kills_a_hung_process_group(gpu_check):
    """At the deadline the whole group goes: the read does not wait for the grandchild."""
    t0 = time.perf_counter()
    lines, returncode, timed_out = gpu_check.stream_command(
        [sys.executable, "-c", _FAMILY.format(child_sleep=60)], timeout_s=3
    )
    assert time.perf_counter() - t0 < 20
    assert timed_out and returncode is None
    assert lines == ["started"]


def test_processes_left_behind_do_not_block_the_read(gpu_check):
    """The command exits (status 0) but leaves a grandchild holding the pipe: no stall."""
    t0 = time.perf_counter()
    lines, returncode, timed_out = gpu_check.stream_command(
        [sys.executable, "-c", _FAMILY.format(child_sleep=0)], timeout_s=45
    )
    assert time.perf_counter() - t0 < 20
    assert not timed_out and returncode == 0
    assert lines == ["started"]


def test_a_failing_stage_still_writes_the_report(gpu_check, monkeypatch, tmp_path):
    """An exception in the influscope stage (say a CUDA OOM) is recorded in the JSON and the
    markdown, and the exit status is 1; the run does not end without a report."""

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu_check, "bench_influscope", fail)
    out = tmp_path / "gpu_check"
    argv = ["--quick", "--skip-tests", "--device", "cpu", "--out", str(out), "--n-train", "4"]
    assert gpu_check.main(argv) == 1
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["influscope"]["failed"] == "RuntimeError: CUDA out of memory (simulated)"
    assert any("in fail" in line for line in report["influscope"]["traceback"])
    assert "influscope: **failed**" in (out / "gpu_check.md").read_text()
