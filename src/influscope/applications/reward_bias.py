"""Find the training pairs that taught a reward model a bias (Min et al., ACL 2025).

Min, Lee, Kwon & Lee, "Understanding Impact of Human Feedback via Influence Functions"
(ACL 2025, arXiv 2501.05790): collect a small **targeted validation set** V of preference pairs
in which the behaviour the bias harms is preferred (the shorter response; the response that does
not flatter the user's opinion), and rank every training pair z by its influence on the reward
model's fit of V. With the measurement

    f(θ) = Σ_{v ∈ V} log σ(r_θ(x_v, y_v^c) − r_θ(x_v, y_v^r))      (= −validation BT loss)

the influence of z is ``I(z) = −∇f(θ)ᵀ (G + λI)⁻¹ ∇L(z, θ) = df/dε`` (influscope's sign
convention: positive = up-weighting z raises f). Pairs whose up-weighting *lowers* f — makes the
model prefer the biased response on V — are the suspects, so the **suspicion** is ``−I(z)``.
Because influence is linear in the query gradient, the preconditioned gradients of the
validation pairs are summed into one query before the training pass.

Baselines (higher = more suspicious): ``gradient_dot`` (the same with ``G = I``, one-checkpoint
TracIn), ``self_influence`` (``∇Lᵀ (G + λI)⁻¹ ∇L``, Koh & Liang's mislabel detector), ``loss``
(the training pair's Bradley–Terry loss) and ``random``. All but the targeted scores are blind to
*which* behaviour is wrong: they find hard-to-fit labels of any kind.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from influscope.analyzer import Influence
from influscope.config import FitConfig, ScoreConfig, Settings, require
from influscope.errors import DataError
from influscope.metrics import found_at, roc_auc
from influscope.scoring.queries import PreconditionedQueries
from influscope.tasks import EncodedDataset, RewardTask

__all__ = [
    "BASELINES",
    "BiasDetectionConfig",
    "BiasRanking",
    "PreferenceLikelihoodTask",
    "default_reward_modules",
    "pair_accuracy",
    "rank_biased_pairs",
    "reward_margins",
    "sum_queries",
]

#: Scores computed besides the targeted influence, in this order.
BASELINES = ("gradient_dot", "self_influence", "loss", "random")
MEASUREMENTS = ("log_likelihood", "margin")


class PreferenceLikelihoodTask(RewardTask):
    """Bradley–Terry task whose measurement is ``log σ(r_c − r_r)`` (minus the pair's loss)."""

    name = "reward_likelihood"

    def measurement(self, model, batch) -> torch.Tensor:
        return F.logsigmoid(self.outputs(model, batch))  # (B,)


@dataclass(frozen=True)
class BiasDetectionConfig(Settings):
    """How the training pairs are ranked.

    Attributes:
        curvature: Curvature of the targeted influence (``ekfac``, ``kfac``, ``diagonal``,
            ``identity``).
        measurement: ``"log_likelihood"`` (``log σ(margin)`` of each validation pair, as Min et
            al.'s validation loss) or ``"margin"`` (``r_c − r_r``).
        damping_factor: EK-FAC damping relative to the mean eigenvalue of each layer.
        batch_size: Pairs per pass.
        baselines: Which of :data:`BASELINES` to compute as well.
        seed: Seed of the true-Fisher labels and of the ``random`` baseline.
    """

    curvature: str = "ekfac"
    measurement: str = "log_likelihood"
    damping_factor: float = 0.1
    batch_size: int = 64
    baselines: tuple[str, ...] = BASELINES
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "baselines", tuple(self.baselines))
        require(
            self.measurement in MEASUREMENTS,
            f"measurement must be one of {MEASUREMENTS}, received {self.measurement!r}.",
        )
        unknown = sorted(set(self.baselines) - set(BASELINES))
        require(not unknown, f"Unknown baselines {unknown}; known: {list(BASELINES)}.")
        # Validates curvature, damping and batch size with the stage's own checks.
        self.fit_config()
        ScoreConfig(query_rank=None, batch_size=self.batch_size)

    def fit_config(self, curvature: str | None = None) -> FitConfig:
        return FitConfig(
            curvature=curvature or self.curvature,
            damping_factor=self.damping_factor,
            batch_size=self.batch_size,
            seed=self.seed,
        )


@dataclass
class BiasRanking:
    """Suspicion of every training pair under each method (higher = inspect first).

    Attributes:
        scores: ``{method: (N,) array}``; ``"influence"`` is the targeted influence.
        influence: ``(N,)`` the raw targeted influence ``df/dε`` (``scores["influence"]`` is
            its negative).
        seconds: Wall-clock seconds per method.
    """

    scores: dict[str, np.ndarray]
    influence: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    def order(self, method: str = "influence") -> np.ndarray:
        """Training indices, most suspicious first."""
        return np.argsort(-self.scores[method], kind="stable")

    def auc(self, positives: np.ndarray | Sequence[bool]) -> dict[str, float]:
        """ROC-AUC of each method for the known biased pairs (e.g. the flipped labels)."""
        return {m: roc_auc(s, np.asarray(positives, dtype=float)) for m, s in self.scores.items()}

    def found(self, positives: np.ndarray | Sequence[bool], fraction: float) -> dict[str, float]:
        """Share of the biased pairs among the top ``fraction`` of each ranking."""
        pos = np.asarray(positives, dtype=float)
        return {m: found_at(s, pos, fraction) for m, s in self.scores.items()}


