"""Damping sweep: re-damped operators equal fresh fits, one pass equals separate scores."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence
from influscope.config import ScoreConfig
from influscope.errors import ConfigError
from influscope.scoring.damping import check_set_metrics, redamp, self_consistency

FULL = ScoreConfig(query_rank=None)


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2(n_embd=8)
    inf = Influence(model, "causal_lm", modules="mlp")
    train = random_lm_data(8)
    queries = random_lm_data(3, seed=1)
    op = inf.fit(train, FitConfig(curvature="ekfac"))
    return inf, train, queries, op


@pytest.mark.parametrize("rule,value", [("absolute", 1e-3), ("relative", 1e-2)])
def test_sweep_equals_fit_and_score_at_that_damping(setup, rule, value):
    inf, train, queries, op = setup
    sweep = inf.damping_sweep(
        queries,
        train,
        op,
        values=[value] if rule == "absolute" else [],
        relative=[value] if rule == "relative" else [],
        config=FULL,
        k=3,
    )
    fit = FitConfig(damping=value) if rule == "absolute" else FitConfig(damping_factor=value)
    fresh = inf.fit(train, fit)
    ref = inf.score(queries, train, fresh, FULL).pairwise
    got = sweep.scores[f"{rule} {value:.3g}"]
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    row = next(r for r in sweep.rows if r.setting.rule == rule)
    assert row.setting.per_layer == pytest.approx(fresh.damping, rel=1e-12)


def test_one_pass_sweep_equals_separate_scores(setup):
    inf, train, queries, op = setup
    values, relative = [1e-8, 1e-2], [1e-3, 1.0]
    sweep = inf.damping_sweep(queries, train, op, values, relative, config=FULL, k=2)
    assert len(sweep.rows) == 5  # + the reference relative 0.1
    for row in sweep.rows:
        s = row.setting
        cfg = (
            ScoreConfig(query_rank=None, damping=s.value)
            if s.rule == "absolute"
            else ScoreConfig(query_rank=None, damping_factor=s.value)
        )
        ref = inf.score(queries, train, op, cfg).pairwise
        torch.testing.assert_close(sweep.scores[s.label], ref, rtol=1e-9, atol=1e-12)
    r = sweep.rows[sweep.reference]
    assert r.spearman_vs_reference == pytest.approx(1.0)
    assert r.overlap_vs_reference == 1.0
    assert sweep.to_dict()["reference"] == sweep.reference


def test_score_time_damping_changes_scores(setup):
    inf, train, queries, op = setup
    a = inf.score(queries, train, op, ScoreConfig(query_rank=None, damping=1e-8)).pairwise
    b = inf.score(queries, train, op, FULL).pairwise
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_damping_is_a_config_error(setup, bad):
    inf, train, queries, op = setup
    with pytest.raises(ConfigError, match="finite and ≥ 0"):
        inf.damping_sweep(queries, train, op, values=[bad])
    with pytest.raises(ConfigError, match="finite and ≥ 0"):
        inf.damping_sweep(queries, train, op, values=[], relative=[bad])
    with pytest.raises(ConfigError, match="damping must be None or a finite number"):
        ScoreConfig(damping=bad)
    with pytest.raises(ConfigError, match="damping_factor must be None or a finite"):
        ScoreConfig(damping_factor=bad)


def test_empty_or_double_damping_is_a_config_error(setup):
    inf, train, queries, op = setup
    with pytest.raises(ConfigError, match="at least one value"):
        inf.damping_sweep(queries, train, op, values=[], relative=[])
    with pytest.raises(ConfigError, match="at most one"):
        ScoreConfig(damping=1e-3, damping_factor=0.1)
    with pytest.raises(ConfigError, match="exactly one"):
        redamp(op)


def test_identity_cannot_be_redamped(setup):
    inf, train, _, _ = setup
    op = inf.fit(train, FitConfig(curvature="identity"))
    with pytest.raises(ConfigError, match="Cannot re-damp"):
        redamp(op, damping=1e-3)


def test_self_consistency_and_check_values_on_constructed_case():
    pairwise = torch.tensor(
        [[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 5.0, 2.0], [1.0, 0.0, 0.5, 4.0]]
    )  # (Q=3, N=4)
    # query 0 ↔ 0 ranks 1st, query 1 ↔ 1 ranks 3rd, query 2 ↔ 3 ranks 1st
    top1, mean_rank = self_consistency(pairwise, [(0, 0), (1, 1), (2, 3)])
    assert top1 == pytest.approx(2 / 3)
    assert mean_rank == pytest.approx(5 / 3)
    # check sets: q0 {2} not top-1 but in top-2; q1 {2, 3} both top-2; q2 {1} missed
    top1, recall = check_set_metrics(pairwise, [[2], [2, 3], [1]], k=2)
    assert top1 == pytest.approx(1 / 3)
    assert recall == pytest.approx((1 + 1 + 0) / 3)
    with pytest.raises(ConfigError, match="out of range"):
        self_consistency(pairwise, [(0, 9)])


def test_sweep_recommends_by_self_consistency(setup):
    inf, train, _, op = setup
    queries = train.subset([0, 1, 2])
    sweep = inf.damping_sweep(
        queries, train, op, [1e-8], [1.0], config=FULL, k=2, pairs=[(0, 0), (1, 1), (2, 2)]
    )
    assert sweep.criterion == "self_consistency"
    best = sweep.rows[sweep.best]
    assert best.self_top1 == max(r.self_top1 for r in sweep.rows)


def test_damping_report_plots_every_rule_and_escapes(setup):
    from influscope.report.damping import damping_report, damping_svg
    from influscope.report.html import render_html

    inf, train, _, op = setup
    queries = train.subset([0, 1])
    sweep = inf.damping_sweep(
        queries, train, op, [1e-8, 1e-4], [1e-2, 1.0], config=FULL, k=2, pairs=[(0, 0), (1, 1)]
    )
    svg = damping_svg(sweep)
    # ρ, overlap and self-consistency for each of the two rules
    assert svg.count("<polyline") == 6 and "self-consistency top-1 (relative)" in svg
    page = render_html(damping_report(sweep, title="<sweep>"))
    assert "&lt;sweep&gt;" in page and "<sweep>" not in page
    assert "Recommended by self_consistency" in page


# The `workdir` fixture (conftest.py) builds its model and data from these.
TEXTS = [
    "The capital of Velmora is Tarsk.",
    "Zorin Quell was born in Ostrava.",
    "To be, or not to be, that is the question.",
    "Now is the winter of our discontent.",
]


def test_cli_damping_sweep_and_score_override(workdir, capsys):
    from influscope.cli import main

    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    args += ["--run", str(workdir / "run")]
    assert main(["fit", *args]) == 0
    check = workdir / "check.json"
    check.write_text(json.dumps({"check": [[0]], "pairs": [[0, 0]]}))
    q = ["--queries", str(workdir / "queries.jsonl")]
    sweep = ["damping", *args, *q, "--values", "1e-8", "1e-3", "--relative", "1e-2"]
    assert main([*sweep, "--check-file", str(check), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "damping sweep" in out and "recommended by check" in out
    result = json.loads((workdir / "run" / "damping.json").read_text())
    assert len(result["rows"]) == 4 and result["criterion"] == "check"
    page = (workdir / "run" / "damping.html").read_text()
    assert page.count("<polyline") >= 2 and "Recommended by check" in page
    assert main(["score", *args, *q, "--top-k", "2", "--damping", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "absolute 0.0001 (score-time override)" in out
    html = (workdir / "run" / "scores.html").read_text()
    assert "score-time override" in html
    assert main(["score", *args, *q, "--damping", "-1", "--overwrite"]) == 2
    assert "finite number ≥ 0" in capsys.readouterr().err


def test_every_scoring_command_takes_damping_options():
    # issue 16: --damping / --damping-factor on every command that scores
    import argparse

    from influscope.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    relative_only = {"bias"}  # its config is relative-only: --damping-factor
    for name in ("fit", "score", "damping", "dda", "trajectory", "unlearn", "curate", "bias"):
        options = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert "--damping-factor" in options or name == "damping", name
        if name not in relative_only and name != "damping":
            assert "--damping" in options, name
    query = sub.choices["query"]
    assert {"--damping", "--damping-factor"} <= {
        o for a in query._actions for o in a.option_strings
    }


def test_damping_kwargs_refuses_both_and_bad_values():
    import argparse

    from influscope.cli.options import damping_kwargs

    assert damping_kwargs(argparse.Namespace(damping=None, damping_factor=None)) == {}
    assert damping_kwargs(argparse.Namespace(damping=1e-3, damping_factor=None)) == {
        "damping": 1e-3
    }
    with pytest.raises(ConfigError, match="not both"):
        damping_kwargs(argparse.Namespace(damping=1e-3, damping_factor=0.1))
    with pytest.raises(ConfigError, match="finite and ≥ 0"):
        damping_kwargs(argparse.Namespace(damping=None, damping_factor=float("nan")))
