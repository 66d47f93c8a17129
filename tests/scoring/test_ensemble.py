"""Ensembles of scores: mean, standard error and top-k rank stability (scoring/ensemble.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.errors import ConfigError, DataError, StaleArtifactError
from influscope.scoring.ensemble import EnsembleScores
from influscope.scoring.pairwise import Scores

# The `workdir` fixture (conftest.py) builds the CLI test's model and data from these.
TEXTS = [
    "The capital of Velmora is Tarsk.",
    "Zorin Quell was born in Ostrava.",
    "To be, or not to be, that is the question.",
    "Now is the winter of our discontent.",
]


def _scores(pairwise: torch.Tensor, indices=None) -> Scores:
    n = pairwise.shape[1]
    return Scores(pairwise=pairwise, layer_names=["l"], train_indices=indices or list(range(n)))


def test_identical_members_have_zero_spread() -> None:
    p = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ens = EnsembleScores.from_members([_scores(p.clone()) for _ in range(4)])
    assert torch.equal(ens.sem, torch.zeros_like(p))
    assert torch.allclose(ens.mean, p)
    assert torch.equal(ens.stability(3), torch.ones(3, dtype=torch.float64))
    for _, _mean, sem, stab in ens.top(1, 3):
        assert sem == 0.0 and stab == 1.0


def test_mean_and_sem_match_numpy() -> None:
    rng = np.random.default_rng(1)
    stack = rng.normal(size=(5, 2, 9))
    ens = EnsembleScores.from_members([_scores(torch.from_numpy(m)) for m in stack])
    np.testing.assert_allclose(ens.mean.numpy(), stack.mean(0))
    np.testing.assert_allclose(ens.sem.numpy(), stack.std(0, ddof=1) / np.sqrt(5))
    assert ens.members.shape == (5, 2, 9)
    top = ens.top(0, 4)
    assert [i for i, *_ in top] == list(np.argsort(-stack.mean(0)[0])[:4])
    assert top[0][2] == pytest.approx(float(ens.sem[0, top[0][0]]))


def test_stability_on_a_known_case() -> None:
    # N=4, k=2. Member A's top-2 = {0, 1}; member B's top-2 = {2, 3}... but the mean's top-2
    # is {0, 2}: each appears in exactly one member's top-2 → stability 0.5.
    a = torch.tensor([[10.0, 9.0, 1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0, 10.0, 9.5]], dtype=torch.float64)
    ens = EnsembleScores.from_members([_scores(a), _scores(b)])
    assert {i for i, *_ in ens.top(0, 2)} == {0, 2}
    assert ens.stability(2).tolist() == [0.5]
    assert all(stab == 0.5 for *_, stab in ens.top(0, 2))
    # Member A, A, B: sequence 0 is in 2/3 top-2 sets, sequence 1 in 2/3.
    ens3 = EnsembleScores.from_members([_scores(a), _scores(a), _scores(b)])
    assert [i for i, *_ in ens3.top(0, 2)] == [0, 1]
    assert ens3.stability(2).item() == pytest.approx(2 / 3)


def test_bad_members_are_refused() -> None:
    p = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"at least 2 members.*seeds"):
        EnsembleScores.from_members([_scores(p)])
    with pytest.raises(DataError, match="shape"):
        EnsembleScores.from_members([_scores(p), _scores(torch.zeros(2, 4))])
    with pytest.raises(DataError, match="train_indices"):
        EnsembleScores.from_members([_scores(p), _scores(p.clone(), [0, 1, 5])])
    with pytest.raises(ConfigError, match=r"at least 2 members to give error bars; received 1"):
        EnsembleScores.from_tensor(p[None], [0, 1, 2])
    ens = EnsembleScores.from_members([_scores(p), _scores(p)], keep=False)
    with pytest.raises(ConfigError, match="keep=False"):
        ens.stability(2)


def test_storage_round_trip() -> None:
    stack = torch.randn(3, 2, 5, dtype=torch.float64)
    ens = EnsembleScores.from_tensor(stack, list(range(5)), ["a", "b", "c"])
    back = EnsembleScores.from_stored(ens.tensors(), ens.meta())
    assert torch.equal(back.mean, ens.mean) and torch.equal(back.sem, ens.sem)
    assert back.labels == ["a", "b", "c"] and back.n_members == 3


FIT = FitConfig(batch_size=4)
SCORE = ScoreConfig(batch_size=4)


def _inf(run_dir=None) -> Influence:
    return Influence(
        tiny_gpt2(n_embd=16), "causal_lm", modules="mlp", run_dir=run_dir, device="cpu"
    )


def test_score_ensemble_over_seeds_matches_separate_runs(tmp_path) -> None:
    train, queries = random_lm_data(12, seed=1), random_lm_data(2, seed=2)
    inf = _inf(tmp_path / "run")
    ens = inf.score_ensemble(queries, train, FIT, SCORE, seeds=(0, 1), name="ens")
    assert ens.n_members == 2 and ens.mean.shape == (2, 12)
    assert (ens.sem > 0).any()
    assert (tmp_path / "run" / "factors" / "factors-seed1").is_dir()
    plain = _inf()
    sep = [
        plain.score(
            queries, train, plain.fit(train, FitConfig(batch_size=4, seed=s)), SCORE
        ).pairwise
        for s in (0, 1)
    ]
    assert torch.allclose(ens.mean, (sep[0] + sep[1]) / 2)
    assert torch.allclose(ens.members[1], sep[1])
    # The stored stage is reused (no refit: factors are removed first) ...
    import shutil

    shutil.rmtree(tmp_path / "run" / "factors")
    again = inf.score_ensemble(queries, train, FIT, SCORE, seeds=(0, 1), name="ens")
    assert torch.equal(again.mean, ens.mean) and torch.equal(again.sem, ens.sem)
    assert not (tmp_path / "run" / "factors").exists()
    # ... and refused when the data changes.
    with pytest.raises(StaleArtifactError, match=r"stage 'ens' .*computed with different data"):
        inf.score_ensemble(queries, random_lm_data(12, seed=3), FIT, SCORE, (0, 1), name="ens")


def test_score_ensemble_bad_seeds() -> None:
    train = random_lm_data(4, seed=1)
    inf = _inf()
    with pytest.raises(ConfigError, match=r"at least 2 members.*seeds=\(0, 1, 2, 3\)"):
        inf.score_ensemble(train, train, FIT, SCORE, seeds=(0,))
    with pytest.raises(ConfigError, match="distinct"):
        inf.score_ensemble(train, train, FIT, SCORE, seeds=(1, 1))
    with pytest.raises(ConfigError, match="fisher='true'"):
        inf.score_ensemble(train, train, FitConfig(fisher="empirical"), SCORE, seeds=(0, 1))


EVIL = "<script>alert(1)</script>"


def _report(with_ensemble: bool):
    from influscope.report import QueryView, ReportView, SequenceView

    extra = {"sem": 0.0123, "stable": 3, "n_members": 4} if with_ensemble else {}
    pro = SequenceView(index=7, score=1.5, tokens=["a", EVIL], token_scores=[1.0, 0.5], **extra)
    opp = SequenceView(index=2, score=-0.5, tokens=["b"], token_scores=[-0.5])
    query = QueryView(
        name="q <1>",
        prompt=EVIL,
        completion=" x",
        proponents=[pro],
        opponents=[opp],
        layer_scores={},
        notes={},
    )
    return ReportView(title="ens <t>", overview={"ensemble": "4 seeds <&>"}, queries=[query])


def test_html_report_shows_error_bars_and_escapes() -> None:
    from influscope.report import render_html

    page = render_html(_report(True))
    assert "± s.e." in page and "stable in x/M" in page
    assert "± 0.0123" in page and "3/4" in page
    assert EVIL not in page and "&lt;script&gt;alert(1)" in page
    assert "4 seeds &lt;&amp;&gt;" in page
    assert "<link" not in page and 'src="http' not in page
    plain = render_html(_report(False))
    assert "± s.e." not in plain and "stable in x/M" not in plain


def test_terminal_summary_shows_mean_sem_and_stability() -> None:
    from rich.console import Console

    from influscope.report.terminal import print_summary

    console = Console(record=True, width=200)
    print_summary(_report(True), console)
    out = console.export_text()
    assert "mean ± s.e." in out and "± 0.012" in out and "3/4" in out


def test_cli_score_ensemble(workdir, capsys) -> None:
    import json

    from influscope.cli import main

    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    args += ["--run", str(workdir / "run")]
    assert main(["fit", *args, "--batch-size", "2"]) == 0
    q = ["--queries", str(workdir / "queries.jsonl"), "--top-k", "2"]
    assert main(["score", *args, *q, "--ensemble", "2", "--name", "ens"]) == 0
    assert (workdir / "run" / "ensemble" / "ens" / "meta.json").is_file()
    assert (workdir / "run" / "factors" / "factors-seed1").is_dir()
    html = (workdir / "run" / "ens.html").read_text()
    assert "± s.e." in html and "/2</td>" in html
    top = json.loads((workdir / "run" / "ens.json").read_text())
    assert "sem" in top["queries"][0]["proponents"][0]
    assert "stable" in capsys.readouterr().out
    assert main(["score", *args, *q, "--seeds", "3", "--name", "one"]) == 2
    assert "at least 2 members" in capsys.readouterr().err
    # refused before any member is fitted or scored: no half-written stage or report
    assert not (workdir / "run" / "ensemble" / "one").exists()
    assert not (workdir / "run" / "factors" / "factors-seed3").exists()
    assert not (workdir / "run" / "one.html").exists()
