"""Regressions found by using the Python API as a new user: misuse gets a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influscope import ConfigError, Scores


def test_scores_top_validates_query_and_k():
    scores = Scores(torch.tensor([[0.5, -1.0, 2.0]]), ["layer"], [0, 1, 2])
    assert scores.top(0, k=10) == [(2, 2.0), (0, 0.5), (1, -1.0)]  # k > N: all of them
    assert scores.top(np.int64(0), k=np.int64(1)) == [(2, 2.0)]  # NumPy integers work
    assert scores.top(0, k=0) == []
    with pytest.raises(ConfigError, match=r"k must be an integer ≥ 0, received -1"):
        scores.top(0, k=-1)
    with pytest.raises(ConfigError, match=r"0 ≤ query < 1; received 3.*1 queries"):
        scores.top(3)