def sum_queries(pq: PreconditionedQueries) -> PreconditionedQueries:
    """One query whose preconditioned gradient is the sum of all queries' (exact by linearity;
    the summed query is dense, so score it with ``query_rank=None``)."""
    dense = {name: pq.matrix(name).sum(0, keepdim=True) for name in pq.layer_names}  # (1,out,in)
    total = None if pq.measurements is None else pq.measurements.sum().reshape(1)
    return PreconditionedQueries(pq.layer_names, dense, {}, total)


def default_reward_modules(model: torch.nn.Module) -> str:
    """``"head"`` for a frozen-encoder reward model, else the ``"all"`` preset."""
    from influscope.applications.reward_encoder import FrozenEncoderReward

    return "head" if isinstance(model, FrozenEncoderReward) else "all"


@torch.no_grad()
def reward_margins(
    model: torch.nn.Module, data: EncodedDataset, batch_size: int = 64, pad_token_id: int = 0
) -> torch.Tensor:
    """``r(chosen) − r(rejected)`` of every pair, shape ``(N,)``."""
    task = RewardTask(pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    out = []
    for first in range(0, len(data), batch_size):
        batch = task.collate(data.examples[first : first + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        out.append(task.outputs(model, batch).cpu())
    return torch.cat(out)


def pair_accuracy(model: torch.nn.Module, data: EncodedDataset, pad_token_id: int = 0) -> float:
    """Share of pairs whose chosen response gets the higher reward."""
    return float((reward_margins(model, data, pad_token_id=pad_token_id) > 0).double().mean())


def _timed(seconds: dict[str, float], name: str, start: float) -> None:
    seconds[name] = time.perf_counter() - start


def rank_biased_pairs(
    model: torch.nn.Module,
    tokenizer,
    train: Sequence[dict] | EncodedDataset,
    validation: Sequence[dict] | EncodedDataset,
    config: BiasDetectionConfig | None = None,
    modules: str | Sequence[str] | None = None,
    device: str | torch.device | None = None,
    run_dir: str | None = None,
) -> BiasRanking:
    """Rank training preference pairs by how much they push the model against ``validation``.

    Args:
        model: A reward model: ``model(input_ids=, attention_mask=).logits`` of shape
            ``(B, 1)`` (a Hugging Face sequence classifier with one label, or
            :class:`~influscope.applications.reward_encoder.FrozenEncoderReward`).
        tokenizer: Its tokenizer (``pad_token_id`` is used for padding, 0 if unset).
        train: Training pairs ``{"prompt", "chosen", "rejected"}`` (records or encoded).
        validation: The targeted validation pairs: the behaviour the bias harms is
            ``chosen`` (see :func:`~influscope.applications.reward_data.select_targeted`).
        config: Curvature, measurement and baselines.
        modules: Tracked modules (default :func:`default_reward_modules`).
        device: Where to run (default CUDA when available).
        run_dir: Optional run directory for the curvature factors.

    Returns:
        The suspicion of every training pair under the targeted influence and the baselines.

    Raises:
        DataError: Empty training or validation data.
    """
    config = config or BiasDetectionConfig()
    if len(train) == 0 or len(validation) == 0:
        raise DataError(
            f"Need training and validation pairs; received {len(train)} and {len(validation)}."
        )
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    task = (
        PreferenceLikelihoodTask(pad) if config.measurement == "log_likelihood" else RewardTask(pad)
    )
    inf = Influence(
        model, task, modules or default_reward_modules(model), run_dir, tokenizer, device=device
    )
    train_data = train if isinstance(train, EncodedDataset) else inf.encode(list(train))
    val_data = (
        validation if isinstance(validation, EncodedDataset) else inf.encode(list(validation))
    )
    score_cfg = ScoreConfig(query_rank=None, batch_size=config.batch_size)  # one summed query
    seconds: dict[str, float] = {}

    def targeted(curvature: str):
        start = time.perf_counter()
        op = inf.fit(train_data, config.fit_config(curvature), name=f"factors_{curvature}")
        pq = sum_queries(inf.precondition(val_data, op, score_cfg))
        influence = inf.score(pq, train_data, op, score_cfg).pairwise[0]  # (N,)
        return op, influence.double().cpu().numpy(), start

    op, influence, start = targeted(config.curvature)
    scores = {"influence": -influence}
    _timed(seconds, "influence", start)
    if "gradient_dot" in config.baselines:
        _, dot, start = targeted("identity")
        scores["gradient_dot"] = -dot
        _timed(seconds, "gradient_dot", start)
    if "self_influence" in config.baselines:
        start = time.perf_counter()
        si = inf.self_influence(train_data, op, batch_size=config.batch_size)
        scores["self_influence"] = si.double().cpu().numpy()
        _timed(seconds, "self_influence", start)
    if "loss" in config.baselines:
        start = time.perf_counter()
        margins = reward_margins(inf.tracked.model, train_data, config.batch_size, pad)
        scores["loss"] = (-F.logsigmoid(margins.double())).numpy()
        _timed(seconds, "loss", start)
    if "random" in config.baselines:
        scores["random"] = np.random.default_rng(config.seed).random(len(train_data))
    return BiasRanking(scores=scores, influence=influence, seconds=seconds)
