"""Prompting probes: zero-shot vs k-shot, with and without a chain-of-thought style prefix.

For a query ``(p, c)`` and demonstrations ``(p_1, c_1), …`` the k-shot prompt is

    p_1 c_1 SEP p_2 c_2 SEP … p_k c_k SEP [prefix ] p

(``SEP`` a separator, default a newline; ``prefix`` an optional chain-of-thought style lead-in
such as ``"Let us think step by step."``), and the probe scores ``c`` after it by teacher
forcing: the accuracy is the fraction of queries whose every completion token is the greedy
prediction, alongside the first-token accuracy and the mean ``log p(c | prompt)``.

Demonstrations are drawn per query from a pool, never one that shares the query's
``exclude_key`` (e.g. ``fact_id``: the answer is never in the prompt), preferring those with the
same ``group_key`` (e.g. ``relation``), in a fixed seeded order, so that the k-shot set is
contained in the 2k-shot set. Side by side with influence: for queries that carry a
``fact_id``, how often the top-ranked training sequence of the k-shot prompt's completion is the
fact's own training sequence — whether the demonstrations change *where* the answer comes from.
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

__all__ = ["PromptingConfig", "PromptingResult", "build_prompts", "prompting_probe"]


@dataclass(frozen=True)
class PromptingConfig:
    """Settings of :func:`prompting_probe`.

    Attributes:
        ks: Numbers of demonstrations.
        separator: Text between demonstrations and before the query.
        cot_prefix: Chain-of-thought style lead-in put before the query's prompt (also scored
            without it); ``None`` skips that arm.
        exclude_key: Demonstrations sharing this record key's value with the query are never
            used (``None``: only the query itself, by identical prompt, is excluded).
        group_key: Demonstrations with the query's value of this key come first.
        seed: Seed of the demonstration order.
    """

    ks: tuple[int, ...] = (0, 1, 2, 4, 8)
    separator: str = "\n"
    cot_prefix: str | None = None
    exclude_key: str | None = "fact_id"
    group_key: str | None = "relation"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ks or any(k < 0 for k in self.ks):
            raise ConfigError(f"ks must be non-negative integers, received {self.ks}.")
        if list(self.ks) != sorted(set(self.ks)):
            raise ConfigError(f"ks must be strictly increasing, received {self.ks}.")


def _pool_for(query: dict[str, Any], pool: Sequence[dict[str, Any]], config: PromptingConfig):
    key = config.exclude_key
    usable = [
        d
        for d in pool
        if d["prompt"] != query["prompt"]
        and not (key is not None and query.get(key) is not None and d.get(key) == query.get(key))
    ]
    rng = random.Random(f"{config.seed}:{query['prompt']}")
    rng.shuffle(usable)
    if config.group_key is not None:
        same = [d for d in usable if d.get(config.group_key) == query.get(config.group_key)]
        usable = same + [d for d in usable if d not in same]
    return usable


def build_prompts(
    queries: Sequence[dict[str, Any]],
    demonstrations: Sequence[dict[str, Any]],
    k: int,
    config: PromptingConfig | None = None,
    *,
    cot: bool = False,
) -> list[dict[str, Any]]:
    """The k-shot version of every query (a copy of the record with a new ``prompt``).

    Raises:
        ConfigError: ``k`` exceeds the demonstrations available to some query.
        DataError: A query or demonstration is not a prompt/completion record.
    """
    config = config or PromptingConfig()
    for name, recs in (("Query", queries), ("Demonstration", demonstrations)):
        for i, r in enumerate(recs):
            if "prompt" not in r or "completion" not in r:
                raise DataError(
                    f"{name} {i} has keys {sorted(r)}; expected 'prompt' and 'completion'."
                )
    out = []
    for q, query in enumerate(queries):
        usable = _pool_for(query, demonstrations, config)
        if k > len(usable):
            raise ConfigError(
                f"k={k} needs {k} demonstrations, but query {q} has only {len(usable)} "
                f"(from {len(demonstrations)}, after leaving out those that share its "
                f"{config.exclude_key!r}). Lower the largest k to {len(usable)} or give more "
                "demonstrations."
            )
        shots = [d["prompt"] + d["completion"] for d in usable[:k]]
        lead = f"{config.cot_prefix} " if cot and config.cot_prefix else ""
        body = lead + query["prompt"]
        rec = dict(query)
        rec["prompt"] = config.separator.join([*shots, body]) if shots else body
        rec["k"] = k
        rec["cot"] = cot
        out.append(rec)
    return out


@dataclass
class PromptingResult:
    """Accuracy against k, with and without the prefix.

    Attributes:
        ks: The ks.
        accuracy: ``{"plain" | "cot": [accuracy per k]}``.
        first_token_accuracy: Same keys, first completion token top-1.
        mean_logprob: Same keys, mean ``log p(c | prompt)``.
        n_queries: Queries scored.
        cot_prefix: The prefix (``None`` if that arm was skipped).
        influence_top1_match: Per k (plain prompts), fraction whose top-1 training sequence
            states the same fact (empty if not computed).
    """

    ks: list[int]
    accuracy: dict[str, list[float]]
    first_token_accuracy: dict[str, list[float]]
    mean_logprob: dict[str, list[float]]
    n_queries: int
    cot_prefix: str | None = None
    influence_top1_match: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe": "prompting",
            "ks": self.ks,
            "accuracy": self.accuracy,
            "first_token_accuracy": self.first_token_accuracy,
            "mean_logprob": self.mean_logprob,
            "n_queries": self.n_queries,
            "cot_prefix": self.cot_prefix,
            "influence_top1_same_fact": self.influence_top1_match,
        }

    def markdown(self) -> str:
        arms = list(self.accuracy)
        head = ["k"]
        for arm in arms:
            name = "plain" if arm == "plain" else "with prefix"
            head += [f"accuracy ({name})", f"first token ({name})", f"mean log p ({name})"]
        if self.influence_top1_match:
            head.append("top-1 influence states the fact (plain)")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, k in enumerate(self.ks):
            cells = [str(k)]
            for arm in arms:
                cells += [
                    f"{self.accuracy[arm][i]:.3f}",
                    f"{self.first_token_accuracy[arm][i]:.3f}",
                    f"{self.mean_logprob[arm][i]:.2f}",
                ]
            if self.influence_top1_match:
                cells.append(f"{self.influence_top1_match[i]:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_section(self):
        """This result as a section of the studies report (table and plot)."""
        return probe_section("Prompting: accuracy against k", self.markdown(), self.svg())

    def svg(self, title: str = "") -> str:
        xs, ys, labels = [], [], []
        for arm, acc in self.accuracy.items():
            xs.append(self.ks)
            ys.append(acc)
            labels.append("accuracy" if arm == "plain" else f"accuracy, prefix {self.cot_prefix!r}")
        if self.influence_top1_match:
            xs.append(self.ks)
            ys.append(self.influence_top1_match)
            labels.append("top-1 influence states the fact")
        return svg_line_plot(
            xs,
            ys,
            labels,
            title=title,
            x_label="k (demonstrations)",
            y_label="accuracy",
            standalone=True,
        )


def prompting_probe(
    model: nn.Module,
    tokenizer: Any,
    queries: Sequence[dict[str, Any]],
    demonstrations: Sequence[dict[str, Any]],
    config: PromptingConfig | None = None,
    *,
    influence: InfluenceSide | None = None,
    batch_size: int = 16,
) -> PromptingResult:
    """Score every query zero-shot and k-shot for each ``k`` in ``config.ks``.

    Args:
        model: The model.
        tokenizer: Its tokenizer.
        queries: ``{"prompt", "completion"}`` records (optionally ``fact_id``, ``relation``).
        demonstrations: Pool of solved examples in the same format.
        config: Settings.
        influence: If given, the influence column (queries with ``fact_id`` only).
        batch_size: Records per forward pass.

    Raises:
        ConfigError: The largest k exceeds the demonstrations available to a query.
        DataError: No queries, records that are not prompt/completion, or a k-shot prompt
            longer than the model's context (the message names the k).
    """
    config = config or PromptingConfig()
    if not queries:
        raise DataError("Expected at least one query, received none.")
    arms = ["plain"] + (["cot"] if config.cot_prefix else [])
    # Build the largest k first: a k too large fails before any model work.
    prompts = {
        (arm, k): build_prompts(queries, demonstrations, k, config, cot=arm == "cot")
        for arm in arms
        for k in sorted(config.ks, reverse=True)
    }
    limit = context_length(model)
    if limit is not None:
        for (arm, k), recs in sorted(prompts.items(), key=lambda kv: kv[0][1]):
            longest = max(
                sum(map(len, encode_completion(tokenizer, r, i))) for i, r in enumerate(recs)
            )
            if longest > limit:
                fits = [kk for kk in config.ks if kk < k]
                raise DataError(
                    f"The {k}-shot prompts ({arm}) reach {longest} tokens, beyond the model's "
                    f"context of {limit} (expected at most {limit}). Use ks up to "
                    f"{max(fits) if fits else 0}, shorter demonstrations, or a model with a "
                    "longer context."
                )
    acc: dict[str, list[float]] = {a: [] for a in arms}
    first: dict[str, list[float]] = {a: [] for a in arms}
    mean_lp: dict[str, list[float]] = {a: [] for a in arms}
    for arm in arms:
        for k in config.ks:
            s = completion_scores(model, tokenizer, prompts[(arm, k)], batch_size=batch_size)
            acc[arm].append(s.accuracy)
            first[arm].append(float(s.first_correct.mean()))
            mean_lp[arm].append(float(s.logprob.mean()))
    result = PromptingResult(
        ks=list(config.ks),
        accuracy=acc,
        first_token_accuracy=first,
        mean_logprob=mean_lp,
        n_queries=len(queries),
        cot_prefix=config.cot_prefix,
    )
    if influence is not None and all(q.get("fact_id") is not None for q in queries):
        train = influence.train_records
        for k in config.ks:
            top = influence.top(prompts[("plain", k)], k=1)[:, 0]  # (Q,)
            hits = [train[t].get("fact_id") == q["fact_id"] for t, q in zip(top, queries)]
            result.influence_top1_match.append(float(np.mean(hits)))
    return result
