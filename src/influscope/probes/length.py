"""Length generalisation: accuracy and loss as a function of the length of the input.

A model trained only on inputs of length ≤ L is scored on inputs of length 1 … ≥ 4L. Two
tasks with a controllable length:

- **copy** (:func:`copy_records`, :func:`train_copy_model`): ``"c a f | c a f"`` — a random
  string of ``n`` symbols, a separator, and the string again; the completion (the copy) is
  scored. A tiny GPT-2 with learned absolute positions has never seen positions past ``2L + 1``,
  so its copies break down past ``L``.
- **planted facts behind distractors** (:func:`distractor_records`): the demo's taught-wording
  fact prompts preceded by ever longer held-out Shakespeare text; ``L`` is the longest planted
  fact sequence the model was trained on.

For every length ``n`` the probe reports the exact-match accuracy of the completion (every token
the greedy prediction under teacher forcing), its loss per token
``−(1/|c|) Σ_t log p(c_t | prompt, c_{<t})``, and — side by side with influence — how often the
top-ranked training sequence is the one that states the same fact (records with ``fact_id``), or
the mean length of the top-``k`` training sequences (training records with ``length``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from influscope.errors import ConfigError, DataError
from influscope.probes.base import (
    InfluenceSide,
    completion_scores,
    encode_completion,
    probe_section,
)
from influscope.report.svg import svg_line_plot
from influscope.tasks import context_length

__all__ = [
    "CopyTaskConfig",
    "LengthResult",
    "copy_records",
    "copy_tokenizer",
    "distractor_records",
    "length_probe",
    "train_copy_model",
]

SEPARATOR = "|"


@dataclass(frozen=True)
class CopyTaskConfig:
    """The synthetic copy task and its tiny model.

    Attributes:
        n_symbols: Alphabet size (``a`` … at most ``z``).
        train_max_length: ``L``: training strings have 1 … L symbols.
        eval_max_length: Longest evaluated string (sets the model's context to ``2·n + 2``).
        n_train: Training strings.
        n_layer: Transformer blocks.
        n_embd: Width.
        n_head: Attention heads.
        epochs: Training passes.
        lr: Peak learning rate.
        batch_size: Sequences per step.
        seed: Seed of data and training.
    """

    n_symbols: int = 10
    train_max_length: int = 4
    eval_max_length: int = 16
    n_train: int = 1500
    n_layer: int = 2
    n_embd: int = 32
    n_head: int = 2
    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.n_symbols <= 26:
            raise ConfigError(f"n_symbols must be in 2 … 26 (received {self.n_symbols}).")
        if not 1 <= self.train_max_length <= self.eval_max_length:
            raise ConfigError(
                "Need 1 <= train_max_length <= eval_max_length, received "
                f"{self.train_max_length} and {self.eval_max_length}."
            )
        if min(self.n_train, self.n_layer, self.n_embd, self.epochs, self.batch_size) < 1:
            raise ConfigError(f"Sizes and epochs must be positive: {self}.")
        if self.n_embd % self.n_head or not self.lr > 0:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) and lr > 0 "
                f"(received {self.lr})."
            )

    @property
    def context(self) -> int:
        """Context of the model: the longest evaluated prompt + copy."""
        return 2 * self.eval_max_length + 2


def _symbols(n: int) -> list[str]:
    return [chr(ord("a") + i) for i in range(n)]


def copy_tokenizer(n_symbols: int):
    """A word-level tokenizer over ``a …``, ``|`` and ``<|endoftext|>`` (id 0), no specials added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, SEPARATOR: 1}
    vocab |= {s: i + 2 for i, s in enumerate(_symbols(n_symbols))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, pad_token=eot, unk_token=eot
    )


def copy_records(
    lengths: Sequence[int], n_per_length: int, n_symbols: int, seed: int = 0
) -> list[dict[str, Any]]:
    """``n_per_length`` copy examples per length: ``{"prompt", "completion", "text", "length"}``.

    Example:
        >>> copy_records([2], 1, 3, seed=1)[0]["text"]
        'a c | a c'
    """
    if n_per_length < 1 or any(n < 1 for n in lengths):
        raise ConfigError(
            f"Need n_per_length >= 1 and lengths >= 1, received {n_per_length}, {list(lengths)}."
        )
    rng = random.Random(seed)
    symbols = _symbols(n_symbols)
    out = []
    for n in lengths:
        for _ in range(n_per_length):
            body = " ".join(rng.choice(symbols) for _ in range(n))
            prompt, completion = f"{body} {SEPARATOR}", f" {body}"
            out.append(
                {
                    "prompt": prompt,
                    "completion": completion,
                    "text": prompt + completion,
                    "length": n,
                }
            )
    return out


