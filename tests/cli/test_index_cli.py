"""``influscope index`` / ``query`` on a tiny saved model, and ``--dry-run`` estimates."""

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
    "The river Velm runs through Tarsk to the sea.",
]


def _args(d):
    return ["--model", str(d / "model"), "--train", str(d / "train.jsonl"), "--run", str(d / "run")]


def test_index_then_query_with_bm25_and_rescoring(workdir, capsys):
    args = _args(workdir)
    assert main(["index", *args, "--dry-run"]) == 0
    assert not (workdir / "run" / "index").exists()  # dry run: nothing written
    assert main(["index", *args, "--k-in", "8", "--k-out", "8", "--shard-size", "4"]) == 0
    shards = sorted((workdir / "run" / "index" / "index" / "shards").glob("*.npy"))
    assert len(shards) == 2
    assert main(["fit", *args]) == 0
    queries = ["--queries", str(workdir / "queries.jsonl")]
    code = main(["query", *args, *queries, "--bm25", "3", "--top-k", "2", "--rescore"])
    assert code == 0
    out = json.loads((workdir / "run" / "index-query.json").read_text())
    assert out["stage"] == "ekfac" and out["candidates"] == {"bm25": 3, "index": 100, "ekfac": 2}
    top = out["queries"][0]["top"]
    assert len(top) == 2 and top[0]["text"] == TEXTS[0] and top[0]["score"] > top[1]["score"]
    # score-time damping re-damps the factors used to rescore
    rescore = ["query", *args, *queries, "--bm25", "3", "--top-k", "2", "--rescore"]
    assert main([*rescore, "--damping", "1e-6"]) == 0
    redamped = json.loads((workdir / "run" / "index-query.json").read_text())["queries"][0]
    assert redamped["top"][0]["score"] != top[0]["score"]


def test_fit_dry_run_prints_estimates(workdir, capsys):
    assert main(["fit", *_args(workdir), "--dry-run", "--name", "never"]) == 0
    assert not (workdir / "run" / "factors" / "never").exists()


def test_eigen_index_from_fitted_factors(workdir, capsys):
    args = _args(workdir)
    assert main(["fit", *args]) == 0  # reused when the first test already fitted them
    assert main(["index", *args, "--init", "eigen", "--name", "eig", "--k-in", "8"]) == 0
    meta = json.loads((workdir / "run" / "index" / "eig" / "meta.json").read_text())
    assert meta["operator"] == "diagonal" and "factors" in meta
    queries = ["--queries", str(workdir / "queries.jsonl")]
    out = workdir / "eig.json"
    assert main(["query", *args, *queries, "--index", "eig", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["stage"] == "index" and len(result["queries"][0]["top"]) == 6
