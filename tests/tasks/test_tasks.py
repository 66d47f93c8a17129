"""Built-in tasks on real architectures: BERT classification and a GPT-2 reward model."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
)

from conftest import hooked, tiny_reward_model
from influscope import FitConfig, Influence, ScoreConfig
from influscope.modules import select_layers
from influscope.reference import per_example_gradients
from influscope.tasks import ClassificationTask, EncodedDataset, RewardTask


def tiny_bert(num_labels: int = 3):
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    return BertForSequenceClassification(cfg).double().eval()


def cls_data(n: int, seed: int = 0) -> EncodedDataset:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(4, 10, (1,), generator=g))
        out.append(
            {
                "input_ids": torch.randint(1, 40, (t,), generator=g),
                "attention_mask": torch.ones(t, dtype=torch.long),
                "labels": torch.randint(0, 3, (), generator=g),
            }
        )
    return EncodedDataset(out)


def pair_data(n: int, seed: int = 0) -> EncodedDataset:
    g = torch.Generator().manual_seed(seed)
    return EncodedDataset(
        [
            {
                "chosen_ids": torch.randint(
                    1, 40, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g
                ),
                "rejected_ids": torch.randint(
                    1, 40, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g
                ),
            }
            for _ in range(n)
        ]
    )


def test_bert_mlp_preset_and_gradients():
    model = tiny_bert()
    layers = select_layers(model, "mlp")
    names = [layer.name for layer in layers]
    assert "bert.encoder.layer.0.intermediate.dense" in names
    assert "bert.encoder.layer.0.output.dense" in names
    assert not any("attention" in n for n in names)
    task, data = ClassificationTask(), cls_data(6)
    for objective, seed in (("loss", None), ("loss", 2), ("measurement", None)):
        fast = hooked(model, task, layers, data, objective, seed, batch_size=4)
        ref = per_example_gradients(model, task, layers, data, objective, seed)
        for n in names:
            assert (fast[n] - ref[n]).norm() / ref[n].norm() < 1e-6


def test_reward_pairs_gradients_cover_both_responses():
    model = tiny_reward_model()
    task, data = RewardTask(pad_token_id=0), pair_data(5)
    layers = select_layers(model, "mlp")
    for objective, seed in (("loss", None), ("loss", 1), ("measurement", None)):
        fast = hooked(model, task, layers, data, objective, seed, batch_size=3)
        ref = per_example_gradients(model, task, layers, data, objective, seed)
        for layer in layers:
            err = (fast[layer.name] - ref[layer.name]).norm() / ref[layer.name].norm()
            assert err < 1e-6, (objective, err)


@pytest.mark.parametrize("curvature", ["identity", "diagonal", "kfac", "ekfac"])
def test_classification_scores_finite_and_self_positive(curvature):
    model = tiny_bert()
    inf = Influence(model, "classification", modules="mlp")
    data = cls_data(8)
    op = inf.fit(data, FitConfig(curvature=curvature))
    s = inf.score(data, data, op, ScoreConfig(), self_influence=True)
    assert torch.isfinite(s.pairwise).all()
    assert (s.self_influence > 0).all()
