"""(a) The CUDA test subset: ``pytest -m cuda tests/device/test_cuda.py`` under a watchdog."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from benchmarks.gpu.common import (
    REPO,
    log,
)


def stream_command(
    cmd: list[str], timeout_s: float, env: dict[str, str] | None = None, prefix: str = "    | "
) -> tuple[list[str], int | None, bool]:
    """Run ``cmd`` in its own process group, echoing its output, for at most ``timeout_s``.

    The whole group is killed at the deadline, and any of its processes left behind after the
    command exits: a grandchild (pytest's spawned NCCL ranks) inherits the output pipe, so
    killing only the child would leave the read blocked until a hung grandchild exits — the
    check would stall instead of reporting a timeout.

    Returns:
        ``(output lines, return code (None when killed at the deadline), deadline reached)``.
    """
    lines: list[str] = []
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, killed as a whole
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # stream the output as progress
            lines.append(line.rstrip())
            print(f"{prefix}{line.rstrip()}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode: int | None = proc.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        returncode, timed_out = None, True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the deadline, or processes left behind
    proc.wait()
    reader.join(timeout=10)
    return lines, returncode, timed_out


def run_cuda_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``pytest -m cuda tests/device/test_cuda.py`` and summarise its JUnit report.

    Returns:
        ``{"status": passed|failed|skipped|timeout|error, "passed", "failed", "errors",
        "skipped", "seconds", "returncode", "tail"}``.
    """
    junit = out / "pytest_cuda.xml"
    junit.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "tests/device/test_cuda.py",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "--timeout=150",
        f"--junitxml={junit}",
    ]
    log(f"(a) running: {' '.join(cmd[2:])}")
    env = {**os.environ, "INFLUSCOPE_PROGRESS": "0"}
    t0 = time.perf_counter()
    result: dict[str, Any] = {"command": " ".join(cmd[2:])}
    lines, returncode, timed_out = stream_command(cmd, timeout_s, env, prefix="    pytest | ")
    if timed_out:
        result.update(status="timeout", returncode=None)
        log(f"(a) cuda tests killed after {timeout_s:.0f} s")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["tail"] = lines[-15:]
    if "status" in result:
        return result
    result["returncode"] = returncode
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.is_file():
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    result.update(
        passed=passed, failed=counts["failures"], errors=counts["errors"], skipped=counts["skipped"]
    )
    if returncode == 0 and passed > 0:
        result["status"] = "passed"
    elif returncode == 0 and counts["skipped"] == counts["tests"]:
        result["status"] = "skipped"
    elif counts["failures"] or counts["errors"]:
        result["status"] = "failed"
    else:
        result["status"] = "error"
    log(
        f"(a) cuda tests: {result['status']} — {passed} passed, {counts['failures']} failed, "
        f"{counts['errors']} errors, {counts['skipped']} skipped in {result['seconds']} s"
    )
    return result
