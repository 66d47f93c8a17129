"""TrackStar's optimizer-aware index rows: Adam second-moment scaling and unit normalisation
against a dense float64 reference; reading Adam's state (safetensors, torch state dicts with
and without parameter names, a transformers Trainer checkpoint); bad input refused."""

from __future__ import annotations

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import ConfigError, DataError, Influence, StaleArtifactError
from influscope.index import IndexConfig, build_index, preconditioned_queries
from influscope.index.trackstar import load_adam_moments, save_adam_moments
from influscope.optim import decoupled_adamw
from influscope.reference import per_example_gradients
from influscope.storage.atomic import read_tensors

EPS = 1e-6
CFG = IndexConfig(
    k_in=4, k_out=5, curvature="identity", optimizer="adam", adam_eps=EPS, dtype="float32",
    batch_size=3, shard_size=4,
)  # fmt: skip


def _moments(model, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # spread over 4 orders of magnitude, like real second moments
    return {n: 10 ** (-4 * torch.rand(p.shape, generator=g, dtype=torch.float64)) for n, p in model.named_parameters()}  # fmt: skip


def _reference(inf, index, data, moments, objective, normalize) -> torch.Tensor:
    """Dense float64: per-example gradients ⊙ (v+ε)^{-1/2}, projected, concatenated, normalised."""
    grads = per_example_gradients(inf.model, inf.tracked.task, inf.tracked.layers, data, objective)
    proj = read_tensors(index.root / "projector.safetensors")
    rows = []
    for layer in inf.tracked.layers:
        v = layer.adapter.join(
            layer.module, [moments[f"{layer.name}.weight"], moments[f"{layer.name}.bias"]]
        )  # (out, in + 1)
        g = grads[layer.name].double() * (v.double() + EPS).rsqrt()  # (N, out, in + 1)
        p_in, p_out = proj[f"{layer.name}::p_in"], proj[f"{layer.name}::p_out"]  # (k, in), (k, out)
        rows.append(torch.einsum("ko,noi,ji->nkj", p_out.double(), g, p_in.double()).flatten(1))
    x = torch.cat(rows, dim=1)  # (N, D)
    return x / x.norm(dim=1, keepdim=True) if normalize else x


@pytest.mark.parametrize("normalize", [True, False])
def test_scaled_rows_and_queries_equal_the_dense_reference(tmp_path, normalize):
    model = tiny_gpt2(n_embd=8)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    train, queries = random_lm_data(7, seed=1), random_lm_data(2, seed=2, prompt_len=3)
    moments = _moments(model)
    cfg = IndexConfig(**{**CFG.to_dict(), "normalize": normalize})
    index = build_index(inf.tracked, train, tmp_path / "idx", cfg, second_moments=moments)
    ref = _reference(inf, index, train, moments, "loss", normalize)
    torch.testing.assert_close(
        index.rows(range(7)).double(), ref, rtol=1e-4, atol=1e-6 * ref.abs().max()
    )
    q = preconditioned_queries(inf.tracked, queries, index)  # identity curvature: no change
    ref_q = _reference(inf, index, queries, moments, "measurement", normalize)
    torch.testing.assert_close(q.double(), ref_q, rtol=1e-4, atol=1e-6 * ref_q.abs().max())
    if normalize:  # scores are minus cosines
        scores = index.search(q, k=7).scores
        assert scores.abs().max() <= 1 + 1e-5
    # other moments → other rows: the index refuses to be reused
    with pytest.raises(StaleArtifactError, match="different optimizer_scale"):
        build_index(inf.tracked, train, tmp_path / "idx", cfg, second_moments=_moments(model, 1))


def _trained(model, named: bool):
    params = list(model.named_parameters()) if named else list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3) if named else decoupled_adamw(params, 1e-3, 0.01)
    data = random_lm_data(4, seed=3)
    for ex in data.examples:
        opt.zero_grad()
        ids = ex["input_ids"][None]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("named", [False, True], ids=["matrices-first groups", "param_names"])
def test_moments_from_a_torch_optimizer_state(tmp_path, named):
    model = tiny_gpt2(n_embd=8)
    opt = _trained(model, named)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    save_adam_moments(model, opt, tmp_path / "moments.safetensors")
    by_name = load_adam_moments(tmp_path / "moments.safetensors", model)
    from_pt = load_adam_moments(tmp_path / "optimizer.pt", model)
    assert by_name.keys() == from_pt.keys() == dict(model.named_parameters()).keys()
    for n, p in model.named_parameters():
        assert torch.equal(by_name[n], opt.state[p]["exp_avg_sq"]) and torch.equal(
            from_pt[n], by_name[n]
        )
    other = tiny_gpt2(n_embd=12)
    match = "does not fit this model" if named else "Cannot tell which parameter.*save_adam_moments"
    with pytest.raises(DataError, match=match):
        load_adam_moments(tmp_path / "optimizer.pt", other)
    with pytest.raises(DataError, match=r"does not fit this model.*another model"):
        load_adam_moments(tmp_path / "moments.safetensors", other)


def test_moments_from_a_trainer_checkpoint(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_gpt2(n_embd=8)
    data = [{"input_ids": ex["input_ids"], "labels": ex["input_ids"]} for ex in random_lm_data(8, seed=4, min_len=6, max_len=6).examples]  # fmt: skip
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=4, report_to=[],
        use_cpu=True, save_strategy="steps", save_steps=2, remove_unused_columns=False,
        disable_tqdm=True, learning_rate=1e-3,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    moments = load_adam_moments(tmp_path / "hf" / "checkpoint-2" / "optimizer.pt", model)
    opt = trainer.optimizer
    for n, p in model.named_parameters():
        assert torch.equal(moments[n], opt.state[p]["exp_avg_sq"].cpu()), n


def test_bad_trackstar_input_is_refused_before_work(tmp_path):
    model = tiny_gpt2(n_embd=8)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    train = random_lm_data(3, seed=1)
    with pytest.raises(ConfigError, match=r"none were given.*load_adam_moments"):
        build_index(inf.tracked, train, tmp_path / "a", CFG)
    partial = {k: v for k, v in _moments(model).items() if "c_proj" not in k}
    with pytest.raises(DataError, match=r"no second moment for \['transformer.h.0.mlp.c_proj"):
        build_index(inf.tracked, train, tmp_path / "b", CFG, second_moments=partial)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(
        ConfigError, match="curvature='identity'; received init='orthogonal', curvature='ekfac'"
    ):
        IndexConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        IndexConfig(optimizer="sgd")
    with pytest.raises(DataError, match="No optimizer state at"):
        load_adam_moments(tmp_path / "missing.pt", model)
