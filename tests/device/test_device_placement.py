"""No stage creates tensors on the default device in its loops (what breaks first on a GPU).

On the CPU every tensor lands on the right device by accident, so a ``torch.zeros(n)`` without
``device=`` inside a statistics or scoring loop only fails on CUDA ("Expected all tensors to be
on the same device"). This test runs the pipeline on the CPU under a ``TorchFunctionMode`` that
records every tensor factory called *directly* from influscope's source without a ``device``
argument, and compares the call sites with a short list of deliberate CPU tensors (each moved to
the model's device where it meets model tensors). A new site fails the test: give it
``device=`` (or add it here with the reason it is meant to be on the CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.index import IndexConfig

FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.tensor,
    torch.as_tensor,
    torch.eye,
    torch.linspace,
}
SRC = str(Path(__file__).resolve().parents[2] / "src" / "influscope")

#: (file under src/influscope, function) → why a CPU tensor is meant there.
ALLOWED = {
    ("tasks/data.py", "pad_stack"): "collate builds CPU batches; layer_passes moves each batch",
    ("tasks/data.py", "example_seeds"): "seeds are read with int() on the host",
    ("tasks/base.py", "sample_categorical"): "CPU generators keep samples device-independent",
    ("tasks/base.py", "<listcomp>"): "the same per-example CPU generators (comprehension)",
    ("projection/projector.py", "gaussian"): "seeded on the CPU; moved once by build_index",
    ("index/store.py", "rows"): "the index is read from memory-mapped files on the CPU",
    ("index/store.py", "search"): "chunked top-k over CPU rows against CPU queries",
    ("projection/eigen.py", "tensors"): "a scalar damping written to safetensors",
}


class FactoryAudit(TorchFunctionMode):
    """Records ``(file, function)`` of factories called from influscope without ``device=``."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: dict[tuple[str, str], int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            caller = sys._getframe(1)  # the direct caller of the factory
            path = str(Path(caller.f_code.co_filename).resolve())
            if path.startswith(SRC):
                site = (path[len(SRC) + 1 :], caller.f_code.co_name)
                self.sites[site] = self.sites.get(site, 0) + 1
        return func(*args, **kwargs)


@pytest.fixture
def one_thread():
    """Tiny ``eigh`` calls take ~1 s each with 2 threads on a loaded 2-core box; 1 ms with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_stages_create_no_tensor_on_the_default_device(tmp_path, one_thread):
    train = random_lm_data(8, seed=1)
    queries = random_lm_data(2, seed=2, prompt_len=2)
    inf = Influence(tiny_gpt2(n_embd=32), "causal_lm", modules="mlp", device="cpu")
    audit = FactoryAudit()
    with audit:
        for curvature, amp in (("datainf", None), ("diagonal", None), ("ekfac", "bfloat16")):
            op = inf.fit(train, FitConfig(curvature=curvature, batch_size=4, amp_dtype=amp))
            for score in (
                ScoreConfig(query_rank=None, batch_size=4, per_layer=True, normalize="relatif"),
                ScoreConfig(query_rank=2, query_svd="randomized", batch_size=4, amp_dtype=amp),
            ):
                inf.score(queries, train, op, score)
        inf.token_scores(queries, train, op)
        for init in ("orthogonal", "eigen"):
            cfg = IndexConfig(k_in=8, k_out=8, init=init, batch_size=4, dtype="bfloat16")
            index = inf.build_index(
                train, cfg, op if init == "eigen" else None, root=tmp_path / init
            )
            inf.query_index(queries, index, k=3)
    unexpected = sorted(set(audit.sites) - set(ALLOWED))
    assert not unexpected, f"tensors created without device= at {unexpected}"
    assert ("tasks/data.py", "pad_stack") in audit.sites  # the audit does see factory calls
