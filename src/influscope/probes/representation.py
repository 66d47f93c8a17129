"""Representation probes: is a property of the text linearly decodable from each layer?

For each layer ``ℓ`` (0 = embeddings, ``b + 1`` = output of transformer block ``b``) the pooled
hidden states ``h_ℓ(x) ∈ R^D`` of the texts are standardised and a multinomial logistic
regression (scikit-learn's :class:`~sklearn.linear_model.LogisticRegression`, L2, ``C``)

    p(y | x) = softmax(W h_ℓ(x) + b)

is trained and scored by stratified ``k``-fold cross-validation. Two references keep the number
honest (Hewitt & Liang 2019, "Designing and Interpreting Probes with Control Tasks"):

- **chance**: the majority-class rate;
- **control**: the same probe on a random permutation of the labels, which no representation
  can encode — its accuracy shows how much a probe of this size fits noise.

Side by side with influence: the share of the query's influence mass that flows through each
block's tracked layers, ``Σ_{ℓ∈b} Σ_m |I_{q,ℓ}(z_m)| / Σ_ℓ Σ_m |I_{q,ℓ}(z_m)|``
(:func:`influscope.analysis.layers.layer_study`), averaged over queries: where the property is
decodable, and where influence on the same texts passes, per block.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = np.arange(40) % 2
    >>> x = rng.normal(size=(40, 3)) + 4 * y[:, None]
    >>> round(linear_probe_accuracy(x, y, folds=4), 2)
    1.0
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from influscope.errors import ConfigError, DataError
from influscope.probes.base import hidden_features, probe_section
from influscope.report.svg import svg_line_plot

__all__ = [
    "RepresentationConfig",
    "RepresentationResult",
    "block_influence_share",
    "linear_probe_accuracy",
    "representation_probe",
]


@dataclass(frozen=True)
class RepresentationConfig:
    """Settings of :func:`representation_probe`.

    Attributes:
        pool: ``"mean"`` over the tokens of a text, or ``"last"`` token.
        folds: Cross-validation folds (each class needs at least this many texts).
        c: Inverse L2 strength of the logistic regression.
        seed: Seed of the folds and of the control permutation.
        max_iter: Iterations of the solver.
    """

    pool: str = "mean"
    folds: int = 5
    c: float = 1.0
    seed: int = 0
    max_iter: int = 300

    def __post_init__(self) -> None:
        if self.pool not in ("mean", "last"):
            raise ConfigError(f"Invalid pool: {self.pool!r}. Supported: ('last', 'mean').")
        if self.folds < 2:
            raise ConfigError(f"folds must be at least 2 (received {self.folds}).")
        if not self.c > 0 or self.max_iter < 1:
            raise ConfigError(
                f"c must be > 0 and max_iter >= 1 (received {self.c}, {self.max_iter})."
            )


def _check_labels(labels: Sequence[Any], folds: int) -> np.ndarray:
    y = np.asarray([str(v) for v in labels])
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise DataError(
            f"A probe needs at least 2 label values, received {len(classes)} "
            f"({classes.tolist()}). Choose a property that varies over the texts."
        )
    if counts.min() < folds:
        rare = classes[counts < folds].tolist()
        raise DataError(
            f"Every label needs at least folds={folds} texts for stratified cross-validation; "
            f"{rare} have fewer ({counts.min()}). Add texts, merge rare labels or lower folds."
        )
    return y


def linear_probe_accuracy(
    features: np.ndarray,
    labels: Sequence[Any],
    *,
    folds: int = 5,
    c: float = 1.0,
    seed: int = 0,
    max_iter: int = 300,
) -> float:
    """Cross-validated accuracy of a standardised logistic-regression probe.

    Args:
        features: ``(N, D)`` inputs of the probe.
        labels: ``N`` labels (any hashable values; compared as strings).
        folds: Stratified folds.
        c: Inverse L2 regularisation strength.
        seed: Seed of the fold split.
        max_iter: Solver iterations.

    Returns:
        Mean held-out accuracy over the folds.

    Raises:
        DataError: Shapes disagree, fewer than 2 classes, or a class smaller than ``folds``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(labels):
        raise DataError(
            f"Expected features (N, D) with N = {len(labels)} labels, received shape {x.shape}."
        )
    y = _check_labels(labels, folds)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # separable folds stop at max_iter; accuracy is what counts
        warnings.simplefilter("ignore", ConvergenceWarning)
        return float(cross_val_score(probe, x, y, cv=split, scoring="accuracy").mean())


_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def block_influence_share(layer_names: Sequence[str], abs_share: np.ndarray) -> dict[int, float]:
    """Sum a layer-wise influence share over the tracked layers of each transformer block.

    Args:
        layer_names: Tracked layer names (block = first number in the dotted name).
        abs_share: ``(L,)`` or ``(Q, L)`` absolute shares (averaged over queries if 2-D).

    Returns:
        ``{block: share}`` for every block that has a tracked layer.
    """
    share = np.asarray(abs_share, dtype=np.float64)
    if share.ndim == 2:
        share = share.mean(0)
    out: dict[int, float] = {}
    for name, value in zip(layer_names, share):
        match = _NUMBER.search(name)
        if match:
            block = int(match.group(1))
            out[block] = out.get(block, 0.0) + float(value)
    return out


