"""Fitting-error corrections: the algebra in float64 against explicit loops, the registry, and
``run_corrections`` against scores computed independently with the ``Influence`` facade."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2, train_lm
from influscope import FitConfig, Influence, ScoreConfig
from influscope.corrections import (
    CORRECTIONS,
    CorrectionConfig,
    CorrectionInputs,
    CorrectionResult,
    dda,
    debias,
    denoise,
    relatif,
    run_corrections,
    standardize,
)
from influscope.errors import ConfigError, DataError


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _row_z(row: list[float]) -> list[float]:
    mean = sum(row) / len(row)
    std = math.sqrt(sum((x - mean) ** 2 for x in row) / len(row))
    return [(x - mean) / std for x in row]


def test_algebra_matches_explicit_loops():
    q, n = 3, 7
    ckpts = [_rand(q, n, seed=s) for s in range(3)]
    base = _rand(q, n, seed=9)
    self_inf = _rand(n, seed=10).abs() + 0.1
    w = [1.0, 2.0, 5.0]
    for smoothing in ("mean", "standardized"):
        got = dda(ckpts, base, w, smoothing)
        got_denoise = denoise(ckpts, w, smoothing)
        for i in range(q):
            rows = [[float(c[i, j] - base[i, j]) for j in range(n)] for c in ckpts]
            raw = [[float(c[i, j]) for j in range(n)] for c in ckpts]
            if smoothing == "standardized":
                rows, raw = [_row_z(r) for r in rows], [_row_z(r) for r in raw]
            for j in range(n):
                want = sum(w[k] * rows[k][j] for k in range(3)) / sum(w)
                want_d = sum(w[k] * raw[k][j] for k in range(3)) / sum(w)
                assert got[i, j].item() == pytest.approx(want, abs=1e-12)
                assert got_denoise[i, j].item() == pytest.approx(want_d, abs=1e-12)
    for i in range(q):
        for j in range(n):
            assert debias(ckpts[0], base)[i, j].item() == float(ckpts[0][i, j] - base[i, j])
            want = float(ckpts[0][i, j]) / math.sqrt(float(self_inf[j]))
            assert relatif(ckpts[0], self_inf)[i, j].item() == pytest.approx(want, rel=1e-14)
    # With the uniform mean, DDA = denoise − base (the base term is common to every checkpoint).
    torch.testing.assert_close(dda(ckpts, base), denoise(ckpts) - base, rtol=0, atol=1e-14)
    z = standardize(ckpts[0])
    torch.testing.assert_close(z.mean(-1), torch.zeros(q, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(z.std(-1, correction=0), torch.ones(q, dtype=torch.float64))


def test_bad_inputs_raise_clear_errors():
    a, b = _rand(2, 5), _rand(2, 4)
    with pytest.raises(DataError, match="shape"):
        debias(a, b)
    with pytest.raises(DataError, match="at least one"):
        denoise([])
    with pytest.raises(ConfigError, match="weights"):
        denoise([a, a], weights=[1.0])
    with pytest.raises(ConfigError, match="weights"):
        denoise([a, a], weights=[1.0, -1.0])
    with pytest.raises(ConfigError, match="smoothing"):
        denoise([a], smoothing="median")
    with pytest.raises(DataError, match="self-influence"):
        relatif(a, _rand(4).abs())
    with pytest.raises(ConfigError, match="Unknown correction"):
        CorrectionConfig(variants=("plain", "ddaa"))
    with pytest.raises(ConfigError, match="smoothing"):
        CorrectionConfig(smoothing="ema")
    assert set(CORRECTIONS) == {"plain", "debias", "denoise", "dda", "relatif"}
    with pytest.raises(ConfigError, match="base model"):
        CORRECTIONS["debias"](CorrectionInputs(finetuned=a))
    with pytest.raises(ConfigError, match="checkpoint"):
        CORRECTIONS["denoise"](CorrectionInputs(finetuned=a, checkpoints=[a]))


@pytest.fixture(scope="module")
def models():
    """A base model, one fine-tuning checkpoint and the fine-tuned model (float64, tiny)."""
    train = random_lm_data(12, seed=1)
    queries = random_lm_data(3, seed=2, prompt_len=2)
    base = tiny_gpt2(n_embd=16)
    train_lm(base, random_lm_data(24, seed=3), steps=25)
    ckpt = copy.deepcopy(base)
    train_lm(ckpt, train, steps=10, seed=1)
    final = copy.deepcopy(ckpt)
    train_lm(final, train, steps=10, seed=2)
    return base, ckpt, final, train, queries


def test_run_corrections_matches_independent_scores(models, tmp_path):
    base, ckpt, final, train, queries = models
    fit, score = FitConfig(curvature="ekfac", batch_size=4), ScoreConfig(query_rank=None)

    def independent(model):
        inf = Influence(copy.deepcopy(model), "causal_lm", modules="mlp", device="cpu")
        op = inf.fit(train, fit)  # each model with its own curvature
        s = inf.score(queries, train, op, score, self_influence=True)
        return s.pairwise.double(), s.self_influence.double()

    (s_base, _), (s_ckpt, _), (s_final, si) = map(independent, (base, ckpt, final))
    result = run_corrections(
        final,
        "causal_lm",
        train,
        queries,
        base=base,
        checkpoints=[ckpt],
        fit_config=fit,
        score_config=ScoreConfig(query_rank=None, normalize="relatif"),  # ignored by components
        run_dir=tmp_path / "run",
        device="cpu",
    )
    tol = {"rtol": 1e-9, "atol": 1e-12}
    torch.testing.assert_close(result.scores["plain"], s_final, **tol)
    torch.testing.assert_close(result.scores["debias"], s_final - s_base, **tol)
    torch.testing.assert_close(result.scores["denoise"], (s_ckpt + s_final) / 2, **tol)
    torch.testing.assert_close(result.scores["dda"], (s_ckpt + s_final) / 2 - s_base, **tol)
    torch.testing.assert_close(result.scores["relatif"], s_final / si.sqrt(), **tol)
    assert not torch.allclose(s_base, s_final)  # the correction changes something
    # The stored stages are reused on a rerun and give the same result.
    again = run_corrections(
        final, "causal_lm", train, queries, base=base, checkpoints=[ckpt], fit_config=fit,
        score_config=score, run_dir=tmp_path / "run", device="cpu",
    )  # fmt: skip
    for name, value in result.scores.items():
        torch.testing.assert_close(again.scores[name], value, **tol)
    result.save(tmp_path / "out")
    loaded = CorrectionResult.load(tmp_path / "out")
    assert loaded.config == result.config and loaded.train_indices == result.train_indices
    torch.testing.assert_close(loaded.scores["dda"], result.scores["dda"])


def test_run_corrections_needs_its_models(models):
    base, ckpt, final, train, queries = models
    with pytest.raises(ConfigError, match="base model"):
        run_corrections(final, "causal_lm", train, queries, checkpoints=[ckpt], device="cpu")
    with pytest.raises(ConfigError, match="checkpoints"):
        run_corrections(final, "causal_lm", train, queries, base=base, device="cpu")
    with pytest.raises(ConfigError, match="weights"):
        run_corrections(
            final, "causal_lm", train, queries, base=base, checkpoints=[ckpt], device="cpu",
            config=CorrectionConfig(weights=(1.0, 1.0, 1.0)),
        )  # fmt: skip
    only_plain = run_corrections(
        final, "causal_lm", train, queries, config=CorrectionConfig(variants=("plain",)),
        device="cpu", score_config=ScoreConfig(query_rank=None),
    )  # fmt: skip
    assert set(only_plain.scores) == {"plain"} and set(only_plain.components) == {"final"}
