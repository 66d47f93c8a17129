"""(b) The model and data: a Llama from a config with random weights, random tokens."""

from __future__ import annotations

import torch

from benchmarks.gpu.common import (
    Sizes,
)


def llama_parameter_count(s: Sizes) -> int:
    """Parameters of an untied Llama with these sizes (embedding + blocks + norm + head)."""
    head_dim = s.hidden // s.heads
    attn = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * head_dim
    mlp = 3 * s.hidden * s.intermediate
    block = attn + mlp + 2 * s.hidden
    return s.vocab * s.hidden * 2 + s.layers * block + s.hidden


def build_llama(s: Sizes, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` from a config with random weights, built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        vocab_size=s.vocab,
        max_position_embeddings=max(2048, s.seq_len),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(device=device, dtype=dtype).eval()


def random_tokens(s: Sizes, n: int, seed: int, prompt_len: int = 0):
    """``n`` random sequences of ``seq_len`` tokens (the first ``prompt_len`` unlabelled)."""
    from influscope.tasks import EncodedDataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, s.vocab, (n, s.seq_len), generator=g)
    examples = []
    for row in ids:
        labels = row.clone()
        labels[:prompt_len] = -100
        examples.append(
            {
                "input_ids": row,
                "attention_mask": torch.ones(s.seq_len, dtype=torch.long),
                "labels": labels,
            }
        )
    return EncodedDataset(examples)
