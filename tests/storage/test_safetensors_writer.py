"""The streaming safetensors writer reads back exactly with safetensors' own loader."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from influscope.storage.atomic import (
    SAFETENSORS_DTYPES,
    atomic_write_tensors,
    read_tensors,
    write_safetensors,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(SAFETENSORS_DTYPES):
        if dtype.is_floating_point:
            t = torch.randn(3, 5, generator=g, dtype=torch.float64).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(4, 2, generator=g) > 0.5
        else:
            t = torch.randint(-100 if dtype != torch.uint8 else 0, 100, (7,), generator=g).to(dtype)
        out[f"t{i}.{str(dtype).removeprefix('torch.')}"] = t
    out["scalar"] = torch.tensor(2.5, dtype=torch.float64)  # 0-dim
    out["empty"] = torch.zeros(0, 3)
    out["transposed"] = torch.arange(12.0).view(3, 4).t()  # not contiguous
    return out


def test_every_dtype_reads_back_exactly_with_metadata(tmp_path):
    tensors = _tensors()
    write_safetensors(tmp_path / "a.safetensors", tensors, {"kind": "factors", "n": "3"})
    back = load_file(tmp_path / "a.safetensors")
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k], t), k
    with safe_open(tmp_path / "a.safetensors", "pt") as fh:
        assert fh.metadata() == {"kind": "factors", "n": "3"}


def test_same_tensors_as_save_file_and_atomic_path(tmp_path):
    tensors = _tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors")
    atomic_write_tensors(tmp_path / "ours.safetensors", tensors)
    ref, ours = load_file(tmp_path / "ref.safetensors"), read_tensors(tmp_path / "ours.safetensors")
    assert set(ref) == set(ours)
    assert all(torch.equal(ref[k], ours[k]) for k in ref)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left


def test_unsupported_dtype_is_refused_and_nothing_is_left(tmp_path):
    with pytest.raises(TypeError, match=r"dtype torch.complex64, which safetensors cannot store"):
        atomic_write_tensors(
            tmp_path / "c.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)}
        )
    assert list(tmp_path.iterdir()) == []