@dataclass
class RepresentationResult:
    """Per-layer probe accuracy of one or more properties.

    Attributes:
        properties: Property names.
        accuracy: ``{property: [accuracy of layer 0 … L]}`` (0 = embeddings).
        control: ``{property: [accuracy on permuted labels per layer]}``.
        chance: ``{property: majority-class rate}``.
        n_texts: ``{property: texts probed}``.
        influence_share: ``{block: share of influence mass}`` (empty if not computed).
        config: The settings.
    """

    properties: list[str]
    accuracy: dict[str, list[float]]
    control: dict[str, list[float]]
    chance: dict[str, float]
    n_texts: dict[str, int]
    influence_share: dict[int, float] = field(default_factory=dict)
    config: RepresentationConfig = field(default_factory=RepresentationConfig)

    @property
    def n_layers(self) -> int:
        return len(next(iter(self.accuracy.values())))

    def best_layer(self, prop: str) -> int:
        """Layer with the highest accuracy for ``prop``."""
        return int(np.argmax(self.accuracy[prop]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe": "representation",
            "config": self.config.__dict__,
            "properties": self.properties,
            "accuracy": self.accuracy,
            "control": self.control,
            "chance": self.chance,
            "n_texts": self.n_texts,
            "influence_share_by_block": {str(k): v for k, v in self.influence_share.items()},
        }

    def markdown(self) -> str:
        """One row per layer: accuracy (control) per property, influence share of the block."""
        head = ["layer", *(f"{p} acc (control)" for p in self.properties)]
        if self.influence_share:
            head.append("influence share of block")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for layer in range(self.n_layers):
            name = "embeddings" if layer == 0 else f"block {layer - 1} output"
            cells = [name] + [
                f"{self.accuracy[p][layer]:.3f} ({self.control[p][layer]:.3f})"
                for p in self.properties
            ]
            if self.influence_share:
                share = self.influence_share.get(layer - 1)
                cells.append("—" if share is None else f"{share:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(
            "| chance | "
            + " | ".join(f"{self.chance[p]:.3f}" for p in self.properties)
            + (" | |" if self.influence_share else " |")
        )
        return "\n".join(lines)

    def to_section(self):
        """This result as a section of the studies report (table and plot)."""
        return probe_section(
            "Representation probes: accuracy per layer", self.markdown(), self.svg()
        )

    def svg(self, title: str = "") -> str:
        """Accuracy per layer (and the block's influence share) as a standalone SVG."""
        xs, ys, labels = [], [], []
        layers = list(range(self.n_layers))
        for p in self.properties:
            xs += [layers, layers]
            ys += [self.accuracy[p], self.control[p]]
            labels += [f"{p}", f"{p} (permuted labels)"]
        if self.influence_share:
            blocks = sorted(self.influence_share)
            xs.append([b + 1 for b in blocks])
            ys.append([self.influence_share[b] for b in blocks])
            labels.append("influence share of block")
        return svg_line_plot(
            xs,
            ys,
            labels,
            title=title,
            x_label="layer (0 = embeddings, b + 1 = output of block b)",
            y_label="accuracy / share",
            standalone=True,
        )


def representation_probe(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    properties: Sequence[str],
    config: RepresentationConfig | None = None,
    *,
    text_key: str = "text",
    influence_share: dict[int, float] | None = None,
) -> RepresentationResult:
    """Linear probes of ``properties`` (record keys) on every layer's pooled hidden states.

    Records lacking a property (``None`` or missing) are left out of that property's probe.

    Args:
        model: A model that returns ``hidden_states`` (any Hugging Face causal LM).
        tokenizer: Its tokenizer.
        records: Records with ``text_key`` and the property keys.
        properties: Record keys holding the labels, e.g. ``["relation"]``.
        config: Probe settings.
        text_key: Key of the text.
        influence_share: ``{block: share}`` from :func:`block_influence_share`, shown beside.

    Raises:
        DataError: No properties, a missing text, or labels a probe cannot use.
    """
    config = config or RepresentationConfig()
    if not properties:
        raise DataError("Expected at least one property (a record key), received none.")
    rng = np.random.default_rng(config.seed)
    acc, ctrl, chance, sizes = {}, {}, {}, {}
    for prop in properties:
        chosen = [r for r in records if r.get(prop) is not None]
        if not chosen:
            raise DataError(
                f"No record has a value for property {prop!r}; keys of the first record: "
                f"{sorted(records[0]) if records else []}. Pass a key the records carry."
            )
        missing = [i for i, r in enumerate(chosen) if text_key not in r]
        if missing:
            raise DataError(
                f"Records {missing[:5]} have no {text_key!r} field; pass text_key= the field "
                "that holds the text."
            )
        labels = [r[prop] for r in chosen]
        y = _check_labels(labels, config.folds)
        feats = hidden_features(model, tokenizer, [r[text_key] for r in chosen], pool=config.pool)
        permuted = rng.permutation(y)
        kw = {"folds": config.folds, "c": config.c, "seed": config.seed}
        kw["max_iter"] = config.max_iter
        acc[prop] = [linear_probe_accuracy(f, y, **kw) for f in feats]
        ctrl[prop] = [linear_probe_accuracy(f, permuted, **kw) for f in feats]
        _, counts = np.unique(y, return_counts=True)
        chance[prop] = float(counts.max() / counts.sum())
        sizes[prop] = len(chosen)
    return RepresentationResult(
        properties=list(properties),
        accuracy=acc,
        control=ctrl,
        chance=chance,
        n_texts=sizes,
        influence_share=dict(influence_share or {}),
        config=config,
    )
