"""DataInf curvature (Kwon et al. 2024) on LoRA adapters, against dense float64 references.

DataInf replaces ``(G + λI)^{-1}`` with ``(1/n) Σ_i (g_i g_iᵀ + λI)^{-1}`` (Sherman–Morrison per
term). The tests check the operator against that matrix built by dense solves from autograd
per-example gradients, that it is exact for one example and not for several, and that it
stores, loads, resumes and shards like the other operators.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import random_lm_data, tiny_gpt2
from influscope import ConfigError, FitConfig, Influence, ScoreConfig, StaleArtifactError
from influscope.cli import main
from influscope.curvature import DataInfOperator
from influscope.errors import NumericalError
from influscope.reference import datainf_inverse, per_example_gradients
from influscope.resources import estimate
from influscope.storage import atomic_write_tensors, read_tensors

peft = pytest.importorskip("peft")
from conftest import lora  # noqa: E402  (needs peft)

FIT = FitConfig(curvature="datainf", batch_size=3, seed=5)


@pytest.fixture(scope="module")
def setup():
    model = lora(tiny_gpt2(), r=2)
    inf = Influence(model, "causal_lm", modules="lora", device="cpu")
    train = random_lm_data(7, seed=1)
    queries = random_lm_data(3, seed=2, prompt_len=2)
    return inf, train, queries, inf.fit(train, FIT)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_fit_stores_the_autograd_gradients_and_the_papers_damping(setup):
    inf, train, _, op = setup
    ref = per_example_gradients(inf.model, inf.task, inf.layers, train, "loss", sample_seed=5)
    assert isinstance(op, DataInfOperator) and len(op.layer_names) == len(inf.layers)
    for t in inf.layers:
        g = ref[t.name]  # (n, out, in)
        torch.testing.assert_close(op.grads[t.name], g, rtol=1e-9, atol=1e-13)
        # λ = 0.1 · (n d)^{-1} Σ_i ‖g_i‖² (Kwon et al. 2024, §3)
        lam = 0.1 * g.square().sum() / (g.shape[0] * t.out_dim * t.in_dim)
        assert op.damping[t.name] == pytest.approx(float(lam), rel=1e-10)


def test_precondition_equals_the_dense_datainf_matrix(setup):
    inf, train, _, op = setup
    ref = per_example_gradients(inf.model, inf.task, inf.layers, train, "loss", sample_seed=5)
    torch.manual_seed(0)
    for t in inf.layers[:4]:
        q = torch.randn(4, t.out_dim, t.in_dim, dtype=torch.float64)
        dense = datainf_inverse(ref[t.name], op.damping[t.name])  # (P, P) by dense solves
        expected = (q.reshape(4, -1) @ dense).reshape_as(q)  # the matrix is symmetric
        torch.testing.assert_close(op.precondition(t.name, q), expected, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(op.inverse_dense(t.name), dense, rtol=1e-8, atol=1e-12)
        quad = torch.einsum("bp,pk,bk->b", q.reshape(4, -1), dense, q.reshape(4, -1))
        torch.testing.assert_close(op.quadratic(t.name, q), quad, rtol=1e-8, atol=1e-12)
    # chunked accumulation (one gradient row at a time) changes nothing
    name = inf.layers[0].name
    q = torch.randn(2, *op.grads[name].shape[1:], dtype=torch.float64)
    full = op.precondition(name, q)
    import influscope.curvature.datainf as datainf

    old, datainf.CHUNK_BYTES = datainf.CHUNK_BYTES, 1
    try:
        torch.testing.assert_close(op.precondition(name, q), full, rtol=1e-12, atol=1e-15)
    finally:
        datainf.CHUNK_BYTES = old


def test_exact_for_one_example_and_not_for_several(setup):
    """n = 1: Sherman–Morrison of λI + g gᵀ is the exact inverse. n = 7: swapping inverse and
    average is an approximation, far from (G + λI)^{-1} at the paper's damping."""
    inf, train, _, _ = setup
    errors = {}
    for n in (1, 7):
        op = inf.fit(train, FitConfig(curvature="datainf", seed=5, max_examples=n))
        worst = 0.0
        for t in inf.layers:
            g = op.grads[t.name].reshape(n, -1)  # (n, P)
            exact = g.t() @ g / n + op.damping[t.name] * torch.eye(g.shape[1], dtype=g.dtype)
            q = torch.randn(3, t.out_dim, t.in_dim, dtype=torch.float64)
            ref = torch.linalg.solve(exact, q.reshape(3, -1).t()).t().reshape_as(q)
            worst = max(worst, _relative(op.precondition(t.name, q), ref))
        errors[n] = worst
    assert errors[1] < 1e-10
    assert errors[7] > 0.05, errors  # the test of exactness above can fail


