"""SOURCE (Bae et al. 2024) and TracIn-CP over checkpoints, against dense float64 references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import random_lm_data, tiny_gpt2, train_lm
from influscope import ConfigError, DataError, Influence
from influscope.config import FitConfig, ScoreConfig
from influscope.reference import flatten, per_example_gradients
from influscope.tasks import CausalLMTask
from influscope.trajectory import (
    from_directory,
    from_models,
    make_segments,
    source_scores,
    tracin_scores,
)

MODULES = ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj"]
FIT = FitConfig(curvature="ekfac", fisher="empirical", damping_factor=0.1)


@pytest.fixture(scope="module")
def run():
    """Three checkpoints of one short run of a width-8 GPT-2 (float64)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = random_lm_data(10, vocab=24, max_len=8, seed=1)
    queries = random_lm_data(3, vocab=24, max_len=8, seed=2, prompt_len=2)
    model = tiny_gpt2(n_embd=8, vocab=24, seed=0)
    models = []
    for k in range(3):
        model = train_lm(model, data, steps=15, lr=3e-3, seed=k)
        models.append(_copy(model))
    yield data, queries, models
    torch.set_num_threads(threads)


def _copy(model):
    clone = tiny_gpt2(n_embd=8, vocab=24, seed=0)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def _grads(model, data, objective="loss"):
    task = CausalLMTask()
    layers = Influence(model, task, modules=MODULES).layers
    return flatten(per_example_gradients(model, task, layers, data, objective), layers)


def _dense_h(model, data):
    """Block-diagonal dense ``G + λI`` of the tracked layers from the fitted EK-FAC."""
    inf = Influence(model, CausalLMTask(), modules=MODULES)
    op = inf.fit(data, FIT)
    return scipy.linalg.block_diag(*[op.dense(n).numpy() for n in inf.layer_names])


def dense_source(query_grad, train_grads, hessians, horizons):
    """``-∇fᵀ Σ_ℓ (Π_{ℓ'>ℓ} S_ℓ') (I − S_ℓ) H_ℓ⁻¹ ∇L_ℓ`` with ``S = expm(−ηK H)``: ``(Q, N)``."""
    total = 0.0
    for ell, (g, h, t) in enumerate(zip(train_grads, hessians, horizons)):
        s = scipy.linalg.expm(-t * h)
        vec = (np.eye(len(h)) - s) @ np.linalg.solve(h, g.numpy().T)  # (P, N)
        for later_h, later_t in zip(hessians[ell + 1 :], horizons[ell + 1 :]):
            vec = scipy.linalg.expm(-later_t * later_h) @ vec
        total = total - query_grad.numpy() @ vec
    return torch.from_numpy(total)


def test_stationary_one_segment_is_ekfac_influence(run) -> None:
    data, queries, models = run
    traj = from_models(models[-1:], [15], 3e-3)
    task = CausalLMTask()
    inf = Influence(models[-1], task, modules=MODULES)
    expected = inf.score(queries, data, inf.fit(data, FIT), ScoreConfig(query_rank=None))
    for kw in ({"stationary": True}, {"lr_scale": 1e12}):
        got = source_scores(traj, task, MODULES, data, queries, FIT, **kw)
        torch.testing.assert_close(got.pairwise, expected.pairwise, rtol=0, atol=1e-10)


def test_one_segment_finite_horizon_matches_dense_expm(run) -> None:
    data, queries, models = run
    model = models[-1]
    traj = from_models([model], [40], 0.5)
    got = source_scores(traj, CausalLMTask(), MODULES, data, queries, FIT).pairwise
    h = _dense_h(model, data)
    expected = dense_source(_grads(model, queries, "measurement"), [_grads(model, data)], [h], [20])
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    # finite horizon differs from the stationary (ordinary influence) limit
    stat = source_scores(traj, CausalLMTask(), MODULES, data, queries, FIT, stationary=True)
    assert (got - stat.pairwise).abs().max() > 1e-3 * got.abs().max()


