"""Tokenizer and tiny GPT-2 for the demo, trained on CPU in about a minute.

The demo trains with :mod:`influscope.training`'s pieces (re-exported here: the BPE
tokenizer :func:`train_tokenizer`, :func:`make_gpt2_config`, :func:`train_lm` on the summed-token
objective, :func:`evaluate_queries`), and adds

* :func:`train_demo_model` — all of them on the demo corpus, saved with ``save_pretrained`` so that
  ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` reload them.

Command line (after ``make assets``)::

    python -m influscope.demo.train --assets .cache/assets --out runs/demo/model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from influscope.errors import ConfigError
from influscope.training import (
    EOT,
    Checkpoint,
    QueryEval,
    TrainResult,
    evaluate_queries,
    fixed_threads,
    make_gpt2_config,
    sequence_losses,
    train_lm,
    train_tokenizer,
)

__all__ = [
    "EOT",
    "Checkpoint",
    "DemoTrainConfig",
    "QueryEval",
    "TrainResult",
    "evaluate_queries",
    "fixed_threads",
    "make_gpt2_config",
    "sequence_losses",
    "train_demo_model",
    "train_lm",
    "train_tokenizer",
]


def _grouped_summary(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, queries: Sequence[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """:meth:`QueryEval.summary` of each ``"lang/order/style"`` group of queries."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for query in queries:
        key = "/".join(str(query.get(k)) for k in ("lang", "order", "style"))
        groups.setdefault(key, []).append(query)
    return {
        key: evaluate_queries(model, tokenizer, members).summary()
        for key, members in sorted(groups.items())
    }


@dataclass(frozen=True)
class DemoTrainConfig:
    """Settings of :func:`train_demo_model`.

    Measured on the 40-fact / 300-chunk demo corpus (seeds 0 and 1, one torch thread): about
    50 s of CPU time (735 AdamW steps), the answer of 78–90 % of the ``"context"`` queries is the
    top-1 next token (mean log-probability of its first token −0.6 to −1.0), against 13–18 % for
    ``"paraphrase"`` queries. More ``fact_repeats`` fit the facts' own sequences closer to zero
    loss, which shrinks their training gradients and with them their influence scores; 4 was the
    best trade-off measured.

    Attributes:
        vocab_size: Upper bound of the BPE vocabulary.
        n_layer: Transformer blocks.
        n_embd: Width of the residual stream.
        n_head: Attention heads.
        n_positions: Context length; longer records are truncated.
        epochs: Passes over the corpus.
        lr: Peak AdamW learning rate (warm-up, then cosine decay to 0.1 × lr).
        weight_decay: AdamW weight decay of the weight matrices.
        batch_size: Sequences per step.
        fact_repeats: Visits of each planted-fact record per epoch. A fact record has ~12
            tokens against ~70 for a Shakespeare chunk, so repeating them is cheap; it makes
            the objective weight them ``fact_repeats`` times (the records themselves stay unique).
        seed: Seed of the initialisation and the batch order.
        time_budget_s: Optional wall-clock limit of training.
        threads: torch CPU threads while training (:func:`fixed_threads`). The trained weights
            depend on the thread count (reductions are split over threads), so the default 1
            makes the model identical on every machine with the same package versions; ``None``
            uses torch's default (all cores: faster on a big machine, not reproducible across
            machines).
    """

    vocab_size: int = 4096
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 128
    epochs: int = 15
    lr: float = 1e-2
    weight_decay: float = 0.01
    batch_size: int = 16
    fact_repeats: int = 4
    seed: int = 0
    time_budget_s: float | None = None
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})."
            )
        sizes = (self.n_layer, self.n_positions, self.epochs, self.batch_size, self.fact_repeats)
        if min(sizes) < 1 or self.lr <= 0:
            raise ConfigError(f"Sizes, epochs, batch_size and lr must be positive: {self}.")


