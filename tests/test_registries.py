"""The CLI's copied choice tuples stay equal to the registries they stand for."""

from __future__ import annotations

import subprocess
import sys

from influscope.cli import options as cli_options
from influscope.curvature import CURVATURES
from influscope.modules.selection import PRESETS
from influscope.tasks import TASKS


def test_cli_curvature_choices_equal_the_registry() -> None:
    assert set(cli_options.CURVATURES) == set(CURVATURES)


def test_cli_task_choices_equal_the_registry() -> None:
    assert set(cli_options.TASKS) == set(TASKS)


def test_modules_help_names_every_preset() -> None:
    for name in PRESETS:
        assert repr(name) in cli_options.MODULES_HELP, name


def test_python_dash_m_influscope_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "influscope", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "score" in out.stdout and "fit" in out.stdout


def test_a_curvature_registered_at_runtime_is_offered_by_the_cli(monkeypatch) -> None:
    # one file + one registry line: the CLI's choices come from the live registry
    from influscope.cli import build_parser
    from influscope.curvature import fit

    monkeypatch.setitem(fit.CURVATURES, "toy", fit.CURVATURES["identity"])
    parser = build_parser()
    argv = ["fit", "--model", "m", "--train", "t.jsonl", "--run", "r", "--curvature", "toy"]
    args = parser.parse_args(argv)
    assert args.curvature == "toy"
