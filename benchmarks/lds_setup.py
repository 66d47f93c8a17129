"""Shared set-up of benchmark (a): a tiny GPT-2 trained on Shakespeare chunks, its queries and
its retraining harness. Used by ``accuracy_lds.py`` (LDS table) and ``accuracy_brittleness.py``
(top-k removal), which therefore share the very same model, queries and stored retrains.

Training set: ``N`` random chunks of ``words`` words of the Shakespeare texts, a 512-token
byte-level BPE trained on them, and a GPT-2 (2 layers, width 32, 2 heads) trained with
:func:`influscope.training.train_lm`. Queries: held-out chunks split into a prompt (first half
of the words) and a completion; the measurement is ``f = log p(completion | prompt)``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import numpy as np
import torch

from influscope import CausalLMTask, FitConfig, Influence, ScoreConfig
from influscope.assets import shakespeare_texts
from influscope.demo.train import TrainResult, make_gpt2_config, train_lm, train_tokenizer
from influscope.evaluation import RetrainingHarness, default_workers
from influscope.tasks import EncodedDataset

LR, WEIGHT_DECAY, BATCH = 3e-3, 0.01, 16
FISHER_SAMPLES = 4  # true-Fisher label samples per training sequence when fitting curvature


def chunks(n: int, words: int, seed: int) -> list[str]:
    """``n`` random chunks of ``words`` words from the Shakespeare texts."""
    text = " ".join(t for _, t in sorted(shakespeare_texts().items()))
    tokens = text.split()
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(tokens) - words, size=n, replace=False)
    return [" ".join(tokens[s : s + words]) for s in starts]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The set-up's command-line options (shared by both scripts; they must agree)."""
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-queries", type=int, default=16)
    parser.add_argument("--words", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=min(2, default_workers()))
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy/lds"))


@dataclass
class Setup:
    """Everything benchmark (a) needs; ``model`` is the full-data, seed-0 model (float64)."""

    args: argparse.Namespace
    records: list[dict[str, str]]
    train_texts: list[str]
    queries_rec: list[dict[str, str]]
    tokenizer: Any
    config: Any
    task: CausalLMTask
    train: EncodedDataset
    queries: EncodedDataset
    model: torch.nn.Module
    full_run: TrainResult
    harness: RetrainingHarness

    def train_model(self, subset, seed: int, checkpoint_every: int | None = None) -> TrainResult:
        """:func:`train_lm` with the benchmark's hyper-parameters."""
        return train_lm(
            self.records,
            self.tokenizer,
            self.config,
            epochs=self.args.epochs,
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            batch_size=BATCH,
            seed=seed,
            subset=subset,
            checkpoint_every=checkpoint_every,
        )

    def measure(self, model: torch.nn.Module) -> torch.Tensor:
        """``(Q,)`` ``log p(completion | prompt)`` of every query."""
        return self.task.measurement(model, self.task.collate(self.queries.examples))

    def influence(self, model: torch.nn.Module | None = None) -> Influence:
        """An :class:`~influscope.Influence` on all linear layers of the blocks."""
        return Influence(model or self.model, self.task, modules="all", tokenizer=self.tokenizer)

    def fit_data(self) -> EncodedDataset:
        """The training set repeated ``FISHER_SAMPLES`` times (one label sample per copy)."""
        n = len(self.train)
        return EncodedDataset(
            self.train.examples * FISHER_SAMPLES, indices=list(range(FISHER_SAMPLES * n))
        )

    def scores(self, curvature: str) -> torch.Tensor:
        """``(Q, N)`` influscope scores of the full-data model with ``curvature``."""
        inf = self.influence()
        op = inf.fit(self.fit_data(), FitConfig(curvature=curvature, batch_size=32))
        return inf.score(self.queries, self.train, op, ScoreConfig(query_rank=None, batch_size=32))


def build(args: argparse.Namespace, checkpoint_every: int | None = None) -> Setup:
    """Data, tokenizer, the full-data model (with checkpoints if asked) and the harness."""
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
    task = CausalLMTask(add_bos=False)
    setup = Setup(
        args=args,
        records=records,
        train_texts=train_texts,
        queries_rec=queries_rec,
        tokenizer=tok,
        config=config,
        task=task,
        train=task.encode(records, tok, 128),
        queries=task.encode(queries_rec, tok, 128),
        model=None,  # type: ignore[arg-type]  # set below
        full_run=None,  # type: ignore[arg-type]
        harness=None,  # type: ignore[arg-type]
    )
    setup.full_run = setup.train_model(range(args.n_train), 0, checkpoint_every)
    setup.model = setup.full_run.model.double()

    def recipe(subset, seed):
        return setup.train_model(subset, seed).model.double()

    setup.harness = RetrainingHarness(
        recipe,
        setup.measure,
        args.n_train,
        args.out / "retrains",
        workers=args.workers,
        tag=f"shakespeare-n{args.n_train}-q{args.n_queries}-w{args.words}-e{args.epochs}",
    )
    return setup
