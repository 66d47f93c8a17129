"""Scores stages stored before a ScoreConfig field existed still load (issue 21/24 fields).

``ScoreConfig.fingerprint_dict`` is what a scores stage stores and compares: fields added
later are left out while they cannot change the scores, so older stages keep matching.
"""

from __future__ import annotations

import json

import pytest

from influscope import Influence
from influscope.config import FitConfig, ScoreConfig
from influscope.errors import StaleArtifactError
from influscope.toy import random_lm_data, tiny_gpt2

#: The ScoreConfig keys of scores stages stored before per-head and the refinement options.
OLD_KEYS = {
    "query_rank", "query_svd", "batch_size", "per_layer", "normalize", "amp_dtype", "damping",
    "damping_factor", "refine_steps", "refine", "refine_tol", "refine_examples", "refine_seed",
}  # fmt: skip
NEW = ("per_head", "refine_alpha", "refine_start", "refine_memory_gb")


def test_fingerprint_dict_keeps_the_old_keys_while_the_new_ones_do_nothing():
    assert set(ScoreConfig().fingerprint_dict()) == OLD_KEYS
    assert "refine_memory_gb" not in ScoreConfig(refine_steps=2).fingerprint_dict()
    # refine_start's default is now "scaled": left out only where stages stored before it
    # were computed the same way (refine_start="ekfac", or no refinement at all)
    assert set(ScoreConfig(refine_steps=2, refine_start="ekfac").fingerprint_dict()) == OLD_KEYS
    assert ScoreConfig(refine_steps=2).fingerprint_dict()["refine_start"] == "scaled"
    assert set(ScoreConfig(refine_start="ekfac").fingerprint_dict()) == OLD_KEYS
    changed = ScoreConfig(refine_steps=2, refine_start="scaled", refine_alpha=0.5)
    assert set(changed.fingerprint_dict()) == OLD_KEYS | {"refine_alpha", "refine_start"}
    assert ScoreConfig(per_head=True).fingerprint_dict()["per_head"] is True


def _stored_as_before(tmp_path, refine_steps: int):
    model = tiny_gpt2(n_layer=1)
    train, queries = random_lm_data(6, seed=1), random_lm_data(2, seed=2)
    inf = Influence(model, "causal_lm", run_dir=tmp_path, device="cpu")
    factors = inf.fit(train, FitConfig(batch_size=3))
    # stages stored before refine_start existed were refined from EK-FAC's answer
    config = ScoreConfig(
        query_rank=None, batch_size=3, refine_steps=refine_steps, refine_start="ekfac"
    )
    first = inf.score(queries, train, factors, config, name="s")
    meta_path = tmp_path / "scores" / "s" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in NEW}  # the old layout
    meta_path.write_text(json.dumps(meta))
    return inf, train, queries, factors, config, first


def test_a_scores_stage_stored_before_the_new_fields_is_loaded_not_recomputed(tmp_path):
    inf, train, queries, factors, config, first = _stored_as_before(tmp_path, 0)
    computed = []
    inf.precondition = lambda *a, **k: computed.append(1)  # any recomputation would call it
    again = inf.score(queries, train, factors, config, name="s")
    assert computed == []
    assert again.pairwise.equal(first.pairwise)


def test_a_stored_refined_stage_is_refused_when_a_new_solver_option_is_set(tmp_path):
    inf, train, queries, factors, config, first = _stored_as_before(tmp_path, 1)
    scaled = ScoreConfig(query_rank=None, batch_size=3, refine_steps=1, refine_start="scaled")
    with pytest.raises(StaleArtifactError, match=r"config\.refine_start: \(absent\) → 'scaled'"):
        inf.score(queries, train, factors, scaled, name="s")
    # the new default start is "scaled": an old refined stage is refused under it too
    default = ScoreConfig(query_rank=None, batch_size=3, refine_steps=1)
    with pytest.raises(StaleArtifactError, match=r"config\.refine_start: \(absent\) → 'scaled'"):
        inf.score(queries, train, factors, default, name="s")
    # and loaded (not recomputed) with the start it was computed from
    again = inf.score(queries, train, factors, config, name="s")
    assert again.pairwise.equal(first.pairwise)