def test_self_influence_equals_pairwise_diagonal(setup):
    inf, train, _, op = setup
    self_inf = inf.self_influence(train, op)
    pairwise = inf.score(train, train, op, ScoreConfig(query_rank=None)).pairwise
    torch.testing.assert_close(self_inf, torch.diagonal(pairwise), rtol=1e-9, atol=1e-12)
    assert (self_inf > 0).all()


def test_fit_is_independent_of_batch_and_shard_size(setup):
    inf, train, queries, op = setup
    other = inf.fit(train, FitConfig(curvature="datainf", batch_size=1, shard_size=2, seed=5))
    for name, g in op.grads.items():
        torch.testing.assert_close(other.grads[name], g, rtol=1e-10, atol=1e-14)
        assert other.damping[name] == pytest.approx(op.damping[name], rel=1e-10)
    cfg = ScoreConfig(query_rank=None)
    torch.testing.assert_close(
        inf.score(queries, train, other, cfg).pairwise,
        inf.score(queries, train, op, cfg).pairwise,
        rtol=1e-9,
        atol=1e-12,
    )


def test_store_load_round_trip_and_stale_factors(setup, tmp_path):
    inf, train, queries, _ = setup
    stored = Influence(inf.model, "causal_lm", modules="lora", run_dir=tmp_path, device="cpu")
    cfg = FitConfig(curvature="datainf", batch_size=3, shard_size=3, seed=5)
    op = stored.fit(train, cfg, name="di")
    assert stored.last_fit_shards["computed"] == 3  # 7 examples → shards of 3, 3, 1
    assert not list(tmp_path.rglob(".di.partial"))  # partial rows cleared after saving
    meta = json.loads((tmp_path / "factors" / "di" / "meta.json").read_text())
    assert meta["curvature"] == "datainf"
    loaded = stored.load_factors(train, name="di")
    assert isinstance(loaded, DataInfOperator) and loaded.damping == op.damping
    score = ScoreConfig(query_rank=None)
    a = stored.score(queries, train, op, score).pairwise
    assert torch.equal(stored.score(queries, train, loaded, score).pairwise, a)
    # the memory budget is not part of the fingerprint: the stage is reused
    stamp = (tmp_path / "factors" / "di" / "meta.json").stat().st_mtime_ns
    again = stored.fit(train, FitConfig(**{**cfg.to_dict(), "datainf_memory_mb": 1.0}), name="di")
    assert (tmp_path / "factors" / "di" / "meta.json").stat().st_mtime_ns == stamp  # not refitted
    assert all(torch.equal(again.grads[k], op.grads[k]) for k in op.grads)
    # another adapter, or other data, is refused
    other = Influence(lora(tiny_gpt2(), seed=3, r=2), "causal_lm", modules="lora", run_dir=tmp_path)
    with pytest.raises(StaleArtifactError, match="different model"):
        other.fit(train, cfg, name="di")
    with pytest.raises(StaleArtifactError, match="different data"):
        stored.fit(random_lm_data(7, seed=9), cfg, name="di")


