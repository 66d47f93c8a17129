"""``Influence.magic``: stored through the stage runner, reused, refused when stale."""

from __future__ import annotations

import pytest
import torch

import influscope.metagrad as metagrad
from influscope import Influence
from influscope.errors import StaleArtifactError
from influscope.metagrad import FinetuneConfig, MagicConfig, magic_scores
from influscope.modules.tracked import TrackedModel
from influscope.toy import MLP, VectorClassificationTask, make_classification

CONFIG = MagicConfig(recipe=FinetuneConfig(epochs=2, lr=0.01, batch_size=3), replay_every=2)


def test_stored_reused_and_refused_when_stale(tmp_path, monkeypatch):
    data = make_classification(n=8, n_queries=2, seed=3)
    torch.manual_seed(0)
    model, task = MLP(4, 5, 4).double().eval(), VectorClassificationTask()
    train, queries = data.train(), data.queries()
    direct = magic_scores(TrackedModel.select(model, task, "all"), train, queries, CONFIG)
    inf = Influence(model, task, modules="all", run_dir=tmp_path, device="cpu")
    stored = inf.magic(queries, train, CONFIG, name="m")
    assert torch.equal(stored.pairwise, direct.pairwise)
    assert (tmp_path / "magic" / "m").is_dir()
    assert not list((tmp_path / "magic").glob(".m.*"))  # partial adjoints cleared when done

    def no_compute(*args, **kwargs):
        raise AssertionError("recomputed a stored stage")

    monkeypatch.setattr(metagrad, "magic_scores", no_compute)
    again = inf.magic(queries, train, CONFIG, name="m")  # loaded, not recomputed
    assert torch.equal(again.pairwise, stored.pairwise)
    assert again.layer_names == stored.layer_names and again.top(1, 2) == stored.top(1, 2)
    # a different budget is the same stage; a different recipe or data is not
    bigger = MagicConfig(recipe=CONFIG.recipe, replay_every=2, memory_mb=99.0)
    assert torch.equal(inf.magic(queries, train, bigger, name="m").pairwise, stored.pairwise)
    other = MagicConfig(recipe=FinetuneConfig(epochs=2, lr=0.02, batch_size=3), replay_every=2)
    with pytest.raises(StaleArtifactError, match="config"):
        inf.magic(queries, train, other, name="m")
    with pytest.raises(StaleArtifactError, match="data"):
        inf.magic(queries, train.subset(range(7)), CONFIG, name="m")
    monkeypatch.undo()
    redone = inf.magic(queries, train, other, name="m", overwrite=True)
    assert not torch.equal(redone.pairwise, stored.pairwise)
