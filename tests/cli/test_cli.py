"""The command line end to end on a tiny saved model: fit, score, errors, --help."""

from __future__ import annotations

import json
import subprocess
import sys

from influscope.cli import build_parser, main

# The `workdir` fixture (conftest.py) builds its model and data from these.
TEXTS = [
    "The capital of Velmora is Tarsk.",
    "Zorin Quell was born in Ostrava.",
    "To be, or not to be, that is the question.",
    "Now is the winter of our discontent.",
    "All the world's a stage, and all the men and women merely players.",
]


def test_fit_then_score_writes_report(workdir, capsys):
    args = [
        "--model",
        str(workdir / "model"),
        "--train",
        str(workdir / "train.jsonl"),
        "--run",
        str(workdir / "run"),
    ]
    assert main(["fit", *args, "--curvature", "ekfac"]) == 0
    assert (workdir / "run" / "factors" / "factors" / "tensors.safetensors").is_file()
    assert main(["score", *args, "--queries", str(workdir / "queries.jsonl"), "--top-k", "2"]) == 0
    html = (workdir / "run" / "scores.html").read_text()
    assert "Velmora" in html and "<script>alert" not in html
    top = json.loads((workdir / "run" / "scores.json").read_text())
    assert len(top["queries"][0]["proponents"]) == 2
    out = capsys.readouterr().out
    assert "Top proponents" in out


def test_cli_errors_are_clear_and_exit_2(workdir, capsys):
    code = main(
        [
            "fit",
            "--model",
            str(workdir / "missing"),
            "--train",
            str(workdir / "train.jsonl"),
            "--run",
            str(workdir / "run2"),
        ]
    )
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    (workdir / "empty.jsonl").write_text("")
    code = main(
        [
            "fit",
            "--model",
            str(workdir / "model"),
            "--train",
            str(workdir / "empty.jsonl"),
            "--run",
            str(workdir / "run2"),
        ]
    )
    assert code == 2
    assert "holds no records" in capsys.readouterr().err
    assert not (workdir / "run2").exists()


def test_help_explains_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")

    def walk(prefix, p):  # nested sub-commands too (e.g. `probe length`)
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for child, q in action.choices.items():
                    walk(f"{prefix} {child}", q)
            elif action.dest != "help":
                assert action.help, f"{prefix} --{action.dest} has no help"

    for name, p in sub.choices.items():
        walk(name, p)
    out = subprocess.run(
        [sys.executable, "-m", "influscope.cli", "score", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--rank" in out and "--queries" in out
    for name, p in sub.choices.items():  # every help text formats (a bare "%" would not)
        assert name in parser.format_help() and p.format_help()


def test_readme_python_example_runs(workdir, tmp_path):
    """The README's Python block, pointed at the tiny saved model."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace("runs/demo/model", str(workdir / "model"))
    code = code.replace("runs/mine", str(tmp_path / "mine"))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "mine" / "factors" / "factors" / "meta.json").is_file()
    assert len(namespace["tokens"]) == 2
