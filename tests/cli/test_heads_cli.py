"""`influscope score --per-head` end to end: stored per-head terms and the report's Heads section."""

from __future__ import annotations

from influscope.analysis import load_scores
from influscope.cli import main

# The `workdir` fixture (conftest.py) builds its model and data from these.
TEXTS = [
    "The capital of Velmora is Tarsk.",
    "Zorin Quell was born in Ostrava.",
    "Now is the winter of our discontent.",
]


def test_score_per_head_then_report(workdir, capsys):
    run = workdir / "run"
    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    args += ["--run", str(run), "--modules", "attn"]
    assert main(["fit", *args, "--curvature", "ekfac"]) == 0
    queries = ["--queries", str(workdir / "queries.jsonl")]
    assert main(["score", *args, *queries, "--per-head", "--top-k", "2"]) == 0
    scores, meta = load_scores(run)
    assert scores.per_head.shape[-1] == len(meta["heads"]) == 6 + 3  # c_attn: q,k,v × 2; c_proj
    assert scores.head_names[0] == "transformer.h.0.attn.c_attn:q.h0"
    assert main(["report", str(run), "--train", args[3], *queries, "--model", "none"]) == 0
    html = (run / "studies.html").read_text()
    assert "Heads: which attention heads carry the influence" in html


def test_score_per_head_on_mlp_layers_is_refused(workdir, capsys):
    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    args += ["--run", str(workdir / "run_mlp")]
    assert main(["fit", *args, "--curvature", "identity"]) == 0
    queries = ["--queries", str(workdir / "queries.jsonl")]
    assert main(["score", *args, *queries, "--per-head"]) == 2
    err = capsys.readouterr().err
    assert "not attention projections" in err and "modules='attn'" in err