def test_two_segments_match_dense_formula(run) -> None:
    data, queries, models = run
    traj = from_models(models[1:], [15, 45], [0.4, 0.1])
    total, parts = source_scores(
        traj, CausalLMTask(), MODULES, data, queries, FIT, return_segments=True
    )
    hs = [_dense_h(m, data) for m in models[1:]]
    horizons = [0.4 * 15, 0.1 * 30]
    expected = dense_source(
        _grads(models[2], queries, "measurement"),
        [_grads(m, data) for m in models[1:]],
        hs,
        horizons,
    )
    torch.testing.assert_close(total.pairwise, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(parts[0].pairwise + parts[1].pairwise, total.pairwise)
    # the earlier segment contributes (it is not the one-segment result)
    assert parts[0].pairwise.abs().max() > 1e-3 * total.pairwise.abs().max()


def test_segments_group_checkpoints_and_refuse_too_many(run) -> None:
    _, _, models = run
    traj = from_models(models, [10, 20, 40], [1.0, 2.0, 3.0])
    one = make_segments(traj, 1)
    assert len(one) == 1 and one[0].steps == 40 and one[0].checkpoint.step == 40
    assert one[0].lr == pytest.approx((10 * 1 + 10 * 2 + 20 * 3) / 40)
    assert [s.steps for s in make_segments(traj)] == [10, 10, 20]
    with pytest.raises(ConfigError, match=r"2 segments asked for.*1 checkpoint"):
        make_segments(from_models(models[:1], [5], 1.0), 2)


def test_tracin_cp_equals_autograd_loop(run) -> None:
    data, queries, models = run
    lrs = [0.3, 0.2, 0.1]
    traj = from_models(models, [15, 30, 45], lrs)
    got = tracin_scores(traj, CausalLMTask(), MODULES, data, queries, batch_size=4).pairwise
    expected = sum(
        lr * -(_grads(m, queries, "measurement") @ _grads(m, data).T) for m, lr in zip(models, lrs)
    )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _save(model, folder, step=None, lr=None):
    model.save_pretrained(folder)
    if step is not None:
        history = [{"step": s, "learning_rate": lr * s} for s in range(1, step + 1)]
        (folder / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "log_history": history})
        )


def test_directory_loader_orders_by_step_and_reads_lrs(run, tmp_path) -> None:
    _, _, models = run
    for step, model in zip([100, 20, 3], models):
        _save(model, tmp_path / f"checkpoint-{step}")
    _save(models[0], tmp_path / "checkpoint-100", 100, 1e-3)  # newest trainer_state
    traj = from_directory(tmp_path)
    assert traj.steps == [3, 20, 100] and traj.segment_lengths() == [3, 17, 80]
    assert [c.name for c in traj] == ["checkpoint-3", "checkpoint-20", "checkpoint-100"]
    # mean logged lr inside (prev, step]: lr(s) = 1e-3 s
    assert traj[0].lr == pytest.approx(1e-3 * 2) and traj[1].lr == pytest.approx(1e-3 * 12)
    loaded = traj[0].load()
    for p, q in zip(loaded.state_dict().values(), models[2].state_dict().values()):
        assert torch.equal(p, q)
    assert from_directory(tmp_path, lr=0.5)[2].lr == 0.5


def test_directory_loader_refuses_bad_input(run, tmp_path) -> None:
    _, _, models = run
    mixed = tmp_path / "mixed"
    _save(models[0], mixed / "checkpoint-1")
    tiny_gpt2(n_embd=16, vocab=24).save_pretrained(mixed / "checkpoint-2")
    with pytest.raises(ConfigError, match=r"different architectures.*checkpoint-2.*n_embd"):
        from_directory(mixed, lr=1.0)
    unordered = tmp_path / "unordered"
    _save(models[0], unordered / "final")
    _save(models[1], unordered / "checkpoint-5")
    with pytest.raises(DataError, match=r"step of 'final'.*checkpoint-<step>"):
        from_directory(unordered, lr=1.0)
    nolr = tmp_path / "nolr"
    _save(models[0], nolr / "checkpoint-5")
    with pytest.raises(ConfigError, match=r"No learning rates.*lr="):
        from_directory(nolr)
    with pytest.raises(ConfigError, match="different architectures"):
        from_models([models[0], tiny_gpt2(n_embd=16, vocab=24)], [1, 2], 1.0)
    with pytest.raises(DataError, match="share a step"):
        from_models(models[:2], [3, 3], 1.0)
    with pytest.raises(ConfigError, match="Kronecker eigenbasis"):
        source_scores(
            from_models(models[:1], [1], 1.0),
            CausalLMTask(),
            MODULES,
            random_lm_data(2, vocab=24),
            random_lm_data(1, vocab=24),
            FitConfig(curvature="diagonal"),
        )


