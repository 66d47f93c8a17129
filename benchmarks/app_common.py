"""Shared pieces of the application benchmarks (``unlearn.py``, ``curation.py``).

* held-out Shakespeare windows (none of them in the training corpus) and their per-token loss;
* query metrics on planted facts (mean ``log p(completion | prompt)``, first-token top-1);
* training a demo-style GPT-2 on a subset of a corpus, cached as a Hugging Face directory.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from influscope.assets import shakespeare_texts
from influscope.demo.corpus import shakespeare_chunks
from influscope.demo.train import (
    DemoTrainConfig,
    evaluate_queries,
    make_gpt2_config,
    sequence_losses,
    train_lm,
)


def heldout_texts(assets: str | None, train_texts: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` Shakespeare windows of 48 words that are not training texts."""
    seen = set(train_texts)
    pool = shakespeare_chunks(shakespeare_texts(assets), len(seen) + 4 * n, 48, seed + 7919)
    return [c["text"] for c in pool if c["text"] not in seen][:n]


@torch.no_grad()
def token_nll(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, texts: list[str]
) -> float:
    """Mean next-token cross-entropy over all tokens of ``texts`` (exp of it = perplexity)."""
    model.eval()
    total, count = 0.0, 0
    for first in range(0, len(texts), 16):
        seqs = [
            tokenizer(t)["input_ids"][: model.config.n_positions] for t in texts[first : first + 16]
        ]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            labels[row, : len(s)] = torch.tensor(s)
        total += float(sequence_losses(model, ids, labels).sum())
        count += sum(len(s) - 1 for s in seqs)
    return total / count


def query_metrics(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, queries: list[dict[str, Any]]
) -> dict[str, float]:
    """Mean log-probability of the completions and first-token top-1 accuracy."""
    ev = evaluate_queries(model, tokenizer, queries)
    n = max(1, len(queries))
    return {"logprob": sum(ev.logprob) / n, "top1": sum(ev.first_top1) / n}


def visits(records: Sequence[dict[str, Any]], fact_repeats: int) -> list[int]:
    """Training subset with every planted-fact record repeated ``fact_repeats`` times."""
    return [
        i for i, r in enumerate(records) for _ in range(fact_repeats if r.get("fact_id") else 1)
    ]


def train_cached(
    directory: Path,
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerFast,
    settings: DemoTrainConfig,
    subset: Sequence[int],
    seed: int,
) -> tuple[GPT2LMHeadModel, float]:
    """Train (or load from ``directory``) a GPT-2 on ``records[subset]``; ``(model, seconds)``.

    The recipe is :func:`influscope.training.train_lm` with the demo settings; the result is
    saved with ``save_pretrained`` (plus ``train.json`` with the seconds it took).
    """
    marker = directory / "train.json"
    if marker.exists():
        model = GPT2LMHeadModel.from_pretrained(directory).eval()
        return model, json.loads(marker.read_text())["seconds"]
    config = make_gpt2_config(
        tokenizer,
        n_layer=settings.n_layer,
        n_embd=settings.n_embd,
        n_head=settings.n_head,
        n_positions=settings.n_positions,
    )
    start = time.perf_counter()
    result = train_lm(
        records,
        tokenizer,
        config,
        epochs=settings.epochs,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        batch_size=settings.batch_size,
        seed=seed,
        subset=list(subset),
    )
    seconds = time.perf_counter() - start
    directory.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(directory)
    marker.write_text(json.dumps({"seconds": seconds, "n_subset": len(subset), "seed": seed}))
    return result.model, seconds


def fmt(x: float, digits: int = 2) -> str:
    """A table cell: fixed digits, ``nan`` as a dash."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
