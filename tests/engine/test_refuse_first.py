"""Every stored stage is refused before any forward pass: stale, or an unwritable run directory.

The passes are counted on the model (``model.forward`` wrapped), the computations on the
stage runner's ``compute``.
"""

from __future__ import annotations

import pytest
import torch

from influscope import Influence
from influscope.config import FitConfig, ScoreConfig
from influscope.engine.stage import StageSpec, run_stage
from influscope.errors import StaleArtifactError, StorageError
from influscope.storage import RunDirectory
from influscope.toy import random_lm_data, tiny_gpt2

FIT = FitConfig(batch_size=4)
SCORE = ScoreConfig(query_rank=None, batch_size=4)


def _counted(run_dir) -> tuple[Influence, list]:
    """An Influence on a tiny GPT-2 whose forward passes are counted."""
    model = tiny_gpt2(n_layer=1)
    calls: list = []
    forward = model.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    model.forward = counted  # nn.Module.__call__ looks the instance attribute up
    return Influence(model, "causal_lm", run_dir=run_dir, device="cpu"), calls


def _spec(run):
    return StageSpec(
        run,
        "scores",
        "s",
        {"data": "a"},
        load=lambda tensors, meta: tensors["x"],
        dump=lambda x: ({"x": x}, {}),
    )


def test_run_stage_refuses_an_unwritable_run_directory_before_computing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    computed = []
    with pytest.raises(
        StorageError, match=r"Cannot write to the run directory .*a-file/run/scores"
    ):
        run_stage(_spec(RunDirectory(blocker / "run")), lambda store: computed.append(1))
    assert computed == []
    assert isinstance(StorageError("x"), OSError)  # caught by `except OSError` too


def test_preflight_says_whether_the_stage_will_be_loaded(tmp_path):
    spec = _spec(RunDirectory(tmp_path))
    assert spec.preflight() is False  # nothing stored: computed (and the directory writable)
    assert list(tmp_path.iterdir()) == []  # nothing created by the check
    run_stage(spec, lambda store: torch.ones(2))
    assert spec.preflight() is True and spec.preflight(overwrite=True) is False


def test_score_with_refinement_against_a_stored_stage_is_refused_before_any_pass(tmp_path):
    inf, calls = _counted(tmp_path / "run")
    train, queries = random_lm_data(6, seed=1), random_lm_data(2, seed=2)
    factors = inf.fit(train, FIT)
    inf.score(queries, train, factors, SCORE, name="s")
    assert inf.last_preconditioned is not None  # what the CLI's report reuses
    calls.clear()
    refined = ScoreConfig(query_rank=None, batch_size=4, refine_steps=2)
    # (the default start, "scaled", is named too: a plain stage stores no refine_start)
    with pytest.raises(StaleArtifactError, match=r"config\.refine_steps: 0 → 2[;)]") as err:
        inf.score(queries, train, factors, refined, name="s")
    assert calls == []
    assert "{" not in str(err.value)  # the differing key, not the two config dicts
    with pytest.raises(StaleArtifactError, match=r"queries: fingerprint '\w+' → '\w+'"):
        inf.score(random_lm_data(2, seed=5), train, factors, SCORE, name="s")
    assert calls == []
    inf.score(queries, train, factors, SCORE, name="s")  # matching: loaded, no pass
    assert calls == [] and inf.last_preconditioned is None


def test_fit_into_an_unwritable_run_directory_is_refused_before_any_pass(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    inf, calls = _counted(blocker / "run")
    with pytest.raises(StorageError, match="Nothing was computed"):
        inf.fit(random_lm_data(6, seed=1), FIT)
    assert calls == []


def test_an_ensemble_checks_every_member_before_fitting_the_first(tmp_path):
    inf, calls = _counted(tmp_path / "run")
    train, queries = random_lm_data(6, seed=1), random_lm_data(2, seed=2)
    inf.fit(train, FitConfig(batch_size=4, seed=1, damping_factor=0.5), name="factors-seed1")
    calls.clear()
    with pytest.raises(StaleArtifactError, match=r"'factors-seed1' .*config\.damping_factor"):
        inf.score_ensemble(queries, train, FIT, SCORE, seeds=(0, 1), name="ens")
    assert calls == []  # member 0 was not fitted before member 1 was found stale
    assert not (tmp_path / "run" / "factors" / "factors-seed0").exists()