def test_final_model_of_another_architecture_is_refused(run) -> None:
    data, queries, models = run
    foreign = tiny_gpt2(n_embd=16, vocab=24)
    with pytest.raises(ConfigError, match=r"different architectures: the final model.*remove"):
        source_scores(
            from_models(models[:1], [5], 1.0),
            CausalLMTask(),
            MODULES,
            data,
            queries,
            FIT,
            final_model=foreign,
        )


def test_load_trajectory_dispatch(run) -> None:
    from influscope.demo.train import Checkpoint
    from influscope.trajectory import load_trajectory

    _, _, models = run
    traj = load_trajectory(models[:2], steps=[4, 2], lrs=[0.1, 0.2])
    assert traj.steps == [2, 4] and [c.lr for c in traj] == [0.2, 0.1]
    ckpts = [Checkpoint(s, 0.1 * s, m.state_dict()) for s, m in zip([3, 6], models)]
    traj = load_trajectory(ckpts, config=models[0].config)
    assert traj.steps == [3, 6] and traj[1].lr == pytest.approx(0.6)
    assert traj[0].load().transformer.h[0].mlp.c_fc.weight.dtype == torch.float64
    with pytest.raises(ConfigError, match="steps= and lrs="):
        load_trajectory(models)
    with pytest.raises(ConfigError, match="config="):
        load_trajectory(ckpts)
    with pytest.raises(DataError, match="at least one checkpoint"):
        from_models([], [], [])


def test_cli_trajectory_writes_scores_and_refuses_bad_segments(tmp_path) -> None:
    from conftest import save_tiny_model
    from influscope.cli import main

    texts = ["The capital of Velmora is Tarsk.", "Rivers run to the sea at dusk."]
    for step in (2, 4):
        torch.manual_seed(step)
        save_tiny_model(tmp_path / "run" / f"checkpoint-{step}", texts, n_layer=1)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "The capital", "completion": " of"}))
    common = ["--checkpoints", str(tmp_path / "run"), "--train", str(tmp_path / "train.jsonl")]
    common += ["--queries", str(tmp_path / "q.jsonl"), "--lr", "0.5", "--device", "cpu"]
    for method in ("source", "tracin"):
        out = tmp_path / f"{method}.json"
        assert main(["trajectory", *common, "--method", method, "--out", str(out)]) == 0
        got = json.loads(out.read_text())
        assert [c["step"] for c in got["checkpoints"]] == [2, 4]
        assert np.isfinite(np.array(got["scores"])).all() and len(got["scores"][0]) == 2
    bad = ["trajectory", *common, "--segments", "3", "--out", str(tmp_path / "x.json")]
    assert main(bad) == 2  # ConfigError: 3 segments from 2 checkpoints
    assert not (tmp_path / "x.json").exists()
    # a foreign checkpoint (another architecture) is refused before anything is written
    torch.manual_seed(0)
    save_tiny_model(tmp_path / "run" / "checkpoint-6", texts, n_layer=2)
    for method in ("source", "tracin"):
        out = tmp_path / f"mixed-{method}.json"
        assert main(["trajectory", *common, "--method", method, "--out", str(out)]) == 2
        assert not out.exists()


def test_batch_size_invariance(run) -> None:
    # Fit and score batch sizes only regroup sums: SOURCE (two finite segments) and TracIn-CP
    # agree to float64 rounding for batches of 1, 3 and all 10 sequences.
    data, queries, models = run
    traj = from_models(models[1:], [15, 45], [0.4, 0.1])
    task = CausalLMTask()
    source, tracin = [], []
    for b in (1, 3, 10):
        fit = FitConfig(curvature="ekfac", fisher="empirical", damping_factor=0.1, batch_size=b)
        source.append(source_scores(traj, task, MODULES, data, queries, fit, batch_size=b))
        tracin.append(tracin_scores(traj, task, MODULES, data, queries, batch_size=b))
    for s, t in zip(source[1:], tracin[1:]):
        torch.testing.assert_close(s.pairwise, source[0].pairwise, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(t.pairwise, tracin[0].pairwise, rtol=1e-10, atol=1e-12)
    assert source[0].pairwise.abs().max() > 0 and tracin[0].pairwise.abs().max() > 0
