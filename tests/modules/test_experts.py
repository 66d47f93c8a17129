"""Mixture-of-experts: per-expert gradients, routed-token statistics and scores (float64).

Tiny Mixtral / Qwen2-MoE / OLMoE models built from configs (transformers 5.x fused experts,
eager attention and experts so that float64 runs). The routers' softmax and the RMSNorms run in
float32 inside transformers, so a padded batch agrees with the same examples run alone only to
~1e-9 relative: exact comparisons against the one-example
autograd loop use ``batch_size=1``; batched passes are compared against autograd on the same
batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from influscope import FitConfig, Influence, ScoreConfig
from influscope.curvature import IdentityOperator
from influscope.errors import ConfigError, ModuleMatchError
from influscope.modules.passes import layer_passes
from influscope.reference import ekfac_eigenvalues, per_example_gradients
from influscope.toy import random_lm_data, tiny_moe

ARCHS = ["mixtral", "qwen2_moe", "olmoe"]


def hooked_gradients(inf, data, batch_size):
    got = {n: [] for n in inf.layer_names}
    for _, grads, _ in layer_passes(
        inf.model, inf.task, list(inf.layers), data, batch_size=batch_size
    ):
        for n, lb in grads.items():
            got[n].append(lb.gradient())
    return {n: torch.cat(v) for n, v in got.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_preset_tracks_every_expert_and_the_router(arch):
    inf = Influence(tiny_moe(arch), "causal_lm", modules="mlp")
    block = "model.layers.1.mlp"
    names = inf.layer_names
    assert f"{block}.gate" in names  # the router
    for e in range(4):
        assert f"{block}.experts.gate_up_proj.{e}" in names
        assert f"{block}.experts.down_proj.{e}" in names
    shapes = {t.name: (t.out_dim, t.in_dim) for t in inf.layers}
    assert shapes[f"{block}.experts.gate_up_proj.2"] == (12, 8)
    assert shapes[f"{block}.experts.down_proj.2"] == (8, 6)
    assert shapes[f"{block}.gate"] == (4, 8)
    if arch == "qwen2_moe":
        assert f"{block}.shared_expert.up_proj" in names and f"{block}.shared_expert_gate" in names


@pytest.mark.parametrize("arch", ARCHS)
def test_hooked_expert_gradients_equal_autograd(arch):
    model = tiny_moe(arch)
    inf = Influence(model, "causal_lm", modules="mlp")
    data = random_lm_data(4, seed=1)
    ref = per_example_gradients(model, inf.task, list(inf.layers), data)
    got = hooked_gradients(inf, data, batch_size=1)
    for name in inf.layer_names:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-15)
    assert all(ref[n].abs().sum() > 0 for n in inf.layer_names if ".experts." in n)
    # batched (padded) pass: the batch's summed gradient equals autograd on that same batch
    batch = inf.task.collate(data.examples)
    params = [
        model.model.layers[1].mlp.experts.gate_up_proj,
        model.model.layers[1].mlp.experts.down_proj,
    ]
    total = inf.task.training_loss(model, batch, None).sum()
    whole = torch.autograd.grad(total, params)
    batched = hooked_gradients(inf, data, batch_size=4)
    for param, g in zip(("gate_up_proj", "down_proj"), whole):
        for e in range(4):
            summed = batched[f"model.layers.1.mlp.experts.{param}.{e}"].sum(0)
            torch.testing.assert_close(summed, g[e], rtol=1e-10, atol=1e-15)


def routed_inputs(model, data, layer: int) -> dict[int, torch.Tensor]:
    """Reference: the block inputs of the tokens routed to each expert (one example at a time)."""
    block = model.model.layers[layer].mlp
    seen = []
    hook = block.gate.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o[2])))
    with torch.no_grad():
        for ex in data.examples:
            model(input_ids=ex["input_ids"][None])
    hook.remove()
    x = torch.cat([h for h, _ in seen])  # (N_tok, H)
    idx = torch.cat([i for _, i in seen])  # (N_tok, k)
    return {e: x[(idx == e).any(-1)] for e in range(4)}


@pytest.mark.parametrize("batch_size", [1, 5])
def test_expert_token_statistics_use_only_the_routed_tokens(batch_size):
    model = tiny_moe("mixtral")
    inf = Influence(model, "causal_lm", modules="mlp")
    data = random_lm_data(5, seed=2)
    ref = routed_inputs(model, data, 0)
    rows = {e: [] for e in range(4)}
    passes = layer_passes(model, inf.task, list(inf.layers), data, batch_size=batch_size)
    for _, grads, _ in passes:
        for e in range(4):
            a, _ = grads[f"model.layers.0.mlp.experts.gate_up_proj.{e}"].masked_tokens()
            rows[e].append(a)
    n_tok = sum(len(ex["input_ids"]) for ex in data.examples)
    assert sum(len(r) for r in ref.values()) == 2 * n_tok  # top-2 routing
    # padded batches: RMSNorm runs in float32 inside transformers, so ~1e-9 relative
    tol = 1e-10 if batch_size == 1 else 1e-7
    for e in range(4):
        a = torch.cat(rows[e])
        assert a.shape == ref[e].shape  # the routed tokens, padding excluded
        # the sum K-FAC's activation covariance takes
        torch.testing.assert_close(a.t() @ a, ref[e].t() @ ref[e], rtol=tol, atol=1e-13)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_identity_scores_per_expert_sum_to_the_block(arch):
    """Per-expert identity terms = -∇f·∇L on each slice; summed = the whole 3-D parameters'."""
    model = tiny_moe(arch)
    inf = Influence(model, "causal_lm", modules=r"layers\.1\.mlp\.experts\.")
    train, queries = random_lm_data(4, seed=3), random_lm_data(2, seed=4)
    op = IdentityOperator({n: 0.0 for n in inf.layer_names})
    config = ScoreConfig(query_rank=None, per_layer=True, batch_size=1)
    scores = inf.score(queries, train, op, config)
    experts = model.model.layers[1].mlp.experts
    params = [experts.gate_up_proj, experts.down_proj]

    def grads(data, objective):
        out = []
        for ex in data.examples:
            batch = inf.task.collate([ex])
            value = (
                inf.task.training_loss(model, batch, None)
                if objective == "loss"
                else inf.task.measurement(model, batch)
            ).sum()
            out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
        return torch.stack(out)  # (n, P_block)

    block = -grads(queries, "measurement") @ grads(train, "loss").t()  # (Q, N)
    torch.testing.assert_close(scores.per_layer.sum(-1), block, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(scores.pairwise, block, rtol=1e-10, atol=1e-15)
    assert scores.per_layer.shape[-1] == 8
    assert (scores.per_layer.abs().sum((0, 1)) > 0).all()  # every expert carries a share


def test_ekfac_expert_scores_equal_the_dense_reference():
    model = tiny_moe("mixtral")
    inf = Influence(model, "causal_lm", modules=r"layers\.0\.mlp\.")  # router + experts
    train, queries = random_lm_data(6, seed=5), random_lm_data(2, seed=6)
    fit = FitConfig(curvature="ekfac", batch_size=1, seed=3)
    op = inf.fit(train, fit)
    scores = inf.score(queries, train, op, ScoreConfig(query_rank=None, batch_size=1))
    layers = list(inf.layers)
    q = per_example_gradients(model, inf.task, layers, queries, "measurement")
    t = per_example_gradients(model, inf.task, layers, train, "loss")
    t_fit = per_example_gradients(model, inf.task, layers, train, "loss", sample_seed=fit.seed)
    expected = torch.zeros(2, 6, dtype=torch.float64)
    for layer in layers:
        n = layer.name
        qa, qs = op.q_a[n].double(), op.q_s[n].double()
        lam = ekfac_eigenvalues(t_fit[n], qa, qs)  # (out, in) from autograd gradients
        torch.testing.assert_close(op.eigenvalues[n].double(), lam, rtol=1e-8, atol=1e-20)
        basis = torch.kron(qs, qa)  # (P, P)
        inv = basis @ torch.diag(1.0 / (lam.reshape(-1) + op.damping[n])) @ basis.t()
        expected -= q[n].flatten(1) @ inv @ t[n].flatten(1).t()
    torch.testing.assert_close(scores.pairwise, expected, rtol=1e-8, atol=1e-12)


def test_transposed_expert_layout_is_refused_with_the_module_name():
    model = tiny_moe("mixtral")
    model.model.layers[0].mlp.experts.is_transposed = True
    with pytest.raises(
        ModuleMatchError,
        match=r"model\.layers\.0\.mlp\.experts.*is_transposed.*Supported: transformers 5\.x fused experts",
    ):
        Influence(model, "causal_lm", modules="mlp")


class ListMoE(nn.Module):
    """A custom MoE whose experts are a ModuleList of nn.Linear (not supported)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.gate = nn.Linear(4, 2)


def test_per_expert_linear_module_list_is_refused_with_the_module_name():
    with pytest.raises(
        ModuleMatchError, match=r"'experts\.0' is a per-expert nn\.Linear.*Supported:"
    ):
        Influence(ListMoE(), "causal_lm", modules="all")


def test_router_alone_is_trackable():
    model = tiny_moe("olmoe")
    inf = Influence(model, "causal_lm", modules=r"\.mlp\.gate$")
    assert inf.layer_names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    data = random_lm_data(3, seed=7)
    ref = per_example_gradients(model, inf.task, list(inf.layers), data)
    got = hooked_gradients(inf, data, batch_size=1)
    for n in inf.layer_names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-15)
        assert ref[n].abs().sum() > 0


def test_expert_study_reports_which_experts_carry_a_query():
    from influscope.analysis import expert_study
    from influscope.analysis.components import expert_groups

    model = tiny_moe("mixtral")
    inf = Influence(model, "causal_lm", modules="mlp")
    train, queries = random_lm_data(6, seed=10), random_lm_data(2, seed=11)
    op = IdentityOperator({n: 0.0 for n in inf.layer_names})
    scores = inf.score(queries, train, op, ScoreConfig(query_rank=None, per_layer=True))
    groups = expert_groups(scores.layer_names)
    assert list(groups)[:5] == [f"model.layers.0.mlp.experts.{e}" for e in range(4)] + [
        "model.layers.1.mlp.experts.0"
    ]
    assert "model.layers.0.mlp.gate" in groups
    assert len(groups["model.layers.0.mlp.experts.2"]) == 2  # gate_up_proj.2 + down_proj.2
    result = expert_study(scores, ["q0", "q1"], top_k=3)
    assert len(result.components) == 10  # 2 blocks × (4 experts + router)
    torch.testing.assert_close(
        torch.tensor(result.abs_share, dtype=torch.float64).sum(-1),
        torch.ones(2, dtype=torch.float64),
    )
    # the leader is the expert with the largest Σ_m |gate_up_e + down_e| term
    per = scores.per_layer[0]  # (N, L)
    mass = {g: per[:, idx].sum(-1).abs().sum().item() for g, idx in groups.items()}
    assert result.leaders(0)[0][0] == max(mass, key=mass.get)
    assert "Experts: which" in result.to_section().title


def test_functional_reference_places_every_expert_slice():
    """The flat-θ function behind the Gauss-Newton references (and refine, PBRF) puts each
    expert's chunk into its slice of the shared 3-D parameter: its gradient = autograd's."""
    from influscope.reference import flatten, functional_outputs

    model = tiny_moe("mixtral")
    inf = Influence(model, "causal_lm", modules=r"layers\.0\.mlp\.experts\.")
    data = random_lm_data(1, seed=12)
    batch = inf.task.collate(data.examples)
    fn, theta = functional_outputs(model, inf.task, list(inf.layers), batch)
    theta = theta.clone().requires_grad_(True)
    out = fn(theta)
    torch.testing.assert_close(out, inf.task.outputs(model, batch), rtol=0, atol=0)
    (g,) = torch.autograd.grad(inf.task.loss_from_outputs(out, batch).sum(), theta)
    ref = flatten(per_example_gradients(model, inf.task, list(inf.layers), data), list(inf.layers))
    torch.testing.assert_close(g, ref[0], rtol=1e-10, atol=1e-15)


def test_training_time_collection_refuses_experts(tmp_path):
    from influscope.collect import CollectConfig, GradientCollector

    with pytest.raises(ConfigError, match=r"cannot track MoE experts or routers.*mlp\.gate"):
        GradientCollector(
            tiny_moe("mixtral"), tmp_path, CollectConfig(modules="mlp", k_in=4, k_out=4)
        )


def test_an_expert_never_routed_while_fitting_gets_finite_zero_terms():
    model = tiny_moe("mixtral")
    gate = model.model.layers[0].mlp.gate

    def never_expert_3(module, inputs, output):  # route as usual among experts 0-2
        logits = output[0]
        probs = torch.softmax(logits.float().masked_fill(torch.arange(4) == 3, -torch.inf), -1)
        top, idx = torch.topk(probs, 2, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(logits.dtype), idx

    handle = gate.register_forward_hook(never_expert_3)
    inf = Influence(model, "causal_lm", modules=r"layers\.0\.mlp\.experts\.")
    train = random_lm_data(4, seed=13)
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=2))
    assert op.damping["model.layers.0.mlp.experts.down_proj.3"] == 1.0
    assert float(op.eigenvalues["model.layers.0.mlp.experts.down_proj.3"].abs().max()) == 0.0
    config = ScoreConfig(query_rank=None, per_layer=True)
    scores = inf.score(random_lm_data(2, seed=14), train, op, config)
    handle.remove()
    assert torch.isfinite(scores.per_layer).all()  # λ = 0 would give 0 / 0 for expert 3
    idx = [i for i, n in enumerate(scores.layer_names) if n.endswith(".3")]
    assert float(scores.per_layer[..., idx].abs().max()) == 0.0
    assert float(scores.per_layer.abs().max()) > 0
