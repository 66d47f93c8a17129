"""MoE experts as a ModuleList of nn.Linear (transformers 4.x Mixtral layout), float64.

The block below is the 4.x ``MixtralSparseMoeBlock`` loop, built from a 5.x fused Mixtral block
with the same weights (``w1``/``w3`` = the gate/up halves of ``gate_up_proj[e]``, ``w2`` =
``down_proj[e]``), so the two models compute the same function.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from influscope import Influence, ScoreConfig
from influscope.curvature import IdentityOperator
from influscope.errors import DataError
from influscope.modules.passes import layer_passes
from influscope.reference import per_example_gradients
from influscope.toy import random_lm_data, tiny_moe


class ListMLP(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        i, h = down.shape[1], down.shape[0]
        self.w1, self.w3 = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)
        with torch.no_grad():
            self.w1.weight.copy_(gate_up[:i])
            self.w3.weight.copy_(gate_up[i:])
            self.w2.weight.copy_(down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ListMoeBlock(nn.Module):
    def __init__(self, fused: nn.Module, token_major: bool = False) -> None:
        super().__init__()
        e, _, h = fused.experts.gate_up_proj.shape
        self.top_k = fused.gate.top_k
        self.token_major = token_major
        self.gate = nn.Linear(h, e, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(fused.gate.weight)
        gu, down = fused.experts.gate_up_proj.detach(), fused.experts.down_proj.detach()
        self.experts = nn.ModuleList([ListMLP(gu[j], down[j]) for j in range(e)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        logits = self.gate(x)
        weights = F.softmax(logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for j, expert in enumerate(self.experts):
            slot, tok = torch.where(mask[j].t() if self.token_major else mask[j])
            if self.token_major:
                slot, tok = tok, slot
            if tok.numel() == 0:
                continue  # an expert without tokens is not called
            out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
        return out.reshape(b, t, h)


def list_model(token_major: bool = False):
    fused = tiny_moe("mixtral")
    listed = tiny_moe("mixtral")
    for layer in listed.model.layers:
        layer.mlp = ListMoeBlock(layer.mlp, token_major).double()
    return fused, listed


def test_list_experts_are_tracked_and_their_gradients_equal_autograd():
    _, model = list_model()
    inf = Influence(model, "causal_lm", modules="mlp")
    assert "model.layers.0.mlp.experts.3.w2" in inf.layer_names
    assert "model.layers.0.mlp.gate" in inf.layer_names
    data = random_lm_data(4, seed=1)
    ref = per_example_gradients(model, inf.task, list(inf.layers), data)
    got = {n: [] for n in inf.layer_names}
    for _, grads, _ in layer_passes(model, inf.task, list(inf.layers), data, batch_size=1):
        for n, lb in grads.items():
            got[n].append(lb.gradient())
    for n in inf.layer_names:
        torch.testing.assert_close(torch.cat(got[n]), ref[n], rtol=1e-10, atol=1e-15)
    assert all(ref[n].abs().sum() > 0 for n in inf.layer_names)


def test_list_expert_scores_equal_the_fused_experts():
    fused, listed = list_model()
    train, queries = random_lm_data(4, seed=2), random_lm_data(2, seed=3)
    config = ScoreConfig(query_rank=None, per_layer=True, batch_size=2)
    per = {}
    for key, model, pattern in (
        ("fused", fused, r"layers\.1\.mlp\.experts\."),
        ("list", listed, r"layers\.1\.mlp\.experts\."),
    ):
        inf = Influence(model, "causal_lm", modules=pattern)
        op = IdentityOperator({n: 0.0 for n in inf.layer_names})
        scores = inf.score(queries, train, op, config)
        per[key] = dict(zip(scores.layer_names, scores.per_layer.unbind(-1)))
    block = "model.layers.1.mlp.experts"
    # the two models agree to float64 rounding before transformers' float32 RMSNorm casts,
    # whose rounding then moves the terms by ~1e-7 of their scale
    scale = max(float(t.abs().max()) for t in per["fused"].values())
    for e in range(4):
        gate_up = per["list"][f"{block}.{e}.w1"] + per["list"][f"{block}.{e}.w3"]
        fused_gu = per["fused"][f"{block}.gate_up_proj.{e}"]
        torch.testing.assert_close(gate_up, fused_gu, rtol=1e-5, atol=1e-6 * scale)
        down = per["fused"][f"{block}.down_proj.{e}"]
        torch.testing.assert_close(
            per["list"][f"{block}.{e}.w2"], down, rtol=1e-5, atol=1e-6 * scale
        )
        assert float(fused_gu.abs().max()) > 1e-3 * scale  # each expert carries a visible share


def test_a_block_that_routes_in_another_order_is_refused():
    _, model = list_model(token_major=True)
    inf = Influence(model, "causal_lm", modules="mlp")
    op = IdentityOperator({n: 0.0 for n in inf.layer_names})
    with pytest.raises(
        DataError, match=r"Cannot tell which tokens .*experts\.\d\.w\d. saw.*routes differently"
    ):
        inf.score(random_lm_data(1), random_lm_data(2, seed=4), op, ScoreConfig(query_rank=None))


def test_list_expert_statistics_use_the_routed_tokens_like_the_fused_ones():
    fused, listed = list_model()
    data = random_lm_data(4, seed=5)
    cov = {}
    for key, model, name in (
        ("fused", fused, "model.layers.0.mlp.experts.gate_up_proj.{e}"),
        ("list", listed, "model.layers.0.mlp.experts.{e}.w1"),
    ):
        inf = Influence(model, "causal_lm", modules=r"layers\.0\.mlp\.experts\.")
        acc = {e: [] for e in range(4)}
        for _, grads, _ in layer_passes(model, inf.task, list(inf.layers), data, batch_size=4):
            for e in range(4):
                acc[e].append(grads[name.format(e=e)].masked_tokens()[0])  # routed, unpadded
        cov[key] = [torch.cat(acc[e]) for e in range(4)]
    n_tok = sum(len(ex["input_ids"]) for ex in data.examples)
    assert sum(len(a) for a in cov["list"]) == 2 * n_tok  # top-2, padding excluded
    for a_list, a_fused in zip(cov["list"], cov["fused"]):
        assert a_list.shape == a_fused.shape
        torch.testing.assert_close(a_list.t() @ a_list, a_fused.t() @ a_fused, rtol=1e-6, atol=1e-9)
