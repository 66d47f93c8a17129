"""A stale stage's message names the keys that differ and the flags that resolve it; stored files
and stage directories get the umask's modes (not mkstemp's 0600 / mkdtemp's 0700)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from influscope.errors import StaleArtifactError, StorageError
from influscope.index.store import write_shard
from influscope.storage import RunDirectory, atomic_write_json
from influscope.storage.run import check_writable, differences


def test_differences_name_each_nested_key():
    stored = {"config": {"refine_steps": 0, "rank": 32, "svd": "auto"}, "model": "aaa"}
    now = {"config": {"refine_steps": 2, "rank": 32, "svd": "exact"}, "model": "aaa"}
    assert differences(stored, now) == [
        "config.refine_steps: 0 → 2",
        "config.svd: 'auto' → 'exact'",
    ]
    assert differences(stored, stored) == []


def test_differences_explain_fingerprints_and_summarise_long_lists():
    assert differences({"model": "a1"}, {"model": "b2"}) == [
        "model: fingerprint 'a1' → 'b2' (the model's weights or architecture differ)"
    ]
    old = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    new = [*old[:3], "model.layers.3.self_attn.o_proj"]
    assert differences({"layers": old}, {"layers": new}) == [
        "layers: removed ['model.layers.3.mlp.down_proj'], added ['model.layers.3.self_attn.o_proj']"
    ]
    assert differences({"seeds": [0, 1]}, {"seeds": (0, 1)}) == []  # JSON stores tuples as lists
    # a key only one side has is a difference too, even when the other side is None
    assert differences({"config": {"a": 1}}, {"config": {"a": 1, "b": None}}) == [
        "config.b: (absent) → None"
    ]
    assert differences({"config": {"a": 1, "b": 2}}, {"config": {"a": 1}}) == [
        "config.b: 2 → (absent)"
    ]


def test_a_stale_stage_names_the_key_and_the_flags(tmp_path):
    run = RunDirectory(tmp_path)
    config = {"refine_steps": 0, "query_rank": 32, "batch_size": 8, "refine": "cg"}
    run.save("scores", "scores", {"x": torch.zeros(1)}, {"config": config, "data": "d"})
    with pytest.raises(StaleArtifactError, match="stored scores stage 'scores'") as err:
        run.check("scores", "scores", {"config": {**config, "refine_steps": 2}, "data": "d"})
    message = str(err.value)
    assert "computed with different config than now (config.refine_steps: 0 → 2)" in message
    assert "--overwrite" in message and "--name OTHER" in message
    assert "query_rank" not in message  # only what differs, not the two whole dictionaries


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"),
    [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)],
)
def test_stored_files_and_stage_directories_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        final = RunDirectory(tmp_path).save("factors", "f", {"x": torch.zeros(2)}, {"a": 1})
        atomic_write_json(tmp_path / "out.json", {"b": 2})
        write_shard(tmp_path / "shards" / "shard-00000.npy", np.zeros((2, 3), np.float16))
    finally:
        os.umask(old)
    assert stat.S_IMODE(final.stat().st_mode) == dir_mode  # was mkdtemp's 0700
    for path in (final / "meta.json", final / "tensors.safetensors", tmp_path / "out.json",
                 tmp_path / "shards" / "shard-00000.npy"):  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path  # was mkstemp's 0600


def test_check_writable_leaves_nothing_behind_and_names_the_directory(tmp_path):
    assert check_writable(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert list(tmp_path.iterdir()) == []  # nothing created: the probe file is removed
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match=r"index directory '.*file/idx' \('.*file' is a file"):
        check_writable(tmp_path / "file" / "idx", "index directory")