def train_copy_model(config: CopyTaskConfig | None = None):
    """Train a tiny GPT-2 on copies of length 1 … ``train_max_length``.

    Returns:
        ``(model, tokenizer, train_records)``.
    """
    from influscope.training import make_gpt2_config, train_lm

    config = config or CopyTaskConfig()
    tokenizer = copy_tokenizer(config.n_symbols)
    rng = random.Random(config.seed)
    lengths = [rng.randint(1, config.train_max_length) for _ in range(config.n_train)]
    records = []
    for i, n in enumerate(lengths):
        records += copy_records([n], 1, config.n_symbols, seed=config.seed * 100_003 + i)
    gpt = make_gpt2_config(
        tokenizer,
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        n_head=config.n_head,
        n_positions=config.context,
    )
    result = train_lm(
        records,
        tokenizer,
        gpt,
        epochs=config.epochs,
        lr=config.lr,
        weight_decay=0.0,
        batch_size=config.batch_size,
        seed=config.seed,
    )
    return result.model, tokenizer, records


def distractor_records(
    fact_queries: Sequence[dict[str, Any]],
    distractors: Sequence[str],
    tokenizer: Any,
    lengths: Sequence[int],
) -> list[dict[str, Any]]:
    """Each fact query behind held-out text, cut so that prompt + completion has ``n`` tokens.

    For each target length ``n`` and query, the prompt is the last words of a distractor text
    that make the whole record about ``n`` tokens long (a word boundary, so the count can fall
    short by a token or two; ``length`` records the target ``n``, ``n_tokens`` the actual
    count), then a space and the query's prompt. A target shorter than the bare query (e.g. 0)
    gives the bare query.

    Raises:
        DataError: No distractor text is long enough for the longest target.
    """
    if not distractors:
        raise DataError("Expected at least one distractor text, received none.")
    out = []
    for q, query in enumerate(fact_queries):
        prompt, completion = encode_completion(tokenizer, query, q)
        base = len(prompt) + len(completion)
        words = distractors[q % len(distractors)].split()
        for n in lengths:
            need = n - base - 1
            chosen: list[str] = []
            while need > 0 and len(chosen) < len(words):
                chosen.insert(0, words[len(words) - 1 - len(chosen)])
                if len(tokenizer(" ".join(chosen), add_special_tokens=False)["input_ids"]) > need:
                    chosen.pop(0)
                    break
            if need > 0 and len(chosen) == len(words):
                raise DataError(
                    f"Distractor text {q % len(distractors)} has {len(words)} words, too few "
                    f"for a record of {n} tokens; give longer distractor texts."
                )
            text = " ".join(chosen)
            rec = dict(query)
            rec["prompt"] = f"{text} {query['prompt']}" if text else query["prompt"]
            rec["length"] = n
            rec["n_tokens"] = sum(map(len, encode_completion(tokenizer, rec, q)))
            out.append(rec)
    return out


