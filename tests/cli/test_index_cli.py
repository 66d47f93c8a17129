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


def test_trackstar_index_then_ann_query(workdir, capsys):
    import pytest
    import torch
    from transformers import AutoModelForCausalLM

    pytest.importorskip("faiss")
    args = _args(workdir)
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    moments = workdir / "moments.safetensors"
    from safetensors.torch import save_file

    save_file({n: torch.rand(p.shape) + 0.1 for n, p in model.named_parameters()}, str(moments))
    ts = ["index", *args, "--name", "ts", "--k-in", "8", "--k-out", "8", "--curvature", "identity"]
    capsys.readouterr()
    assert main([*ts, "--optimizer", "adam"]) == 2  # refused before the model loads
    err = " ".join(capsys.readouterr().err.split())
    assert "needs Adam's second moments: pass --optimizer-state" in err and "Loading" not in err
    assert main([*ts, "--optimizer", "adam", "--optimizer-state", str(moments), "--normalize"]) == 0
    meta = json.loads((workdir / "run" / "index" / "ts" / "meta.json").read_text())
    assert meta["config"]["optimizer"] == "adam" and meta["config"]["normalize"] is True
    run = ["--run", str(workdir / "run"), "--index", "ts"]
    assert main(["ann", *run, "--backend", "faiss-flat"]) == 0
    queries = ["--queries", str(workdir / "queries.jsonl")]
    exact, via = workdir / "exact.json", workdir / "via.json"
    assert main(["query", *args, *queries, "--index", "ts", "--out", str(exact)]) == 0
    cmd = ["query", *args, *queries, "--index", "ts", "--ann", "faiss-flat", "--ann-k", "4"]
    assert main([*cmd, "--out", str(via)]) == 0
    a, b = json.loads(exact.read_text()), json.loads(via.read_text())
    assert b["candidates"]["ann"] == 4
    for qa, qb in zip(a["queries"], b["queries"]):
        assert [h["index"] for h in qa["top"][:4]] == [h["index"] for h in qb["top"]]
        assert all(-1 - 1e-5 <= h["score"] <= 1 + 1e-5 for h in qa["top"])  # cosines
    # a FAISS index copied beside another gradient index (other moments) is refused
    import shutil

    save_file({n: torch.rand(p.shape) + 0.1 for n, p in model.named_parameters()}, str(moments))
    other = [*ts, "--optimizer", "adam", "--optimizer-state", str(moments), "--normalize"]
    assert main([*other[:-1], "--name", "ts2", "--normalize"]) == 0
    idx = workdir / "run" / "index"
    shutil.copytree(idx / "ts" / "ann", idx / "ts2" / "ann")
    capsys.readouterr()
    stale = ["query", *args, *queries, "--index", "ts2", "--ann", "faiss-flat", "--out", str(via)]
    assert main(stale) == 2  # the CLI names the fix and exits with status 2
    err = " ".join(capsys.readouterr().err.split())
    assert "built for another gradient index" in err and "influscope ann --index ts2" in err
