"""The reduced hallucination-tracing benchmark (``python -m benchmarks.dda --quick``) as a CI floor.

The floor (AUC ≥ 0.7 for plain influence, denoise and RelatIF) is one that shuffled scores fail:
the benchmark's own shuffled control is asserted below it. DDA and debias get no floor: on this
set-up they rank the ground truth *lower* than plain influence (docs/applications_dda.md says
why); their algebra is checked exactly in tests/test_corrections.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.dda_setup import QUICK, build_data, evaluate, train_models

ASSETS = os.environ.get("INFLUSCOPE_ASSETS", ".cache/assets")
FLOOR = 0.7


@pytest.mark.skipif(not os.path.isdir(ASSETS), reason="needs `make assets`")
def test_reduced_benchmark_floor():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two spinning
    try:
        out = evaluate(train_models(build_data(QUICK, ASSETS), QUICK), QUICK)
    finally:
        torch.set_num_threads(threads)
    assert out["queries"]["repeated_by_finetuned"] >= 3, out["queries"]
    auc = out["auc"]
    for method in ("plain", "denoise", "relatif"):
        assert auc[method] >= FLOOR, (method, auc)
    assert auc["shuffled"] < FLOOR, auc  # the floor is one that random rankings fail
    assert set(auc) >= {"dda", "debias", "bm25", "gradient_cosine", "representation_similarity"}
