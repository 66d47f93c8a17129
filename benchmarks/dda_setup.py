"""A small-scale version of the DDA paper's hallucination-tracing evaluation (arXiv 2410.01285).

The set-up, on the demo's planted facts (:mod:`influscope.demo.facts`) about invented entities:

1. **Base model** θ_0: a tiny GPT-2 pre-trained on Shakespeare chunks plus the *true* version of
   every fact (``k`` sentences each) — the knowledge the base model brings to fine-tuning.
2. **Fine-tuning set** (the candidates): for the first ``n_false`` facts a *false* version — the
   same entity and relation with the answer of another fact of the same relation (a real but
   wrong attribute) — ``n_true_distractors`` of the true sentences about each falsified entity,
   restatements of every other fact's true version, and ``n_replay_chunks`` Shakespeare chunks
   not used in pre-training. Fine-tuning starts from θ_0 and keeps one
   checkpoint per epoch; the last is θ_ft.
3. **Queries**: for each false fact, the held-out-lead-in prompt of the fact with the false
   answer as completion, kept only if θ_ft repeats the false fact (``log p(false answer) >
   log p(true answer)``).
4. **Ground truth**: the ``k`` fine-tuning sequences that state that false fact. Every method
   ranks all fine-tuning sequences; the metric is the ROC AUC of the ground truth, averaged over
   queries. The Shakespeare pre-training chunks are **not** candidates (as in the paper, which
   attributes to the fine-tuning data); the answer donor's true sentences, which contain the false
   answer word, are, and so are the true sentences about the query's entity (lexical distractors
   whose influence on the false answer should be negative).

Methods: plain EK-FAC influence on θ_ft, debias, denoise, DDA, RelatIF, BM25, gradient cosine,
representation similarity, and a shuffled-score control.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from influscope.analyzer import Influence
from influscope.assets import shakespeare_texts
from influscope.config import FitConfig, ScoreConfig
from influscope.corrections.dda import dda
from influscope.corrections.run import run_corrections
from influscope.demo.corpus import shakespeare_chunks
from influscope.demo.facts import PlantedFact, make_facts, make_queries, make_training_records
from influscope.demo.train import evaluate_queries, make_gpt2_config, train_lm, train_tokenizer
from influscope.errors import ConfigError
from influscope.evaluation.baselines import (
    bm25,
    gradient_cosine,
    hidden_states,
    representation_similarity,
)
from influscope.metrics import roc_auc

#: Rows of the result table, in order.
METHODS: tuple[str, ...] = (
    "plain",
    "debias",
    "denoise",
    "dda",
    "dda_standardized",
    "relatif",
    "bm25",
    "gradient_cosine",
    "representation_similarity",
    "shuffled",
)


@dataclass(frozen=True)
class HallucinationConfig:
    """Sizes of the benchmark (defaults: the documented run; tests use a reduced one).

    Attributes:
        n_facts: Facts (a multiple of 4, the number of relations).
        n_false: Facts fine-tuned in a false version (a multiple of 4, at most ``n_facts / 2``).
        k: Sentences per fact (1–3).
        n_true_distractors: True sentences about each falsified entity kept in the fine-tuning
            set (0 to ``k``): candidates that name the query's entity but argue *against* the
            false answer — what separates influence from lexical overlap.
        n_pretrain_chunks: Shakespeare chunks of the pre-training set.
        n_replay_chunks: Other Shakespeare chunks mixed into the fine-tuning set (candidates).
        seq_len_words: Words per chunk.
        n_layer / n_embd / n_head / n_positions / vocab_size: The GPT-2 and its tokenizer.
        pretrain_epochs / pretrain_lr / pretrain_fact_repeats: Pre-training.
        finetune_epochs / finetune_lr / finetune_fact_repeats: Fine-tuning (a checkpoint is kept
            after every epoch; the last is the fine-tuned model).
        batch_size: Sequences per optimizer step.
        curvature: Curvature of every influence computation.
        seed: Seed of facts, chunks, initialisation and batch order.
    """

    n_facts: int = 24
    n_false: int = 8
    k: int = 3
    n_true_distractors: int = 1
    n_pretrain_chunks: int = 300
    n_replay_chunks: int = 48
    seq_len_words: int = 48
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 128
    vocab_size: int = 4096
    pretrain_epochs: int = 15
    pretrain_lr: float = 1e-2
    pretrain_fact_repeats: int = 4
    finetune_epochs: int = 5
    finetune_lr: float = 3e-3
    finetune_fact_repeats: int = 2
    batch_size: int = 16
    curvature: str = "ekfac"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_facts % 4 or self.n_false % 4 or not 4 <= self.n_false <= self.n_facts // 2:
            raise ConfigError(
                "n_facts and n_false must be multiples of 4 with 4 ≤ n_false ≤ n_facts / 2 (each "
                f"false fact borrows the answer of a true fact of its relation); received "
                f"n_facts={self.n_facts}, n_false={self.n_false}."
            )
        if not 0 <= self.n_true_distractors <= self.k:
            raise ConfigError(
                f"n_true_distractors must be between 0 and k={self.k}, received "
                f"{self.n_true_distractors}."
            )
        if self.finetune_epochs < 2:
            raise ConfigError(
                f"finetune_epochs must be ≥ 2 (denoise smooths over epoch checkpoints), "
                f"received {self.finetune_epochs}."
            )


#: The reduced set-up of the CI test (``tests/benchmarks/test_corrections_benchmark.py``, ``--quick``).
QUICK = HallucinationConfig(
    n_facts=8,
    n_false=4,
    n_pretrain_chunks=16,
    n_replay_chunks=8,
    seq_len_words=24,
    n_positions=64,
    n_embd=32,
    vocab_size=512,
    pretrain_epochs=8,
    finetune_epochs=3,
)


@dataclass
class HallucinationData:
    """Texts, facts and models of one run of the benchmark."""

    pretrain: list[dict[str, Any]]
    finetune: list[dict[str, Any]]
    facts: list[PlantedFact]
    false_facts: list[PlantedFact]
    tokenizer: Any
    base: Any = None
    finetuned: Any = None
    checkpoints: list[Any] | None = None
    train_seconds: float = 0.0


def build_data(config: HallucinationConfig, assets=None) -> HallucinationData:
    """The pre-training and fine-tuning records (see the module docstring) and a tokenizer."""
    texts = shakespeare_texts(assets)
    vocab = {w for t in texts.values() for w in re.findall(r"[a-z]+", t.lower())}
    facts = make_facts(config.n_facts, config.seed, forbidden=vocab)
    n_false = config.n_false
    # Fact i < n_false takes the answer of fact i + n_false (same relation: relations cycle by 4).
    false_facts = [
        replace(facts[i], answer=facts[i + n_false].answer) for i in range(config.n_false)
    ]
    chunks = shakespeare_chunks(
        texts, config.n_pretrain_chunks + config.n_replay_chunks, config.seq_len_words, config.seed
    )
    pretrain = chunks[: config.n_pretrain_chunks] + make_training_records(
        facts, k=config.k, seed=config.seed
    )
    finetune = make_training_records(false_facts, k=config.k, seed=config.seed)
    for record in finetune:
        record["false"] = True
    for fact in facts[:n_false]:  # true sentences about the falsified entities (distractors)
        finetune += make_training_records([fact], k=config.k, seed=config.seed)[
            : config.n_true_distractors
        ]
    finetune += make_training_records(facts[n_false:], k=config.k, seed=config.seed)
    finetune += chunks[config.n_pretrain_chunks :]
    all_texts = [r["text"] for r in pretrain + finetune]
    tokenizer = train_tokenizer(all_texts, config.vocab_size)
    tokenizer.model_max_length = config.n_positions
    return HallucinationData(pretrain, finetune, facts, false_facts, tokenizer)


def _repeats(records: list[dict[str, Any]], repeats: int) -> list[int]:
    return [i for i, r in enumerate(records) for _ in range(repeats if r.get("fact_id") else 1)]


def train_models(data: HallucinationData, config: HallucinationConfig) -> HallucinationData:
    """Pre-train θ_0, then fine-tune a copy of it, keeping one checkpoint per epoch."""
    start = time.perf_counter()
    gpt2 = make_gpt2_config(
        data.tokenizer,
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        n_head=config.n_head,
        n_positions=config.n_positions,
    )
    common = {"weight_decay": 0.01, "batch_size": config.batch_size, "seed": config.seed}
    base = train_lm(
        data.pretrain,
        data.tokenizer,
        gpt2,
        epochs=config.pretrain_epochs,
        lr=config.pretrain_lr,
        subset=_repeats(data.pretrain, config.pretrain_fact_repeats),
        **common,
    ).model
    checkpoints: list[Any] = []

    def keep(epoch: int, model) -> None:
        if epoch < config.finetune_epochs - 1:  # the last epoch's model is the fine-tuned one
            checkpoints.append(copy.deepcopy(model).eval())

    finetuned = train_lm(
        data.finetune,
        data.tokenizer,
        gpt2,
        epochs=config.finetune_epochs,
        lr=config.finetune_lr,
        subset=_repeats(data.finetune, config.finetune_fact_repeats),
        init=base,
        on_epoch_end=keep,
        **common,
    ).model
    data.base, data.finetuned, data.checkpoints = base.eval(), finetuned, checkpoints
    data.train_seconds = time.perf_counter() - start
    return data


def hallucination_queries(data: HallucinationData) -> tuple[list[dict], dict[str, Any]]:
    """Queries whose false answer the fine-tuned model prefers over the true one."""
    false_q = make_queries(data.false_facts)
    true_q = make_queries(data.facts[: len(data.false_facts)])
    lp_false = evaluate_queries(data.finetuned, data.tokenizer, false_q).logprob
    lp_true = evaluate_queries(data.finetuned, data.tokenizer, true_q).logprob
    base_false = evaluate_queries(data.base, data.tokenizer, false_q).logprob
    base_true = evaluate_queries(data.base, data.tokenizer, true_q).logprob
    kept = [q for q, f, t in zip(false_q, lp_false, lp_true) if f > t]
    stats = {
        "false_facts": len(false_q),
        "repeated_by_finetuned": len(kept),
        "base_prefers_true": int(sum(t > f for f, t in zip(base_false, base_true))),
        "finetuned_logprob_false_minus_true": float(np.mean(np.array(lp_false) - lp_true)),
        "base_logprob_false_minus_true": float(np.mean(np.array(base_false) - base_true)),
    }
    return kept, stats


def _aucs(scores: torch.Tensor, positives: np.ndarray) -> list[float]:
    s = scores.double().cpu().numpy()
    return [roc_auc(s[i], positives[i]) for i in range(len(s))]


def evaluate(
    data: HallucinationData, config: HallucinationConfig, batch_size: int = 16
) -> dict[str, Any]:
    """Run every method on the trained models; return per-method AUCs and run statistics."""
    queries, stats = hallucination_queries(data)
    out: dict[str, Any] = {"config": asdict(config), "queries": stats, "auc": {}, "per_query": {}}
    if not queries:
        out["note"] = "The fine-tuned model repeats none of the false facts; nothing to trace."
        return out
    start = time.perf_counter()
    inf = Influence(data.finetuned, "causal_lm", modules="mlp", tokenizer=data.tokenizer)
    train = inf.encode([{"text": r["text"]} for r in data.finetune], truncate=True)
    enc_q = inf.encode(
        [{"prompt": q["prompt"], "completion": q["completion"]} for q in queries], truncate=True
    )
    positives = np.array(
        [
            [r.get("fact_id") == q["fact_id"] and bool(r.get("false")) for r in data.finetune]
            for q in queries
        ]
    )  # (Q, N) the sequences that state the query's false fact
    fit = FitConfig(curvature=config.curvature, batch_size=batch_size, seed=config.seed)
    score = ScoreConfig(query_rank=None, batch_size=batch_size)
    result = run_corrections(
        data.finetuned,
        "causal_lm",
        train,
        enc_q,
        base=data.base,
        checkpoints=data.checkpoints,
        fit_config=fit,
        score_config=score,
    )
    methods: dict[str, torch.Tensor] = dict(result.scores)
    smoothed = [result.components[f"checkpoint-{k}"] for k in range(len(data.checkpoints))]
    smoothed.append(result.components["final"])
    methods["dda_standardized"] = dda(smoothed, result.components["base"], smoothing="standardized")
    texts = [r["text"] for r in data.finetune]
    methods["bm25"] = bm25([q["prompt"] + q["completion"] for q in queries], texts)
    methods["gradient_cosine"] = gradient_cosine(inf, enc_q, train, batch_size).pairwise
    methods["representation_similarity"] = representation_similarity(
        hidden_states(data.finetuned, enc_q, inf.task, batch_size),
        hidden_states(data.finetuned, train, inf.task, batch_size),
        train,
    ).pairwise
    g = torch.Generator().manual_seed(config.seed)
    dda_scores = methods["dda"]
    methods["shuffled"] = dda_scores[:, torch.randperm(dda_scores.shape[1], generator=g)]
    for name in METHODS:
        aucs = _aucs(methods[name], positives)
        out["per_query"][name] = aucs
        out["auc"][name] = float(np.mean(aucs))
    pos = torch.from_numpy(positives)
    out["diagnostics"] = {  # mean raw score on the ground truth vs the other candidates
        role: {
            "positives": float(scores[pos].mean()),
            "negatives": float(scores[~pos].mean()),
            "mean_abs": float(scores.abs().mean()),
        }
        for role, scores in result.components.items()
    }
    out["n_candidates"] = len(data.finetune)
    out["n_positives_per_query"] = int(positives[0].sum())
    out["score_seconds"] = time.perf_counter() - start
    out["train_seconds"] = data.train_seconds
    return out


def run_benchmark(config: HallucinationConfig, assets=None) -> dict[str, Any]:
    """Build the data, train both models and evaluate every method (one seed)."""
    data = train_models(build_data(config, assets), config)
    return evaluate(data, config)
