"""Bad input: each case raises a specific error with an actionable message, writes nothing."""

from __future__ import annotations

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import (
    ConfigError,
    DataError,
    FitConfig,
    Influence,
    ModuleMatchError,
    NumericalError,
    ScoreConfig,
    StaleArtifactError,
)
from influscope.errors import RegistryError
from influscope.tasks import CausalLMTask, EncodedDataset, get_task


class CharTokenizer:
    """Minimal tokenizer: one id per character (no downloads)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [2 + (ord(c) % 30) for c in text]}


def test_empty_dataset():
    with pytest.raises(DataError, match="empty"):
        EncodedDataset([])
    with pytest.raises(DataError, match="at least one record"):
        CausalLMTask().encode([], CharTokenizer())


def test_sequence_longer_than_context(tmp_path):
    model = tiny_gpt2(n_positions=16)
    inf = Influence(model, modules="mlp", tokenizer=CharTokenizer(), run_dir=tmp_path)
    with pytest.raises(DataError, match=r"longer than the model's context of 16.*truncate"):
        inf.encode([{"text": "x" * 40}])
    long = random_lm_data(2, min_len=20, max_len=20)
    with pytest.raises(DataError, match="context of 16"):
        inf.fit(long)
    assert not any(tmp_path.iterdir())
    ok = inf.encode([{"text": "x" * 40}], truncate=True)
    assert ok.max_length() == 16


def test_unusable_device_is_a_config_error(monkeypatch):
    """A CUDA device on a machine without CUDA (simulated) or a misspelt device: ConfigError
    naming the fix, not torch's AssertionError from deep inside ``model.to``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"sees no CUDA device.*device='cpu'"):
        Influence(tiny_gpt2(), "causal_lm", device="cuda:0")
    with pytest.raises(ConfigError, match="Unknown device 'gpu'"):
        Influence(tiny_gpt2(), "causal_lm", device="gpu")
    assert Influence(tiny_gpt2(), "causal_lm").device == torch.device("cpu")


def test_no_matching_module_lists_names():
    with pytest.raises(ModuleMatchError, match=r"transformer\.h\.0\.mlp\.c_fc"):
        Influence(tiny_gpt2(), modules=["does_not_exist"])


def test_prompt_without_completion_tokens():
    with pytest.raises(DataError, match="completion with no tokens"):
        CausalLMTask().encode([{"prompt": "abc", "completion": ""}], CharTokenizer())
    with pytest.raises(DataError, match="expected 'text'"):
        CausalLMTask().encode([{"question": "abc"}], CharTokenizer())


def test_nan_loss_names_the_example(tmp_path):
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    inf = Influence(model, modules="mlp", run_dir=tmp_path)
    with pytest.raises(NumericalError, match=r"NaN/Inf for example\(s\) \[0, 1"):
        inf.fit(random_lm_data(4))
    # no stage is written; only complete (resumable) per-shard partial sums may remain
    assert not (tmp_path / "factors" / "factors").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_factors_from_a_different_model_are_refused(tmp_path):
    data = random_lm_data(6)
    Influence(tiny_gpt2(seed=0), run_dir=tmp_path).fit(data, name="f")
    other = Influence(tiny_gpt2(seed=1), run_dir=tmp_path)
    with pytest.raises(StaleArtifactError, match=r"different model.*overwrite=True"):
        other.fit(data, name="f")
    with pytest.raises(StaleArtifactError, match="different data"):
        Influence(tiny_gpt2(seed=0), run_dir=tmp_path).fit(random_lm_data(6, seed=9), name="f")
    with pytest.raises(StaleArtifactError, match="different config"):
        Influence(tiny_gpt2(seed=0), run_dir=tmp_path).fit(
            data, FitConfig(damping_factor=0.5), name="f"
        )
    other.fit(data, name="f", overwrite=True)  # explicit overwrite works


def test_config_validation_messages():
    with pytest.raises(ConfigError, match=r"Unknown curvature 'kfc'.*ekfac"):
        FitConfig(curvature="kfc")
    with pytest.raises(ConfigError, match="query_rank"):
        ScoreConfig(query_rank=0)
    with pytest.raises(RegistryError, match=r"Unknown task 'lm'\. Supported: \("):
        get_task("lm")