def test_a_fit_killed_before_saving_resumes_from_its_shards(setup, tmp_path, monkeypatch):
    inf, train, _, op = setup
    stored = Influence(inf.model, "causal_lm", modules="lora", run_dir=tmp_path, device="cpu")
    cfg = FitConfig(curvature="datainf", batch_size=3, shard_size=3, seed=5)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-fit")

    monkeypatch.setattr(stored.run, "save", crash)
    with pytest.raises(KeyboardInterrupt, match="killed mid-fit"):
        stored.fit(train, cfg, name="di")
    monkeypatch.undo()
    assert len(list((tmp_path / "factors" / ".di.partial" / "gradients").glob("*"))) == 3
    resumed = stored.fit(train, cfg, name="di")
    assert stored.last_fit_shards == {"loaded": 3, "computed": 0, "replayed": 0}
    for name, g in op.grads.items():
        torch.testing.assert_close(resumed.grads[name], g, rtol=1e-10, atol=1e-14)


def test_memory_budget_and_damping_errors_are_clear(setup):
    inf, train, _, _ = setup
    with pytest.raises(ConfigError, match=r"7 examples × .* MiB.*modules='lora'.*max_examples"):
        inf.fit(train, FitConfig(curvature="datainf", datainf_memory_mb=0.01))
    est = {e.stage: e for e in estimate(inf, train, curvature="datainf", max_examples=5)}
    params = sum(t.out_dim * t.in_dim for t in inf.layers)
    assert est["fit: gradients"].disk == 4 * 5 * params
    with pytest.raises(ConfigError, match="λ must be > 0"):
        FitConfig(curvature="datainf", damping=0.0)
    # PEFT's default init (B = 0) zeroes every A-gradient: λ = 0.1·mean‖g‖²/d = 0 is refused
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True)
    fresh = peft.get_peft_model(tiny_gpt2(), config).eval()
    with pytest.raises(NumericalError, match=r"lora_A.*damping > 0"):
        Influence(fresh, "causal_lm", modules="lora").fit(train, FIT)
    op = Influence(fresh, "causal_lm", modules="lora").fit(
        train, FitConfig(curvature="datainf", damping=1e-3)
    )
    assert all(v == 1e-3 for v in op.damping.values())


TEXTS = ["The capital of Velmora is Tarsk.", "Zorin Quell was born in Ostrava.", "To be."]


def test_cli_fit_and_dry_run(workdir, capsys):
    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    args += ["--run", str(workdir / "run"), "--curvature", "datainf"]
    assert main(["fit", *args, "--dry-run"]) == 0
    assert "fit: gradients" in capsys.readouterr().err  # the console writes to stderr
    assert main(["fit", *args, "--name", "di"]) == 0
    meta = json.loads((workdir / "run" / "factors" / "di" / "meta.json").read_text())
    assert meta["curvature"] == "datainf" and meta["config"]["curvature"] == "datainf"


def _rank_fit(rank: int, tmp: str) -> None:
    os.environ["INFLUSCOPE_PROGRESS"] = "0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        op = _distributed_fit(Path(tmp) / "run")
        atomic_write_tensors(Path(tmp) / f"rank{rank}.safetensors", op.tensors())
    finally:
        dist.destroy_process_group()


def _distributed_fit(run_dir: Path) -> DataInfOperator:
    model = lora(tiny_gpt2(n_layer=1), r=2)
    inf = Influence(model, "causal_lm", modules="lora", run_dir=run_dir, device="cpu")
    config = FitConfig(curvature="datainf", batch_size=2, shard_size=2)  # 5 shards
    return inf.fit(random_lm_data(9, seed=1), config)


@pytest.mark.slow
def test_two_gloo_ranks_gather_the_same_gradients(tmp_path):
    """Shards of 2 examples are dealt to 2 ranks; the all-reduce gathers every row once."""
    mp.start_processes(_rank_fit, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    single = _distributed_fit(tmp_path / "single").tensors()
    for rank in range(2):
        got = read_tensors(tmp_path / f"rank{rank}.safetensors")
        assert set(got) == set(single)
        for key, value in single.items():
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-15, msg=key)
