"""A query phrased as a chat turn finds the training conversation that taught its answer.

A tiny GPT-2 with a tokenizer carrying a small chat template is trained briefly on
conversations (assistant-only loss): each fact conversation plants one capital in the
assistant's reply, small-talk conversations add distractors. Asked as a chat turn (a
message-list prompt, TRL's conversational prompt-completion), every fact's query has its
conversation as the top proponent, for two training seeds (a third, 2, passes too). (The contrastive form "this capital
rather than that one" is not asserted here: after 150 steps the model has not yet learned which
city goes with which country, f ≈ 0, and its top proponents are not stable across seeds.)
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import train_lm
from influscope import FitConfig, Influence, ScoreConfig
from influscope.toy import tiny_gpt2_config
from influscope.training import train_tokenizer

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
FACTS = [
    ("Velmora", "Tarsk"),
    ("Quellin", "Ostrava"),
    ("Ardent", "Nimble"),
    ("Dunmere", "Lantern"),
    ("Sorvik", "Brindle"),
    ("Kestra", "Maldon"),
]
STEPS, LR = 150, 3e-3
GREETINGS = ["Hello!", "Hi there.", "Good day.", "Hey.", "Greetings.", "Morning!"]


def question(country: str) -> dict:
    return {"role": "user", "content": f"What is the capital of {country}?"}


@pytest.mark.parametrize("seed", [0, 1])
def test_chat_query_finds_its_training_conversation(seed):
    facts = [
        {"messages": [question(c), {"role": "assistant", "content": f"The capital of {c} is {y}."}]}
        for c, y in FACTS
    ]
    small_talk = [
        {"messages": [{"role": "user", "content": g}, {"role": "assistant", "content": "Hi."}]}
        for g in GREETINGS
    ]
    train_records = facts + small_talk
    texts = [m["content"] for r in train_records for m in r["messages"]]
    tok = train_tokenizer(texts * 4, vocab_size=400, min_frequency=1)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    torch.manual_seed(seed)
    cfg = tiny_gpt2_config(
        n_embd=32, n_layer=2, vocab_size=len(tok), n_positions=96, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(cfg).eval()
    inf = Influence(model, "causal_lm", modules="mlp", tokenizer=tok, device="cpu")
    train = inf.encode(train_records)
    # the loss covers the assistant turns only
    first = train.examples[0]
    assert tok.decode(first["labels"][first["labels"] != -100]) == (
        "The capital of Velmora is Tarsk.<|end|>"
    )
    train_lm(inf.model, train, steps=STEPS, lr=LR, batch_size=6, seed=seed)
    factors = inf.fit(train, FitConfig(curvature="ekfac"))
    queries = [
        {
            "prompt": [question(c)],
            "completion": f"The capital of {c} is {y}.",
        }
        for c, y in FACTS
    ]
    cfg = ScoreConfig(query_rank=None)
    scores = inf.score(inf.encode(queries), train, factors, cfg)
    assert scores.pairwise.argmax(dim=1).tolist() == list(range(len(FACTS)))
