"""Reward-model bias detection: synthetic pairs, summed queries, the CLI, and a reduced benchmark."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_reward_model
from influscope import FitConfig, Influence, ScoreConfig
from influscope.applications.reward_bias import (
    BiasDetectionConfig,
    PreferenceLikelihoodTask,
    rank_biased_pairs,
    sum_queries,
)
from influscope.applications.reward_data import (
    PreferenceConfig,
    make_preference_data,
    select_targeted,
)
from influscope.errors import ConfigError, DataError
from influscope.tasks import EncodedDataset

ASSETS = Path(os.environ.get("INFLUSCOPE_ASSETS", Path(__file__).parents[2] / ".cache/assets"))


def fake_reviews(n: int = 1200) -> list[tuple[str, float]]:
    """Distinct sentences of 3–25 words, half rated +2, half −2."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        words = int(rng.integers(3, 26))
        tone = "good" if i % 2 else "bad"
        out.append((" ".join([f"{tone}{i}"] + [tone] * (words - 1)), 2.0 if i % 2 else -2.0))
    return out


def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("bias", ["length", "sycophancy"])
def test_flips_follow_the_bias_and_nothing_else_does(bias):
    cfg = PreferenceConfig(
        bias=bias, n_train=200, n_validation=30, n_test=30, noise_fraction=0.1, max_words=25
    )
    data = make_preference_data(fake_reviews(), cfg)
    assert data.flipped.sum() == 30 and data.noise.sum() == 20
    assert not (data.flipped & data.noise).any()
    good_longer = np.array([r["good_longer"] for r in data.train])
    assert good_longer.sum() == 100  # length carries no information about the hidden rule
    for rec, flip, noise in zip(data.train, data.flipped, data.noise):
        chosen_good = rec["chosen"].startswith("good")
        assert chosen_good == (not (flip or noise))
        longer = words(rec["chosen"]) >= 1.5 * words(rec["rejected"])
        shorter = words(rec["rejected"]) >= 1.5 * words(rec["chosen"])
        assert longer or shorter
        if bias == "length":
            assert longer == (rec["good_longer"] != bool(flip or noise))
            assert not flip or longer  # a biased flip prefers the longer response
            assert not noise or shorter  # annotator noise does not
        else:  # a biased flip agrees with the user's negative opinion; noise does not
            assert not flip or rec["opinion"] == "negative"
            assert not noise or rec["opinion"] == "positive"
    for rec in data.validation:  # clean, and the behaviour the bias harms is preferred
        assert rec["chosen"].startswith("good")
        if bias == "length":
            assert words(rec["chosen"]) < words(rec["rejected"])
        else:
            assert rec["opinion"] == "negative"
    sentences = [
        {r[s] for r in part for s in ("chosen", "rejected")}
        for part in (data.train, data.validation, data.test)
    ]
    assert not (sentences[0] & sentences[1]) and not (sentences[0] & sentences[2])


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="flip_fraction"):
        PreferenceConfig(flip_fraction=0.7)
    with pytest.raises(ConfigError, match="bias"):
        PreferenceConfig(bias="verbosity")
    with pytest.raises(ConfigError, match="measurement"):
        BiasDetectionConfig(measurement="accuracy")
    with pytest.raises(ConfigError, match="baselines"):
        BiasDetectionConfig(baselines=("magic",))
    with pytest.raises(DataError, match="too few"):
        make_preference_data(fake_reviews(100), PreferenceConfig(n_train=200))
    recs = [{"chosen": "a b c", "rejected": "a"}, {"chosen": "a", "rejected": "a b"}]
    assert select_targeted(recs, "shorter") == [recs[1]]
    with pytest.raises(DataError, match="rule"):
        select_targeted(recs, "longest")
    with pytest.raises(DataError, match="chosen"):
        select_targeted([{"text": "x"}])


def pairs(n: int, seed: int) -> EncodedDataset:
    g = torch.Generator().manual_seed(seed)
    ex = []
    for _ in range(n):
        a, b = (
            torch.randint(1, 40, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
            for _ in range(2)
        )
        ex.append({"chosen_ids": a, "rejected_ids": b})
    return EncodedDataset(ex)


def test_summed_query_equals_sum_of_pairwise_scores():
    model = tiny_reward_model()
    inf = Influence(model, PreferenceLikelihoodTask(0), modules="all", device="cpu")
    train, val = pairs(10, 0), pairs(6, 1)
    op = inf.fit(train, FitConfig(curvature="ekfac"))
    cfg = ScoreConfig(query_rank=None)
    pq = inf.precondition(val, op, cfg)
    summed = inf.score(sum_queries(pq), train, op, cfg).pairwise  # (1, N)
    each = inf.score(pq, train, op, cfg).pairwise.sum(0, keepdim=True)  # (1, N)
    torch.testing.assert_close(summed, each, rtol=1e-9, atol=1e-12)
    ranking = rank_biased_pairs(
        model, None, train, val, BiasDetectionConfig(batch_size=4), "all", "cpu"
    )
    np.testing.assert_allclose(ranking.scores["influence"], -each[0].numpy(), rtol=1e-6)
    assert set(ranking.scores) == {"influence", "gradient_dot", "self_influence", "loss", "random"}


needs_assets = pytest.mark.skipif(
    not all((ASSETS / n).is_dir() for n in ("vader", "minilm")),
    reason=f"assets 'vader'/'minilm' not in {ASSETS}; run `make assets`",
)


@needs_assets
def test_length_bias_is_found_and_the_cli_agrees(tmp_path):
    """Reduced benchmark: EK-FAC targeted influence must find the length-biased flips.

    Measured with these settings: influence AUC 0.72, random 0.46 (seed 0). The floor 0.65 is
    failed by random scores (AUC std ≈ 0.06 with 30 flips among 200 pairs), by the reversed
    sign (AUC ≈ 0.28) and by a model that ignores the flips.
    """
    from benchmarks.reward_experiment import BiasExperimentConfig, run_bias_experiment
    from influscope.assets import vader_movie_reviews
    from influscope.cli import main

    cfg = BiasExperimentConfig(
        data=PreferenceConfig(n_train=200, n_validation=64, n_test=20, max_words=25, seed=0)
    )
    result = run_bias_experiment(
        vader_movie_reviews(ASSETS), cfg, encoder_dir=ASSETS / "minilm", out_dir=tmp_path
    )
    auc = result["auc"]
    assert auc["influence"] >= 0.65, auc
    assert auc["random"] < 0.65 and 1 - auc["influence"] < 0.5, auc

    out = tmp_path / "bias.json"
    args = ["bias", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.jsonl")]
    args += ["--validation", str(tmp_path / "validation.jsonl"), "--out", str(out), "--top-k", "3"]
    assert main([*args, "--baselines"]) == 0
    saved = json.loads(out.read_text())
    assert saved["auc"]["influence"] == pytest.approx(auc["influence"], abs=1e-6)
    assert len(saved["top"]) == 3 and list(saved["scores"]) == ["influence"]
    with pytest.raises(SystemExit, match="2") as exc:  # argparse refuses an unknown --curvature
        main([*args, "--select", "shorter", "--curvature", "nope"])
    assert exc.value.code == 2
