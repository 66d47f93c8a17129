"""Bad input around stored factors: a full disk fails atomically with a message, and factors
fitted in one dtype are refused for a model in another, naming both."""

from __future__ import annotations

import errno

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence
from influscope.errors import StaleArtifactError, StorageError
from influscope.storage import atomic


def test_full_disk_fails_atomically_with_a_message(tmp_path, monkeypatch):
    model = tiny_gpt2(n_embd=16)
    train = random_lm_data(6, seed=5)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu", run_dir=tmp_path / "run")
    real = atomic.write_safetensors

    def full_disk(path, tensors, metadata=None):
        real(path, tensors, metadata)  # the bytes are on disk ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(atomic, "write_safetensors", full_disk)
    with pytest.raises(StorageError, match="No space left") as err:
        inf.fit(train, FitConfig(batch_size=2))
    msg = str(err.value)
    assert "No space left" in msg and "MiB needed" in msg and "Fix: free disk space" in msg
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    factors = tmp_path / "run" / "factors"
    assert not (factors / "factors").exists()  # no stage ...
    files = [p.name for p in factors.rglob("*") if p.is_file()]
    # ... and no half-written file (the resume store's meta.json may stay: it holds no sums)
    assert not [f for f in files if f.endswith((".tmp", ".safetensors"))], files
    monkeypatch.setattr(atomic, "write_safetensors", real)
    assert inf.fit(train, FitConfig(batch_size=2)) is not None  # space again: it completes
    assert (factors / "factors" / "tensors.safetensors").is_file()


def test_factors_fitted_in_another_dtype_are_refused(tmp_path):
    train = random_lm_data(6, seed=6)
    model = tiny_gpt2(n_embd=16, dtype=torch.float32)
    Influence(model, "causal_lm", modules="mlp", device="cpu", run_dir=tmp_path).fit(train)
    other = Influence(
        model.to(torch.float64), "causal_lm", modules="mlp", device="cpu", run_dir=tmp_path
    )
    with pytest.raises(StaleArtifactError, match="fitted with the model in float32") as err:
        other.load_factors(train)
    msg = str(err.value)
    assert "fitted with the model in float32" in msg and "is now float64" in msg
    assert "model.to(torch.float32)" in msg and "overwrite" in msg
