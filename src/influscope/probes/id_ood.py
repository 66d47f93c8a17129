"""In-distribution vs out-of-distribution evaluation, next to where influence comes from.

Given training records labelled with a *domain* (e.g. ``"shakespeare"`` and
``"planted facts"``) and one or more named evaluation sets, the probe reports per set:

- **loss and accuracy**: for ``{"text"}`` records the mean token loss and next-token accuracy;
  for ``{"prompt", "completion"}`` records the completion's loss per token and exact-match
  accuracy (every token the greedy prediction);
- **distribution shift**, two ways, on the mean-pooled last hidden state ``h(x)``:
  the cross-validated ROC AUC of a logistic-regression *domain classifier* that tells the set's
  examples from the training examples of its nearest domain (0.5: indistinguishable, 1: fully
  separable), and the
  distance of the set's examples to the nearest training-domain centroid ``μ_d`` (standardised
  features), relative to the training examples' own distance to their domain's centroid;
- **where influence comes from**: each example's *nearest training domain* is
  ``argmin_d ‖h(x) − μ_d‖``; from EK-FAC influence ``I_x(z_m)`` the probe reports how often the
  top-1 training sequence and what share of the top-``k`` belong to that domain, beside the
  domain's share of the training set (what a random ranking would give).

Bad input: an evaluation set whose records share no format with what the model was trained on —
neither ``text`` nor ``prompt`` + ``completion``, or no token in common with the training data —
is refused with the fields or tokens it was expected to have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from influscope.errors import ConfigError, DataError
from influscope.probes.base import (
    InfluenceSide,
    completion_scores,
    hidden_features,
    probe_section,
    text_scores,
)

__all__ = ["IdOodConfig", "IdOodResult", "check_format", "id_ood_probe"]


@dataclass(frozen=True)
class IdOodConfig:
    """Settings of :func:`id_ood_probe`.

    Attributes:
        domain_key: Key of the training records that names their domain.
        top_k: Proponents per example for the influence share.
        max_train_features: Training records (evenly spaced) used for centroids and the domain
            classifier.
        folds: Folds of the domain classifier's cross-validation (lowered for tiny sets).
        seed: Seed of the classifier folds.
    """

    domain_key: str = "domain"
    top_k: int = 10
    max_train_features: int = 400
    folds: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.max_train_features < 2 or self.folds < 2:
            raise ConfigError(
                "Need top_k >= 1, max_train_features >= 2 and folds >= 2, received "
                f"{self.top_k}, {self.max_train_features}, {self.folds}."
            )


def _text_of(record: Mapping[str, Any]) -> str | None:
    if "text" in record:
        return str(record["text"])
    if "prompt" in record and "completion" in record:
        return f"{record['prompt']}{record['completion']}"
    return None


def check_format(
    name: str,
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    train_tokens: set[int],
) -> None:
    """Refuse an evaluation set that shares no format with the training data.

    Raises:
        DataError: The set is empty, a record is neither ``text`` nor ``prompt`` +
            ``completion``, or none of its tokens occurs in the training data.
    """
    if not records:
        raise DataError(f"Evaluation set {name!r} is empty; give it at least one record.")
    for i, r in enumerate(records):
        if _text_of(r) is None:
            raise DataError(
                f"Evaluation set {name!r} has no overlap in format with the training data: "
                f"record {i + 1} has keys {sorted(r)}, expected 'text' (as the training records) "
                "or 'prompt' and 'completion'. Rename its fields."
            )
    seen = set()
    for r in records:
        seen.update(tokenizer(_text_of(r), add_special_tokens=False)["input_ids"])
    if not seen & train_tokens:
        raise DataError(
            f"Evaluation set {name!r} has no overlap in format with the training data: none of "
            f"its {len(seen)} distinct tokens occurs in the training records (expected some "
            "shared tokens). It is probably in another script, language or encoding than the "
            "model was trained on; check the file or the tokenizer."
        )


@dataclass
class IdOodResult:
    """Per evaluation set: loss, accuracy, shift and where its influence comes from.

    Attributes:
        sets: Evaluation set names.
        loss: Per set, loss per token.
        accuracy: Per set, accuracy (next-token for text, exact match for completions).
        metric: Per set, which accuracy (``"next-token"`` or ``"exact match"``).
        n: Per set, examples.
        domain_auc: Per set, cross-validated AUC of the domain classifier (the set against the
            training examples of its nearest domain).
        relative_distance: Per set, mean distance to the nearest training centroid divided by
            the training examples' mean distance to their own centroid.
        nearest_domain: Per set, the training domain most of its examples are nearest to.
        nearest_share: Per set, fraction of its examples nearest to that domain.
        top1_from_nearest: Per set, fraction whose top-1 proponent is in the example's
            nearest domain (empty if influence was not computed).
        topk_from_nearest: Per set, mean share of the top-``k`` in the nearest domain.
        base_rate: Per set, mean training share of the examples' nearest domains.
        top1_domains: Per set, ``{domain: fraction of its examples whose top-1 proponent is
            in that domain}``.
        domains: ``{domain: training records}``.
        top_k: ``k``.
    """

    sets: list[str]
    loss: list[float]
    accuracy: list[float]
    metric: list[str]
    n: list[int]
    domain_auc: list[float]
    relative_distance: list[float]
    nearest_domain: list[str]
    nearest_share: list[float]
    domains: dict[str, int]
    top1_from_nearest: list[float] = field(default_factory=list)
    topk_from_nearest: list[float] = field(default_factory=list)
    base_rate: list[float] = field(default_factory=list)
    top1_domains: list[dict[str, float]] = field(default_factory=list)
    top_k: int = 10

    def to_dict(self) -> dict[str, Any]:
        return {"probe": "id_ood", **{k: v for k, v in self.__dict__.items()}}

    def markdown(self) -> str:
        head = [
            "set",
            "n",
            "loss / token",
            "accuracy",
            "domain AUC",
            "rel. distance",
            "nearest domain (share)",
        ]
        if self.top1_from_nearest:
            head += ["top-1 from nearest", f"top-{self.top_k} from nearest", "random ranking"]
            head.append("domains of the top-1")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, name in enumerate(self.sets):
            cells = [
                name,
                str(self.n[i]),
                f"{self.loss[i]:.3f}",
                f"{self.accuracy[i]:.3f} ({self.metric[i]})",
                f"{self.domain_auc[i]:.3f}",
                f"{self.relative_distance[i]:.2f}",
                f"{self.nearest_domain[i]} ({self.nearest_share[i]:.2f})",
            ]
            if self.top1_from_nearest:
                cells += [
                    f"{self.top1_from_nearest[i]:.3f}",
                    f"{self.topk_from_nearest[i]:.3f}",
                    f"{self.base_rate[i]:.3f}",
                    ", ".join(f"{d} {v:.2f}" for d, v in self.top1_domains[i].items() if v),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_section(self):
        """This result as a section of the studies report (table and plot)."""
        return probe_section("In- vs out-of-distribution", self.markdown(), self.svg())

    def svg(self, title: str = "") -> str:
        from influscope.report.svg import svg_bar_chart

        return svg_bar_chart(
            [f"{s} (AUC)" for s in self.sets],
            self.domain_auc,
            title=title,
            width=560,
            standalone=True,
        )


def _auc(train_x: np.ndarray, eval_x: np.ndarray, folds: int, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([train_x, eval_x])
    y = np.r_[np.zeros(len(train_x)), np.ones(len(eval_x))]
    folds = min(folds, len(train_x), len(eval_x))
    if folds < 2:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    prob = cross_val_predict(clf, x, y, cv=split, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, prob))


def id_ood_probe(
    model: nn.Module,
    tokenizer: Any,
    train_records: Sequence[dict[str, Any]],
    eval_sets: Mapping[str, Sequence[dict[str, Any]]],
    config: IdOodConfig | None = None,
    *,
    influence: InfluenceSide | None = None,
    batch_size: int = 16,
) -> IdOodResult:
    """Loss, accuracy, shift and influence provenance of each evaluation set.

    Args:
        model: The model.
        tokenizer: Its tokenizer.
        train_records: The training records, each with ``config.domain_key``.
        eval_sets: ``{name: records}``; records are ``text`` or ``prompt`` + ``completion``.
        config: Settings.
        influence: If given (fitted on ``train_records``, same order), the influence columns.
        batch_size: Records per forward pass.

    Raises:
        DataError: A training record without a domain, fewer than one domain, or an
            evaluation set with no overlap in format (:func:`check_format`).
    """
    config = config or IdOodConfig()
    if not eval_sets:
        raise DataError("Expected at least one evaluation set, received none.")
    key = config.domain_key
    missing = [i for i, r in enumerate(train_records) if r.get(key) is None]
    if missing or not train_records:
        raise DataError(
            f"Training records {missing[:5]} have no {key!r} (of {len(train_records)}); label "
            f"every training record with its domain or pass domain_key=."
        )
    train_texts = [_text_of(r) for r in train_records]
    if any(t is None for t in train_texts):
        raise DataError("Training records must have 'text' (or 'prompt' and 'completion').")
    train_tokens: set[int] = set()
    for t in train_texts:
        train_tokens.update(tokenizer(t, add_special_tokens=False)["input_ids"])
    for name, recs in eval_sets.items():
        check_format(name, recs, tokenizer, train_tokens)

    domains = sorted({str(r[key]) for r in train_records})
    counts = {d: sum(str(r[key]) == d for r in train_records) for d in domains}
    step = max(1, len(train_records) // config.max_train_features)
    pick = list(range(0, len(train_records), step))[: config.max_train_features]
    tx = hidden_features(model, tokenizer, [train_texts[i] for i in pick], batch_size=batch_size)
    tx = tx[-1]  # (Nt, D) last layer
    mu, sd = tx.mean(0), tx.std(0) + 1e-6
    tz = (tx - mu) / sd
    labels = np.array([str(train_records[i][key]) for i in pick])
    centroids = np.stack([tz[labels == d].mean(0) for d in domains])  # (K, D)
    own = np.linalg.norm(tz - centroids[[domains.index(lab) for lab in labels]], axis=1).mean()

    result = IdOodResult([], [], [], [], [], [], [], [], [], domains=counts, top_k=config.top_k)
    for name, recs in eval_sets.items():
        recs = list(recs)
        if all("prompt" in r and "completion" in r for r in recs):
            s = completion_scores(model, tokenizer, recs, batch_size=batch_size)
            loss, acc, metric = s.loss_per_token, s.accuracy, "exact match"
        else:
            s = text_scores(model, tokenizer, recs, batch_size=batch_size)
            loss = float((s.loss * s.n_tokens).sum() / s.n_tokens.sum())
            acc = float((s.accuracy * s.n_tokens).sum() / s.n_tokens.sum())
            metric = "next-token"
        ex = hidden_features(model, tokenizer, [_text_of(r) for r in recs], batch_size=batch_size)
        ez = (ex[-1] - mu) / sd  # (Ne, D)
        dist = np.linalg.norm(ez[:, None] - centroids[None], axis=2)  # (Ne, K)
        nearest = dist.argmin(1)  # (Ne,)
        major = int(np.bincount(nearest, minlength=len(domains)).argmax())
        result.sets.append(name)
        result.loss.append(float(loss))
        result.accuracy.append(float(acc))
        result.metric.append(metric)
        result.n.append(len(recs))
        result.domain_auc.append(_auc(tz[labels == domains[major]], ez, config.folds, config.seed))
        result.relative_distance.append(float(dist.min(1).mean() / own))
        result.nearest_domain.append(domains[major])
        result.nearest_share.append(float((nearest == major).mean()))
        if influence is not None:
            top = influence.top(recs, k=config.top_k)  # (Ne, k)
            dom = np.array([[str(train_records[j][key]) for j in row] for row in top])  # (Ne, k)
            near = np.array([domains[d] for d in nearest])  # (Ne,)
            result.top1_from_nearest.append(float((dom[:, 0] == near).mean()))
            result.topk_from_nearest.append(float((dom == near[:, None]).mean()))
            total = len(train_records)
            result.base_rate.append(float(np.mean([counts[d] / total for d in near])))
            result.top1_domains.append({d: float((dom[:, 0] == d).mean()) for d in domains})
    return result
