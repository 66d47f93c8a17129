"""Per-attention-head terms: they sum to the layer terms and match hand-sliced references (float64)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from influscope import FitConfig, Influence, ScoreConfig
from influscope.curvature import IdentityOperator
from influscope.errors import ConfigError
from influscope.modules.heads import head_splits
from influscope.reference import per_example_gradients
from influscope.toy import random_lm_data, tiny_gpt2


def tiny_llama(bias: bool = True) -> LlamaForCausalLM:
    """4 query heads sharing 2 KV heads (grouped-query attention), head_dim 4."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attention_bias=bias,
    )
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).double().eval()


def per_layer_from_heads(scores) -> torch.Tensor:
    """Sum ``per_head`` over each layer's heads: ``(Q, N, L)``."""
    layer_of = [name.rsplit(":", 1)[0] for name in scores.head_names]
    return torch.stack(
        [
            scores.per_head[..., [i for i, n in enumerate(layer_of) if n == layer]].sum(-1)
            for layer in scores.layer_names
        ],
        dim=-1,
    )


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_heads_sum_exactly_to_the_layer(arch, rank):
    model = tiny_gpt2() if arch == "gpt2" else tiny_llama()
    inf = Influence(model, "causal_lm", modules="attn")
    train, queries = random_lm_data(6, seed=1), random_lm_data(2, seed=2)
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=3))
    config = ScoreConfig(query_rank=rank, per_layer=True, per_head=True, batch_size=4)
    scores = inf.score(queries, train, op, config)
    assert scores.per_head.shape == (2, 6, len(scores.head_names))
    n_layers = 4 if arch == "llama" else 2
    assert len(scores.layer_names) == 2 * n_layers
    torch.testing.assert_close(
        per_layer_from_heads(scores), scores.per_layer, rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(scores.per_head.sum(-1), scores.pairwise, rtol=1e-10, atol=1e-14)
    assert scores.per_head.abs().amax(dim=(0, 1)).min() > 0  # every head carries something


def test_head_blocks_match_hand_sliced_gradients():
    """Identity curvature: head h's term is -∇f[block_h] · ∇L[block_h] with blocks sliced by hand."""
    model = tiny_llama()
    inf = Influence(model, "causal_lm", modules="attn")
    train, queries = random_lm_data(4, seed=3), random_lm_data(2, seed=4)
    op = IdentityOperator({n: 0.0 for n in inf.layer_names})
    # batch size 1: padded Llama batches differ from single examples at ~1e-9 relative
    config = ScoreConfig(query_rank=None, per_head=True, batch_size=1)
    scores = inf.score(queries, train, op, config)
    layers = list(inf.layers)
    q = per_example_gradients(model, inf.task, layers, queries, "measurement")
    t = per_example_gradients(model, inf.task, layers, train, "loss")
    d = 4
    expected = []
    for layer in layers:
        kind = layer.name.rsplit(".", 1)[1]
        n = 2 if kind in ("k_proj", "v_proj") else 4
        for h in range(n):
            if kind == "o_proj":
                blk = (slice(None), slice(h * d, (h + 1) * d))  # input columns of head h
            else:
                blk = (slice(h * d, (h + 1) * d), slice(None))  # output rows (+ bias) of head h
            expected.append(
                -torch.einsum(
                    "qoi,noi->qn",
                    q[layer.name][:, blk[0], blk[1]],
                    t[layer.name][:, blk[0], blk[1]],
                )
            )
        if kind == "o_proj":  # the bias column belongs to no head
            expected.append(
                -torch.einsum("qo,no->qn", q[layer.name][:, :, -1], t[layer.name][:, :, -1])
            )
    torch.testing.assert_close(scores.per_head, torch.stack(expected, -1), rtol=1e-10, atol=1e-14)
    assert scores.head_names[:5] == [f"model.layers.0.self_attn.q_proj:h{h}" for h in range(4)] + [
        "model.layers.0.self_attn.k_proj:kv0"
    ]
    assert scores.head_names[12] == "model.layers.0.self_attn.o_proj:bias"


def test_gpt2_fused_c_attn_is_split_into_q_k_v_heads():
    model = tiny_gpt2()  # n_embd 16, 2 heads of 8
    inf = Influence(model, "causal_lm", modules="attn")
    c_attn, c_proj = head_splits(model, inf.layers)[:2]
    assert c_attn.labels == ("q.h0", "q.h1", "k.h0", "k.h1", "v.h0", "v.h1")
    assert c_attn.axis == "out" and c_attn.index.tolist() == [i // 8 for i in range(48)]
    assert c_proj.labels == ("h0", "h1", "bias") and c_proj.axis == "in"
    assert c_proj.index.tolist() == [0] * 8 + [1] * 8 + [2]


def test_per_head_on_an_mlp_layer_is_refused_before_any_pass(monkeypatch):
    model = tiny_gpt2()
    inf = Influence(model, "causal_lm", modules="mlp")
    train = random_lm_data(4)

    def no_work(*args, **kwargs):
        raise AssertionError("a pass ran before the configuration was checked")

    monkeypatch.setattr(Influence, "precondition", no_work)
    op = IdentityOperator({n: 0.0 for n in inf.layer_names})
    with pytest.raises(
        ConfigError,
        match=r"not attention projections: transformer\.h\.0\.mlp\.c_fc.*modules='attn'",
    ):
        inf.score(random_lm_data(1), train, op, ScoreConfig(per_head=True))


def test_per_head_scores_are_stored_and_reloaded(tmp_path):
    model = tiny_gpt2()
    inf = Influence(model, "causal_lm", modules="attn", run_dir=tmp_path)
    train, queries = random_lm_data(4), random_lm_data(1, seed=5)
    op = IdentityOperator({n: 0.0 for n in inf.layer_names})
    config = ScoreConfig(query_rank=None, per_head=True)
    first = inf.score(queries, train, op, config, name="s")
    again = inf.score(queries, train, op, config, name="s")  # loaded from the stage
    assert again.head_names == first.head_names
    torch.testing.assert_close(again.per_head, first.per_head)


def test_head_study_names_the_heads_that_carry_each_query():
    from influscope.analysis import head_study

    model = tiny_gpt2()
    inf = Influence(model, "causal_lm", modules="attn")
    train, queries = random_lm_data(6, seed=8), random_lm_data(2, seed=9)
    op = IdentityOperator({n: 0.0 for n in inf.layer_names})
    scores = inf.score(queries, train, op, ScoreConfig(query_rank=None, per_head=True))
    result = head_study(scores, ["a", "b"], top_k=3)
    abs_share = torch.tensor(result.abs_share, dtype=torch.float64)
    torch.testing.assert_close(abs_share.sum(-1), torch.ones(2, dtype=torch.float64))
    mass = scores.per_head.abs().sum(1)  # (Q, H)
    assert result.leaders(0)[0][0] == scores.head_names[int(mass[0].argmax())]
    top = torch.tensor(result.top_share, dtype=torch.float64)
    torch.testing.assert_close(top.sum(-1), torch.ones(2, dtype=torch.float64))
    html = result.to_section().html
    assert "Heads: which attention heads carry the influence" in result.to_section().title
    assert "transformer.h.0.attn.c_attn:q.h0" in html
    assert result.to_dict()["queries"][1]["query"] == "b"
