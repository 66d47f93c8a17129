"""Benchmark (a): LDS of every estimator on a tiny GPT-2 trained on Shakespeare.

Training set: ``N`` consecutive chunks of the Shakespeare texts (one per line group), a BPE
tokenizer trained on them, and a tiny GPT-2 trained with :func:`influscope.demo.train.train_lm`.
Queries: held-out chunks split into a prompt and a completion; the measurement is
``log p(completion | prompt)``. Every estimator is scored on the very same retrains
(``m`` random half-subsets, ``r`` seeds; the same seeds for every subset).

Run::

    python benchmarks/accuracy_lds.py --out runs/accuracy/lds
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import numpy as np
import torch

from influscope import CausalLMTask, FitConfig, Influence, ScoreConfig
from influscope.assets import shakespeare_texts
from influscope.demo.train import make_gpt2_config, train_lm, train_tokenizer
from influscope.evaluation import (
    LDSConfig,
    RetrainingHarness,
    bm25,
    default_workers,
    gradient_cosine,
    hidden_states,
    lds,
    representation_similarity,
)
from influscope.tasks import EncodedDataset


def chunks(n: int, words: int, seed: int) -> list[str]:
    """``n`` random chunks of ``words`` words from the Shakespeare texts."""
    text = " ".join(t for _, t in sorted(shakespeare_texts().items()))
    tokens = text.split()
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(tokens) - words, size=n, replace=False)
    return [" ".join(tokens[s : s + words]) for s in starts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-queries", type=int, default=16)
    parser.add_argument("--words", type=int, default=24)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy/lds"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()

    texts = chunks(args.n_train + args.n_queries, args.words, seed=0)
    train_texts, query_texts = texts[: args.n_train], texts[args.n_train :]
    tok = train_tokenizer(train_texts, vocab_size=512)
    config = make_gpt2_config(tok, n_layer=2, n_embd=32, n_head=2, n_positions=128)
    records = [{"text": t} for t in train_texts]
    queries_rec = []
    for t in query_texts:
        words = t.split()
        cut = len(words) // 2
        queries_rec.append(
            {"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])}
        )

    def recipe(subset, seed):
        return train_lm(
            records,
            tok,
            config,
            epochs=args.epochs,
            lr=3e-3,
            weight_decay=0.01,
            batch_size=16,
            seed=seed,
            subset=subset,
        ).model.double()

    task = CausalLMTask(add_bos=False)
    model = recipe(range(args.n_train), 0)
    train = task.encode(records, tok, 128)
    queries = task.encode(queries_rec, tok, 128)

    def measure(m):
        return task.measurement(m, task.collate(queries.examples))

    inf = Influence(model, task, modules="all", tokenizer=tok)
    repeated = EncodedDataset(train.examples * 4, indices=list(range(4 * len(train))))
    cfg = ScoreConfig(query_rank=None, batch_size=32)
    scores = {}
    for c in ("identity", "diagonal", "kfac", "ekfac"):
        op = inf.fit(repeated, FitConfig(curvature=c, batch_size=32))
        scores[c] = inf.score(queries, train, op, cfg).pairwise
    scores["gradient_cosine"] = gradient_cosine(inf, queries, train, 32).pairwise
    hq = hidden_states(model, queries, task)
    ht = hidden_states(model, train, task)
    scores["representation_cosine"] = representation_similarity(hq, ht, train).pairwise
    scores["bm25"] = bm25([q["prompt"] + q["completion"] for q in queries_rec], train_texts)
    fit_s = time.time() - start

    harness = RetrainingHarness(
        recipe,
        measure,
        args.n_train,
        args.out / "retrains",
        workers=args.workers,
        tag=f"shakespeare-n{args.n_train}-q{args.n_queries}-w{args.words}-e{args.epochs}",
    )
    result = lds(harness, scores, LDSConfig(n_subsets=args.subsets, n_seeds=args.seeds))
    rng = np.random.default_rng(0)
    result.add("shuffled_ekfac", scores["ekfac"][:, rng.permutation(args.n_train)])
    table = result.table()
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "fit_and_score_seconds": fit_s,
        "seconds": time.time() - start,
        "table": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    for name, row in table.items():
        print(f"{name:22s} LDS {row['mean']:.3f} ± {row['sem']:.3f} (n={row['n']})")
    print(f"total {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