def train_demo_model(
    corpus: Any,
    out_dir: str | os.PathLike[str] | None = None,
    settings: DemoTrainConfig | None = None,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, dict[str, Any]]:
    """Train the demo tokenizer and model on a :class:`~influscope.demo.corpus.DemoCorpus`.

    Args:
        corpus: The corpus (``records`` are trained on, ``queries`` evaluated).
        out_dir: If given, the model and tokenizer are saved there with ``save_pretrained``,
            together with ``corpus.json`` and ``training.json`` (settings, timings, metrics).
        settings: Training settings.

    Returns:
        ``(model, tokenizer, report)``; ``report`` holds the settings, training seconds, loss
        history and :meth:`QueryEval.summary` of the corpus queries.
    """
    settings = settings or DemoTrainConfig()
    with fixed_threads(settings.threads):
        return _train_demo_model(corpus, out_dir, settings)


def _train_demo_model(
    corpus: Any, out_dir: str | os.PathLike[str] | None, settings: DemoTrainConfig
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, dict[str, Any]]:
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    tokenizer = train_tokenizer(corpus.texts, settings.vocab_size)
    tokenizer.model_max_length = settings.n_positions
    config = make_gpt2_config(
        tokenizer,
        n_layer=settings.n_layer,
        n_embd=settings.n_embd,
        n_head=settings.n_head,
        n_positions=settings.n_positions,
    )
    # Planted-fact records are visited `fact_repeats` times per epoch (repeated subset indices).
    subset = [
        i
        for i, record in enumerate(corpus.records)
        for _ in range(settings.fact_repeats if record.get("fact_id") else 1)
    ]
    result = train_lm(
        corpus.records,
        tokenizer,
        config,
        epochs=settings.epochs,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        batch_size=settings.batch_size,
        seed=settings.seed,
        subset=subset,
        time_budget_s=settings.time_budget_s,
    )
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "n_records": len(corpus.records),
        "vocab_size": len(tokenizer),
        "n_parameters": sum(p.numel() for p in result.model.parameters()),
        "seconds": time.perf_counter() - start,
        "train_seconds": result.seconds,
        "train_cpu_seconds": result.cpu_seconds,
        "torch_threads": torch.get_num_threads(),
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "epoch_losses": result.epoch_losses,
        "queries": evaluate_queries(result.model, tokenizer, corpus.queries).summary(),
        "queries_by_group": _grouped_summary(result.model, tokenizer, corpus.queries),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        corpus.save(out / "corpus.json")
        (out / "training.json").write_text(json.dumps(report, indent=1))
    return result.model, tokenizer, report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m influscope.demo.train``."""
    from influscope.demo.corpus import build_demo_corpus

    parser = argparse.ArgumentParser(
        prog="python -m influscope.demo.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--assets", type=Path, default=None, help="asset cache directory")
    parser.add_argument("--out", type=Path, default=None, help="where to save model and tokenizer")
    parser.add_argument("--n-facts", type=int, default=40)
    parser.add_argument("--n-chunks", type=int, default=300)
    parser.add_argument("--langs", nargs="+", default=["en"])
    parser.add_argument("--query-styles", nargs="+", default=["context"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads while training (0: torch default)"
    )
    defaults = DemoTrainConfig()
    names = (
        "epochs",
        "lr",
        "weight_decay",
        "batch_size",
        "fact_repeats",
        "seed",
        "n_layer",
        "n_embd",
    )
    for name in names:
        kind = type(getattr(defaults, name))
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name)
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = build_demo_corpus(
        args.assets,
        args.n_facts,
        args.n_chunks,
        seed=args.seed,
        langs=args.langs,
        query_styles=args.query_styles,
    )
    settings = DemoTrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        fact_repeats=args.fact_repeats,
        seed=args.seed,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        threads=args.threads or None,
    )
    _, _, report = train_demo_model(corpus, args.out, settings)
    print(json.dumps({k: v for k, v in report.items() if k != "epoch_losses"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
