"""The CLI's choices are the live registries, and a new curvature is one file + one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import toy_curvature
from conftest import random_lm_data, tiny_gpt2
from influscope import Influence
from influscope.cli import options as cli_options
from influscope.config import FitConfig
from influscope.curvature import CURVATURES, IdentityOperator
from influscope.errors import ConfigError
from influscope.modules.selection import PRESETS
from influscope.tasks import TASKS


def test_cli_curvature_choices_equal_the_registry() -> None:
    assert set(cli_options.CURVATURES) == set(CURVATURES)


def test_cli_task_choices_equal_the_registry() -> None:
    assert set(cli_options.TASKS) == set(TASKS)


def test_modules_help_names_every_preset() -> None:
    for name in PRESETS:
        assert repr(name) in cli_options.MODULES_HELP, name


def test_python_dash_m_influscope_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "influscope", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "score" in out.stdout and "fit" in out.stdout


def test_every_spec_is_registered_under_its_name_and_unpacks_like_the_old_tuple() -> None:
    for name, spec in CURVATURES.items():
        assert spec.name == name == spec.operator.name
        operator, fitter = spec
        assert operator is spec.operator and fitter is spec.fit


@pytest.fixture
def scaled(monkeypatch):
    monkeypatch.setitem(CURVATURES, "scaled", toy_curvature.SPEC)  # the one registry line
    return toy_curvature.SPEC


def test_a_curvature_registered_at_runtime_is_offered_by_the_cli(scaled) -> None:
    from influscope.cli import build_parser

    argv = ["fit", "--model", "m", "--train", "t.jsonl", "--run", "r", "--curvature", "scaled"]
    assert build_parser().parse_args(argv).curvature == "scaled"


def test_a_one_file_curvature_fits_stores_loads_and_scores(scaled, tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny_gpt2()
    train = random_lm_data(n=6, seed=1)
    queries = random_lm_data(n=2, seed=2)
    inf = Influence(model, "causal_lm", run_dir=tmp_path, device="cpu")
    config = FitConfig(curvature="scaled", options={"scale": 4.0}, damping=1.0)
    factors = inf.fit(train, config)
    assert isinstance(factors, toy_curvature.ScaledIdentityOperator)
    assert inf.load_factors(train).damping == factors.damping  # stored, checked, loaded
    got = inf.score(queries, train, factors).pairwise
    plain = inf.score(queries, train, IdentityOperator(factors.damping)).pairwise
    torch.testing.assert_close(got, plain / 5.0, rtol=1e-10, atol=1e-12)  # g / (s + λ)
    # its options are fingerprinted: another scale is a different stage, refused as stale
    from influscope.errors import StaleArtifactError

    with pytest.raises(StaleArtifactError, match="config"):
        inf.fit(train, FitConfig(curvature="scaled", options={"scale": 2.0}, damping=1.0))


def test_a_spec_validates_its_options_on_creation(scaled) -> None:
    with pytest.raises(ConfigError, match="scale must be > 0"):
        FitConfig(curvature="scaled", options={"scale": -1.0})
    with pytest.raises(ConfigError, match="Unknown ScaledOptions fields"):
        FitConfig(curvature="scaled", options={"rank": 3})
    with pytest.raises(ConfigError, match="takes no options"):
        FitConfig(curvature="ekfac", options={"scale": 2.0})


@pytest.fixture
def last_token(monkeypatch):
    import toy_task
    from influscope.tasks import TASKS

    monkeypatch.setitem(TASKS, "last_token_lm", toy_task.LastTokenTask)  # the one registry line
    return toy_task.LastTokenTask


def test_a_one_file_task_is_offered_by_the_cli_and_scores_by_name(last_token) -> None:
    from influscope.cli import build_parser

    argv = ["fit", "--model", "m", "--train", "t.jsonl", "--run", "r", "--task", "last_token_lm"]
    assert build_parser().parse_args(argv).task == "last_token_lm"
    train, queries = random_lm_data(n=5, seed=1), random_lm_data(n=2, seed=2)
    by_name = Influence(tiny_gpt2(), "last_token_lm", device="cpu")
    assert isinstance(by_name.task, last_token)
    factors = by_name.fit(train, FitConfig(curvature="diagonal"))
    got = by_name.score(queries, train, factors)
    by_instance = Influence(tiny_gpt2(), last_token(), device="cpu")
    torch.testing.assert_close(got.pairwise, by_instance.score(queries, train, factors).pairwise)
    # the measurement is the last token's log-probability, not the whole sequence's
    q = queries.subset([0]).examples[0]
    with torch.no_grad():
        logp = tiny_gpt2()(input_ids=q["input_ids"][None]).logits[0, -2].log_softmax(-1)
    torch.testing.assert_close(got.measurements[0], logp[q["input_ids"][-1]])
    whole = Influence(tiny_gpt2(), "causal_lm", device="cpu").score(queries, train, factors)
    assert not torch.allclose(got.pairwise, whole.pairwise)


def test_every_task_names_a_transformers_auto_class_for_loading() -> None:
    import transformers

    from influscope.tasks import TASKS

    for name, task in TASKS.items():
        assert hasattr(transformers, task.auto_model), (name, task.auto_model)
    assert TASKS["causal_lm"].auto_model == "AutoModelForCausalLM"
    assert TASKS["reward"].auto_model == "AutoModelForSequenceClassification"
