"""The training-score pass gives freed memory back after every batch (``trim_heap``), and the
captures of a batch are no longer referenced when it does, so the trim can return them."""

from __future__ import annotations

import gc
import weakref

import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import Influence, ScoreConfig
from influscope import budget as budget_mod


def test_score_pass_trims_the_heap_after_each_batch_with_the_batch_freed(monkeypatch):
    inf = Influence(tiny_gpt2(), "causal_lm", modules="mlp", device="cpu")
    train = random_lm_data(10, seed=1)
    queries = random_lm_data(3, seed=2)
    op = inf.fit(train)
    pq = inf.precondition(queries, op, ScoreConfig())
    ref = inf.score(pq, train, op, ScoreConfig(batch_size=4))
    from influscope.modules import capture

    alive: list[weakref.ref] = []
    made = capture.LayerBatch.__init__

    def track(self, *args, **kwargs):  # every captured batch, weakly
        made(self, *args, **kwargs)
        alive.append(weakref.ref(self))

    monkeypatch.setattr(capture.LayerBatch, "__init__", track)
    held_at_trim: list[int] = []

    def trim() -> None:  # counts the captured batches still alive when the heap is trimmed
        gc.collect()
        held_at_trim.append(sum(r() is not None for r in alive))

    monkeypatch.setattr(budget_mod, "release_heap", trim)
    got = inf.score(pq, train, op, ScoreConfig(batch_size=4))
    assert len(held_at_trim) == 3  # batches of 4, 4, 2
    assert held_at_trim == [0, 0, 0]  # nothing of the batch is held by then
    assert torch.equal(got.pairwise, ref.pairwise)