@dataclass
class LengthResult:
    """Accuracy and loss per length.

    Attributes:
        lengths: The lengths, ascending.
        accuracy: Exact-match accuracy per length.
        loss: Completion loss per token per length.
        n: Examples per length.
        train_max_length: ``L``.
        influence_top1_match: Per length, fraction whose top-1 training sequence has the same
            ``fact_id`` (empty if not computed).
        influence_top_length: Per length, mean ``length`` of the top-``k`` training sequences
            (empty if not computed).
        top_k: ``k`` of the influence columns.
    """

    lengths: list[int]
    accuracy: list[float]
    loss: list[float]
    n: list[int]
    train_max_length: int
    influence_top1_match: list[float] = field(default_factory=list)
    influence_top_length: list[float] = field(default_factory=list)
    top_k: int = 10

    def accuracy_within(self) -> float:
        """Mean accuracy over lengths ≤ L."""
        vals = [a for n, a in zip(self.lengths, self.accuracy) if n <= self.train_max_length]
        return float(np.mean(vals)) if vals else float("nan")

    def accuracy_beyond(self, factor: float = 2.0) -> float:
        """Mean accuracy over lengths > ``factor`` · L."""
        vals = [
            a for n, a in zip(self.lengths, self.accuracy) if n > factor * self.train_max_length
        ]
        return float(np.mean(vals)) if vals else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe": "length",
            "train_max_length": self.train_max_length,
            "lengths": self.lengths,
            "accuracy": self.accuracy,
            "loss_per_token": self.loss,
            "n": self.n,
            "influence_top1_same_fact": self.influence_top1_match,
            "influence_top_k_mean_train_length": self.influence_top_length,
            "top_k": self.top_k,
        }

    def markdown(self) -> str:
        head = ["length", "× L", "n", "accuracy", "loss / token"]
        if self.influence_top1_match:
            head.append("top-1 influence states the fact")
        if self.influence_top_length:
            head.append(f"mean length of top-{self.top_k} influences")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, n in enumerate(self.lengths):
            cells = [
                str(n),
                f"{n / self.train_max_length:.2g}",
                str(self.n[i]),
                f"{self.accuracy[i]:.3f}",
                f"{self.loss[i]:.3f}",
            ]
            if self.influence_top1_match:
                cells.append(f"{self.influence_top1_match[i]:.3f}")
            if self.influence_top_length:
                cells.append(f"{self.influence_top_length[i]:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_section(self):
        """This result as a section of the studies report (table and plot)."""
        return probe_section("Length generalisation", self.markdown(), self.svg())

    def svg(self, title: str = "") -> str:
        xs = [self.lengths, self.lengths, [self.train_max_length] * 2]
        ys = [self.accuracy, [min(1.0, v / max(self.loss)) for v in self.loss], [0.0, 1.0]]
        labels = ["accuracy", "loss / token (÷ max)", f"L = {self.train_max_length}"]
        if self.influence_top1_match:
            xs.append(self.lengths)
            ys.append(self.influence_top1_match)
            labels.append("top-1 influence states the fact")
        return svg_line_plot(
            xs, ys, labels, title=title, x_label="length", y_label="accuracy", standalone=True
        )


def length_probe(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    train_max_length: int,
    *,
    length_key: str = "length",
    influence: InfluenceSide | None = None,
    top_k: int = 10,
    batch_size: int = 16,
) -> LengthResult:
    """Accuracy and loss of the completion per length bucket (``record[length_key]``).

    Args:
        model: The model.
        tokenizer: Its tokenizer.
        records: ``{"prompt", "completion", length_key}`` records.
        train_max_length: The longest length ``L`` the model was trained on.
        length_key: Record key holding the length.
        influence: If given, the influence columns (see the module docstring).
        top_k: ``k`` of the mean-length column.
        batch_size: Records per forward pass.

    Raises:
        ConfigError: ``train_max_length < 1``.
        DataError: A record without a length, or a length whose records exceed the context
            (the message names the longest length that fits).
    """
    if train_max_length < 1:
        raise ConfigError(f"train_max_length must be >= 1 (received {train_max_length}).")
    if not records:
        raise DataError("Expected at least one record, received none.")
    bad = [i for i, r in enumerate(records) if not isinstance(r.get(length_key), int)]
    if bad:
        raise DataError(
            f"Records {bad[:5]} have no integer {length_key!r}; give each record its length "
            "(e.g. the number of symbols to copy) or pass length_key=."
        )
    limit = context_length(model)
    if limit is not None:
        sizes = {}
        for i, r in enumerate(records):
            n_tok = sum(map(len, encode_completion(tokenizer, r, i)))
            sizes[r[length_key]] = max(sizes.get(r[length_key], 0), n_tok)
        over = sorted(n for n, t in sizes.items() if t > limit)
        if over:
            fits = [n for n, t in sizes.items() if t <= limit]
            raise DataError(
                f"Length {over[0]} needs {sizes[over[0]]} tokens, beyond the model's context of "
                f"{limit} (expected at most {limit}). Ask for lengths up to "
                f"{max(fits) if fits else 'none of those given'}, or train a model with a "
                "longer context (n_positions)."
            )
    scores = completion_scores(model, tokenizer, records, batch_size=batch_size)
    lengths = sorted({r[length_key] for r in records})
    by = {n: [i for i, r in enumerate(records) if r[length_key] == n] for n in lengths}
    result = LengthResult(
        lengths=lengths,
        accuracy=[float(scores.correct[by[n]].mean()) for n in lengths],
        loss=[float(-scores.logprob[by[n]].sum() / scores.n_tokens[by[n]].sum()) for n in lengths],
        n=[len(by[n]) for n in lengths],
        train_max_length=train_max_length,
        top_k=top_k,
    )
    if influence is not None:
        top = influence.top(records, k=top_k)  # (Q, k)
        train = influence.train_records
        if all(r.get("fact_id") is not None for r in records):
            hit = np.array(
                [train[t[0]].get("fact_id") == r["fact_id"] for t, r in zip(top, records)]
            )
            result.influence_top1_match = [float(hit[by[n]].mean()) for n in lengths]
        if all(isinstance(r.get(length_key), int) for r in train):
            mean_len = np.array([np.mean([train[j][length_key] for j in t]) for t in top])
            result.influence_top_length = [float(mean_len[by[n]].mean()) for n in lengths]
    return result
