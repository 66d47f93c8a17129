"""Shared fixtures: tiny models built from configs (no downloads) and synthetic data."""

from __future__ import annotations

import json
import os

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import pytest
import torch
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from influscope.tasks import CausalLMTask, EncodedDataset
from influscope.toy import random_lm_data, tiny_gpt2
from influscope.toy import tiny_gpt2_config as _gpt2_config


def train_lm(
    model,
    data: EncodedDataset,
    steps: int = 200,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    batch_size: int = 8,
    seed: int = 0,
):
    """A short AdamW run (weight decay) so the model sits near a minimum."""
    task = CausalLMTask()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(data))[:batch_size].tolist()
        batch = task.collate([data.examples[i] for i in idx])
        loss = task.training_loss(model, batch, None).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def lm_data():
    return random_lm_data(12)


def save_tiny_model(directory, texts, n_layer: int = 1):
    """Train a tokenizer on ``texts``, save it with a random tiny GPT-2 in ``directory``."""
    from influscope.demo.train import make_gpt2_config, train_tokenizer

    tok = train_tokenizer(list(texts) * 4, vocab_size=300, min_frequency=1)
    cfg = make_gpt2_config(tok, n_layer=n_layer, n_embd=16, n_head=2, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def saved_lm_corpus(directory):
    """``(model_dir, train.jsonl)``: ten short texts and a tiny GPT-2 saved for CLI tests."""
    texts = [f"line {i} of the little corpus about cats and dogs number {i}" for i in range(10)]
    model_dir = save_tiny_model(directory / "model", texts)
    train = directory / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return model_dir, train


@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory):
    """A directory for the CLI tests, one per test module, built from the module's ``TEXTS``.

    Holds ``model/`` (:func:`save_tiny_model`: a tokenizer trained on ``TEXTS`` and a random
    one-layer GPT-2), ``train.jsonl`` (one ``{"text": ...}`` record per entry of ``TEXTS``) and
    ``queries.jsonl`` (the query "The capital of Velmora is" → " Tarsk.").
    """
    texts = request.module.TEXTS
    d = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    save_tiny_model(d / "model", texts, n_layer=1)
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (d / "queries.jsonl").write_text(
        json.dumps({"prompt": "The capital of Velmora is", "completion": " Tarsk."}) + "\n"
    )
    return d


def tiny_reward_model():
    """A float64 one-layer GPT-2 with a scalar head (``num_labels=1``), seeded, dropout off."""
    torch.manual_seed(0)
    cfg = _gpt2_config(
        n_embd=16, n_layer=1, vocab_size=40, n_positions=32, num_labels=1, pad_token_id=0
    )
    return GPT2ForSequenceClassification(cfg).double().eval()


#: LoRA target modules of GPT-2 (Conv1D) and Llama (nn.Linear) in the LoRA tests.
TARGETS = ["c_attn", "c_fc", "c_proj"]
LLAMA_TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def lora(model, seed: int = 1, r: int = 4):
    """Wrap ``model`` with LoRA adapters whose ``A`` and ``B`` are both random (not ``B = 0``)."""
    import peft

    torch.manual_seed(seed)
    llama = "Llama" in type(model).__name__
    config = peft.LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=LLAMA_TARGETS if llama else TARGETS,
        fan_in_fan_out=not llama,  # GPT-2's Conv1D stores its weight as (in, out)
        init_lora_weights=False,
    )
    return peft.get_peft_model(model, config).eval()


def hooked(model, task, layers, data, objective="loss", sample_seed=None, batch_size=4):
    """Per-example gradients ``{layer: (N, out, in)}`` from the capture hooks (layer_passes)."""
    from influscope.modules.passes import layer_passes

    out = {layer.name: [] for layer in layers}
    for _, grads, _ in layer_passes(
        model,
        task,
        layers,
        data,
        batch_size=batch_size,
        objective=objective,
        sample_seed=sample_seed,
    ):
        for name, lb in grads.items():
            out[name].append(lb.gradient())
    return {k: torch.cat(v) for k, v in out.items()}


def tiny_llama(seed: int = 0, intermediate: int = 32):
    """A float64 two-block Llama (nn.Linear projections, SwiGLU MLP: gate/up/down, eager
    attention) from a config, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).double().eval()
