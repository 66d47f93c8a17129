"""``python -m benchmarks.gpu_check --quick`` runs end to end on the CPU (so the prepared GPU script does
not rot between the sessions that have a GPU) and writes its JSON and markdown table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_quick_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--quick",
            "--skip-tests",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["quick"] is True
    fit = report["influscope"]["fit"]
    assert fit["seconds"] > 0 and fit["tokens_per_s"] > 0
    assert report["influscope"]["tracked_layers"] == 9  # 3 blocks × (gate, up, down)
    table = (out / "gpu_check.md").read_text()
    assert "| fit: total | influscope |" in table and "pairwise scores" in table
