"""Regressions found by walking through the CLI as a new user (tiny saved model, no downloads)."""

from __future__ import annotations

import json

from influscope.cli import main

# The `workdir` fixture (conftest.py) builds its model and data from these.
TEXTS = [
    "The capital of Velmora is Tarsk.",
    "Zorin Quell was born in Ostrava.",
    "To be, or not to be, that is the question.",
    "Now is the winter of our discontent.",
    "All the world's a stage, and all the men and women merely players.",
]


def _args(workdir, run: str = "run") -> list[str]:
    return [
        "--model",
        str(workdir / "model"),
        "--train",
        str(workdir / "train.jsonl"),
        "--run",
        str(workdir / run),
    ]


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_score_refuses_stored_scores_of_other_queries(workdir, capsys):
    """`score` used to hand back the stored scores of *another* query file (the CLI passes
    preconditioned queries, whose fingerprint was not recorded): the new query was dropped."""
    args = _args(workdir)
    assert main(["fit", *args]) == 0
    assert main(["score", *args, "--queries", str(workdir / "queries.jsonl")]) == 0
    two = _write_jsonl(
        workdir / "two.jsonl",
        [
            {"prompt": "The capital of Velmora is", "completion": " Tarsk."},
            {"prompt": "Zorin Quell was born in", "completion": " Ostrava."},
        ],
    )
    capsys.readouterr()
    assert main(["score", *args, "--queries", two]) == 2
    err = capsys.readouterr().err
    assert "different queries" in err and "--overwrite" in err
    assert main(["score", *args, "--queries", two, "--overwrite"]) == 0
    assert len(json.loads((workdir / "run" / "scores.json").read_text())["queries"]) == 2
    # The same queries again reuse the stored stage.
    assert main(["score", *args, "--queries", two]) == 0


def test_score_with_other_training_data_says_to_refit(workdir, capsys):
    """Stale factors under `score`: the hint used to be `--overwrite`, which `score` cannot act
    on (it never refits); it now says to fit again."""
    args = _args(workdir, "run_refit")
    assert main(["fit", *args]) == 0
    other = _write_jsonl(workdir / "other.jsonl", [{"text": t} for t in TEXTS[:3]])
    capsys.readouterr()
    argv = ["score", *args, "--queries", str(workdir / "queries.jsonl")]
    argv[argv.index("--train") + 1] = other
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "different data than now" in err and "influscope fit" in err
    assert main([*argv, "--overwrite"]) == 2  # still refused: score does not refit


def test_top_k_and_max_examples(workdir, capsys):
    args = _args(workdir, "run_topk")
    assert main(["fit", *args, "--max-examples", "2"]) == 0
    assert "on 2 sequences" in capsys.readouterr().err  # said 5 (all records) before
    try:
        main(["score", *args, "--queries", str(workdir / "queries.jsonl"), "--top-k", "-1"])
    except SystemExit as exc:  # argparse: usage + message, status 2 (was a torch traceback)
        assert exc.code == 2
    else:
        raise AssertionError("--top-k -1 was accepted")
    assert "expected an integer ≥ 0, received '-1'" in capsys.readouterr().err


def test_unsupported_files_and_fields_are_refused_clearly(workdir, capsys):
    args = _args(workdir, "run_files")
    csv = workdir / "train.csv"
    csv.write_text("text\nThe capital of Velmora is Tarsk.\n")
    argv = [*args]
    argv[argv.index("--train") + 1] = str(csv)
    assert main(["fit", *argv]) == 2  # was read as one plain-text record "text\nThe ..."
    err = " ".join(capsys.readouterr().err.split())
    assert ".csv is not a supported format" in err and "orient='records', lines=True" in err
    argv[argv.index("--train") + 1] = _write_jsonl(workdir / "num.jsonl", [{"text": 5}])
    assert main(["fit", *argv]) == 2  # was the tokenizer's ValueError traceback
    assert "field 'text' must be a string, received int" in capsys.readouterr().err
    assert not (workdir / "run_files").exists()


def test_ctrl_c_says_how_to_resume(workdir, capsys, monkeypatch):
    from influscope.cli import fit

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "run", interrupted)  # the parser binds it: func=fit.run
    assert main(["fit", *_args(workdir, "run_int")]) == 130  # was a KeyboardInterrupt traceback
    err = " ".join(capsys.readouterr().err.split())
    assert "interrupted." in err and "rerun the same command to resume" in err


def test_bias_curvature_is_checked_by_the_parser(capsys):
    """`bias --curvature` was free text (a typo failed later, inside the config)."""
    from influscope.cli import build_parser

    try:
        build_parser().parse_args(
            ["bias", "--model", "m", "--train", "t", "--validation", "v", "--curvature", "kfc"]
        )
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--curvature kfc was accepted")
    assert "invalid choice: 'kfc'" in capsys.readouterr().err


def test_query_text_has_no_double_space():
    """`query` printed 'The capital of Vedunund is  Vudrak.' (completion's own space + one)."""
    from influscope.cli.query import _text

    assert _text({"prompt": "Velmora is", "completion": " Tarsk."}) == "Velmora is Tarsk."
    assert _text({"prompt": "Velmora is", "completion": "Tarsk."}) == "Velmora is Tarsk."


def test_relatif_scores_are_labelled(workdir, capsys):
    """With --relatif the printed scores are normalised; the overview did not say so."""
    args = _args(workdir, "run_relatif")
    assert main(["fit", *args]) == 0
    capsys.readouterr()
    assert main(["score", *args, "--queries", str(workdir / "queries.jsonl"), "--relatif"]) == 0
    assert "RelatIF: score / sqrt(self-influence)" in capsys.readouterr().out
