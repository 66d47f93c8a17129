"""Mislabel detection on real movie-review sentences (reduced benchmark (c) of docs/accuracy.md)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from benchmarks.sentiment import (
    MINILM_WIDTH,
    HiddenStateTask,
    SentimentClassifier,
    SentimentConfig,
    encoder_states,
    make_classifier,
    mean_pooled,
    movie_review_split,
    states_dataset,
    train_classifier,
)
from influscope import FitConfig, Influence
from influscope.assets import is_fetched, minilm_dir, vader_movie_reviews
from influscope.errors import ConfigError, DataError
from influscope.evaluation import MislabelConfig, detection_report, flip_labels

REVIEWS = [("good", 1.5), ("bad", -2.0), ("meh", 0.0), ("fine", 0.2), ("awful", -0.1)]


def test_split_drops_zero_ratings_and_labels_by_sign():
    train, test = movie_review_split(REVIEWS, 3, 1, seed=0)
    assert len(train) == 3 and len(test) == 1
    got = dict(train + test)
    assert "meh" not in got
    assert got == {"good": 1, "bad": 0, "fine": 1, "awful": 0}
    assert movie_review_split(REVIEWS, 3, 1, seed=0) == (train, test)  # deterministic
    with pytest.raises(DataError, match="only 4 have a non-zero rating"):
        movie_review_split(REVIEWS, 4, 1)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="top_layers"):
        SentimentConfig(top_layers=7)
    with pytest.raises(ConfigError, match="hidden"):
        SentimentConfig(hidden=-1)


def test_padding_does_not_change_logits():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=MINILM_WIDTH, num_attention_heads=2, intermediate_size=32)
    cfg._attn_implementation = "eager"
    model = SentimentClassifier([BertLayer(cfg)], hidden=8).double().eval()
    states = [torch.randn(t, MINILM_WIDTH, dtype=torch.float64) for t in (3, 7, 5)]
    data = states_dataset(states, [0, 1, 1])
    task = HiddenStateTask()
    batch = task.collate(data.examples)
    assert batch["h"].shape == (3, 7, MINILM_WIDTH) and batch["attention_mask"].sum() == 15
    together = task.outputs(model, batch)  # (3, 2)
    alone = torch.cat([task.outputs(model, task.collate([e])) for e in data.examples])
    torch.testing.assert_close(together, alone)
    margin = task.measurement(model, batch)  # float64 model: float64 margin (loss_precision)
    y = batch["labels"]
    expected = together[range(3), y] - together[range(3), 1 - y]
    torch.testing.assert_close(margin, expected)


@pytest.mark.skipif(not is_fetched("minilm") or not is_fetched("vader"), reason="make assets")
def test_sentiment_mislabel_detection_floor(tmp_path):
    """400 real sentences, frozen MiniLM + MLP head, 10 % flipped: EK-FAC self-influence finds them.

    Measured (flip seed 0): AUC ≈ 0.74, found@20 % ≈ 0.55; the same scores shuffled over the
    training set give AUC ≈ 0.54, found@20 % ≈ 0.25 and fail the floor.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny head: a second thread only spins (and costs ~10x CPU time)
    try:
        _floor(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _floor(tmp_path) -> None:
    n = 400
    train_rows, _ = movie_review_split(vader_movie_reviews(), n, 1, seed=1)
    states = encoder_states([t for t, _ in train_rows], minilm_dir(), layer=6, cache_dir=tmp_path)
    assert len(states) == n and states[0].shape[1] == MINILM_WIDTH
    again = encoder_states([t for t, _ in train_rows], minilm_dir(), layer=6, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(states, again))  # read back from the cache
    noisy, flipped = flip_labels([y for _, y in train_rows], 2, MislabelConfig(seed=0))
    train = states_dataset(mean_pooled(states), noisy)
    model = make_classifier(minilm_dir(), top_layers=0, hidden=64, seed=0)
    model = train_classifier(model, train, SentimentConfig(n_train=n, epochs=20, lr=1e-3))
    task = HiddenStateTask()  # a head-only classifier sees the same mean with or without pooling
    full = states_dataset(states[:8], noisy[:8])
    torch.testing.assert_close(
        task.outputs(model, task.collate(full.examples)),
        task.outputs(model, task.collate(train.examples[:8])),
    )
    inf = Influence(model, HiddenStateTask(), modules=["head.0", "head.2"], device="cpu")
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=100))
    scores = inf.self_influence(train, op, batch_size=100)
    report = detection_report(scores, flipped)
    shuffled = detection_report(
        scores[torch.randperm(n, generator=torch.Generator().manual_seed(0))], flipped
    )
    random = detection_report(torch.rand(n, generator=torch.Generator().manual_seed(1)), flipped)

    def passes(r):
        return r.auc >= 0.65 and r.found[0.2] >= 0.4

    assert passes(report), report
    assert not passes(shuffled), shuffled
    assert not passes(random), random
