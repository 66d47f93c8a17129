"""Refuse before computing: a stale stage, an unwritable run directory or a bad data file is
refused before any forward pass (counted on the model class), and bad data before the model
is even loaded (counted on the loader)."""

from __future__ import annotations

import json
import os

import pytest
import transformers

import influscope.loading
from influscope.cli import main

TEXTS = [f"line {i} of the little corpus about cats and dogs number {i}" for i in range(8)]


@pytest.fixture(scope="module")
def scored(workdir):
    """``workdir`` with ``run/`` holding fitted factors and a ``scores`` stage (rank 4)."""
    common = _common(workdir)
    assert main(["fit", *common]) == 0
    assert main(["score", *common, "--queries", str(workdir / "queries.jsonl"), "--rank", "4"]) == 0
    return workdir


def _common(d, run=None):
    return [
        "--model",
        str(d / "model"),
        "--train",
        str(d / "train.jsonl"),
        "--run",
        str(run or d / "run"),
    ]


@pytest.fixture
def forwards(monkeypatch):
    """Counts the forward passes of every GPT-2 LM (the class the CLI loads)."""
    calls = []
    original = transformers.GPT2LMHeadModel.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "forward", counted)
    return calls


@pytest.fixture
def loads(monkeypatch):
    """Counts model loads (``influscope.loading.load_model``, which every command calls)."""
    calls = []
    original = influscope.loading.load_model

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(influscope.loading, "load_model", counted)
    return calls


def _error(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_score_refine_against_a_stored_stage_is_refused_before_any_pass(scored, forwards, capsys):
    queries = str(scored / "queries.jsonl")
    capsys.readouterr()
    assert (
        main(["score", *_common(scored), "--queries", queries, "--rank", "4", "--refine", "2"]) == 2
    )
    err = _error(capsys)
    assert forwards == []  # no query pass, no refinement: refused from the stage's meta alone
    assert "config.refine_steps: 0 → 2" in err
    assert "--overwrite" in err and "--name" in err
    assert "{" not in err  # the differing key, not two whole config dicts


def test_new_queries_in_a_run_with_scores_are_refused_before_any_pass(scored, forwards, capsys):
    other = scored / "other-queries.jsonl"
    other.write_text(json.dumps({"prompt": "line 3 of the", "completion": " little"}) + "\n")
    capsys.readouterr()
    assert main(["score", *_common(scored), "--queries", str(other), "--rank", "4"]) == 2
    err = _error(capsys)
    assert forwards == []
    assert "queries: fingerprint" in err and "the queries' tokens differ" in err
    assert "--name" in err
    # with another --name the same command computes (and the stored stage is untouched)
    assert (
        main(["score", *_common(scored), "--queries", str(other), "--rank", "4", "--name", "s2"])
        == 0
    )
    assert forwards and (scored / "run" / "scores" / "s2" / "meta.json").is_file()


def test_a_matching_stored_stage_is_still_reused(scored, capsys):
    queries = str(scored / "queries.jsonl")
    assert main(["score", *_common(scored), "--queries", queries, "--rank", "4"]) == 0
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["fit", "score"])
def test_an_unwritable_run_directory_is_refused_before_the_model_loads(
    scored, tmp_path, command, forwards, loads, capsys
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    extra = ["--queries", str(scored / "queries.jsonl")] if command == "score" else []
    capsys.readouterr()
    assert main([command, *_common(scored, run=blocker / "run"), *extra]) == 2
    err = _error(capsys)
    assert "Cannot write to the run directory" in err and str(blocker / "run") in err
    assert "Nothing was computed" in err
    assert loads == [] and forwards == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_run_directory_is_refused_before_the_model_loads(
    scored, tmp_path, forwards, loads, capsys
):
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o555)
    try:
        assert main(["fit", *_common(scored, run=run)]) == 2
    finally:
        run.chmod(0o755)
    assert "Cannot write to the run directory" in _error(capsys)
    assert loads == [] and forwards == []


@pytest.mark.parametrize("which", ["train", "queries"])
def test_an_empty_data_file_is_refused_before_the_model_loads(
    scored, tmp_path, which, loads, capsys
):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = {"train": str(scored / "train.jsonl"), "queries": str(scored / "queries.jsonl")}
    args[which] = str(empty)
    argv = ["score", "--model", str(scored / "model"), "--run", str(scored / "run")]
    assert main([*argv, "--train", args["train"], "--queries", args["queries"]]) == 2
    assert f"{empty} holds no records" in _error(capsys)
    assert loads == []  # the 38 s / 1.3 GB of a real LLM are not spent


def test_a_bad_record_names_the_file_and_its_1_based_number(scored, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "typo"}) + "\n")
    model = str(scored / "model")
    assert main(["fit", "--model", model, "--train", str(train), "--run", str(tmp_path)]) == 2
    err = _error(capsys)
    assert f"{train}: Record 2 has keys ['txt']" in err  # not "Record 1", and the file is named


def _argv(command: str, d, empty) -> list[str]:
    """``command``'s arguments with the empty file as the data file it reads last."""
    model, train, queries = str(d / "model"), str(d / "train.jsonl"), str(empty)
    run = ["--run", str(d / "run")]
    return {
        "query": ["query", "--model", model, "--train", train, *run, "--queries", queries],
        "damping": ["damping", "--model", model, "--train", train, *run, "--queries", queries],
        "dda": ["dda", "--model", model, "--train", train, *run, "--queries", queries],
        "curate": [
            "curate",
            model,
            "--train",
            train,
            "--benchmark",
            queries,
            "--out",
            str(d / "c.json"),
        ],
        "unlearn": ["unlearn", model, "--train", queries, "--forget", "1", "--out", str(d / "u")],
        "probe": ["probe", "length", "--model", model, "--data", queries, "--train-length", "4"],
    }[command]


@pytest.mark.parametrize("command", ["query", "damping", "dda", "curate", "unlearn", "probe"])
def test_every_command_reads_its_data_before_loading_the_model(
    scored, tmp_path, command, loads, capsys
):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(_argv(command, scored, empty)) == 2
    assert f"{empty} holds no records" in _error(capsys)
    assert loads == []
