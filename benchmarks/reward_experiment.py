"""One reward-bias detection experiment: draw pairs, train a reward model, rank, score the ranking.

    reviews ─▶ make_preference_data (hidden rule + biased flips) ─▶ train reward model (BT loss)
            ─▶ rank_biased_pairs (targeted influence + baselines) ─▶ ROC-AUC vs the flip mask

Used by ``python -m benchmarks.reward_bias`` (the measured table in ``docs/applications_reward.md``)
and, at reduced size, by the test suite.

Reward models (:data:`ARCHS`):

* ``"minilm"`` (default) — frozen ``all-MiniLM-L6-v2`` sentence embedding + a two-layer head
  (:class:`~influscope.applications.reward_encoder.FrozenEncoderReward`); influence over the head.
* ``"gpt2"`` — a 2-layer, width-32 GPT-2 with a scalar head trained from scratch
  (:mod:`benchmarks.reward_model`); influence over every linear layer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.reward_model import (
    RewardModelConfig,
    build_reward_model,
    reward_margins,
    train_reward_model,
)
from influscope.applications.reward_bias import BiasDetectionConfig, rank_biased_pairs
from influscope.applications.reward_data import PreferenceConfig, make_preference_data
from influscope.config import Settings, require
from influscope.metrics import roc_auc
from influscope.storage import atomic_write_json
from influscope.storage.atomic import atomic_write
from influscope.tasks import RewardTask

__all__ = ["ARCHS", "BiasExperimentConfig", "run_bias_experiment"]

ARCHS = ("minilm", "gpt2")


@dataclass(frozen=True)
class BiasExperimentConfig(Settings):
    """Data, reward model and training of one experiment.

    Attributes:
        data: How the preference pairs are drawn (bias, sizes, flip fractions, seed).
        arch: ``"minilm"`` or ``"gpt2"`` (see module docstring).
        hidden: Hidden width of the MiniLM head.
        train: Training settings (for ``gpt2`` also the model size); its ``seed`` is replaced
            by ``data.seed``.
    """

    data: PreferenceConfig = field(default_factory=PreferenceConfig)
    arch: str = "minilm"
    hidden: int = 32
    train: RewardModelConfig = field(
        default_factory=lambda: RewardModelConfig(epochs=10, lr=1e-2, weight_decay=0.01)
    )

    def __post_init__(self) -> None:
        require(self.arch in ARCHS, f"arch must be one of {ARCHS}, received {self.arch!r}.")
        require(self.hidden >= 1, f"hidden must be ≥ 1, received {self.hidden}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data.to_dict(),
            "arch": self.arch,
            "hidden": self.hidden,
            "train": self.train.to_dict(),
        }


#: Defaults of the from-scratch GPT-2 (measured: more epochs memorise the pairs).
GPT2_TRAIN = RewardModelConfig(n_layer=2, n_embd=32, epochs=3, lr=3e-3, weight_decay=0.01)


def _build(config: BiasExperimentConfig, texts: list[str], encoder_dir, memo):
    from dataclasses import replace

    seed = config.data.seed
    if config.arch == "gpt2":
        train_cfg = replace(config.train, seed=seed)
        model, tok = build_reward_model(texts, train_cfg)
        return model, tok, train_cfg
    from transformers import AutoModel, AutoTokenizer

    from influscope.applications.reward_encoder import FrozenEncoderReward, encoder_memo
    from influscope.assets import minilm_dir

    encoder_dir = Path(encoder_dir) if encoder_dir else minilm_dir()
    model = FrozenEncoderReward(
        AutoModel.from_pretrained(encoder_dir),
        hidden=config.hidden,
        seed=seed,
        encoder_dir=str(encoder_dir.resolve()),
        memo=memo if memo is not None else encoder_memo(encoder_dir),
    )
    return model, AutoTokenizer.from_pretrained(encoder_dir), replace(config.train, seed=seed)


def _accuracy(margins: torch.Tensor, mask: Sequence[bool] | None = None) -> float:
    m = margins if mask is None else margins[torch.as_tensor(np.asarray(mask, dtype=bool))]
    return float((m > 0).double().mean()) if len(m) else float("nan")


def run_bias_experiment(
    reviews: Sequence[tuple[str, float]],
    config: BiasExperimentConfig | None = None,
    detection: BiasDetectionConfig | None = None,
    encoder_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    memo: dict | None = None,
) -> dict[str, Any]:
    """Run one experiment and return its figures.

    Args:
        reviews: ``(sentence, rating)`` pairs (:func:`influscope.assets.vader_movie_reviews`).
        config: Data, model and training.
        detection: How pairs are ranked (default :class:`BiasDetectionConfig`).
        encoder_dir: The MiniLM directory (default: the ``minilm`` asset).
        out_dir: If given, the trained model, ``train.jsonl``, ``validation.jsonl`` and
            ``result.json`` are written there (the model and files ``influscope bias`` reads).
        memo: Memo of encoder embeddings (default: the process-wide one of the encoder).

    Returns:
        ``{"auc": {method: AUC}, "found@10%": {...}, "accuracy": {...}, ...}``; the AUCs are
        against the mask of labels flipped by the bias.
    """
    config = config or BiasExperimentConfig()
    detection = detection or BiasDetectionConfig()
    start = time.perf_counter()
    data = make_preference_data(reviews, config.data)
    texts = [r["prompt"] + r[s] for r in data.train for s in ("chosen", "rejected")]
    model, tok, train_cfg = _build(config, texts, encoder_dir, memo)
    pad = tok.pad_token_id or 0
    task = RewardTask(pad)
    limit = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    train, val, test = (
        task.encode(d, tok, limit) for d in (data.train, data.validation, data.test)
    )
    losses = train_reward_model(model, train, train_cfg, pad)
    trained = time.perf_counter()
    ranking = rank_biased_pairs(model, tok, train, val, detection, device="cpu")
    test_m = reward_margins(model, test, pad_token_id=pad)
    groups = (
        {"good_longer": [r["good_longer"] for r in data.test]}
        if config.data.bias == "length"
        else {"negative_opinion": [r["opinion"] == "negative" for r in data.test]}
    )
    accuracy = {
        "train": _accuracy(reward_margins(model, train, pad_token_id=pad)),
        "validation": _accuracy(reward_margins(model, val, pad_token_id=pad)),
        "test": _accuracy(test_m),
    }
    for name, mask in groups.items():
        accuracy[f"test[{name}]"] = _accuracy(test_m, mask)
        accuracy[f"test[not {name}]"] = _accuracy(test_m, [not x for x in mask])
    result = {
        "config": config.to_dict(),
        "detection": detection.to_dict(),
        "n_flipped": int(data.flipped.sum()),
        "n_noise": int(data.noise.sum()),
        "auc": ranking.auc(data.flipped),
        "found@10%": ranking.found(data.flipped, 0.1),
        "accuracy": accuracy,
        "final_train_loss": losses[-1],
        "seconds": {
            "data_and_training": trained - start,
            **ranking.seconds,
            "total": time.perf_counter() - start,
        },
    }
    if config.data.noise_fraction > 0:  # can a method tell biased flips from other wrong labels?
        wrong = data.flipped | data.noise
        result["auc_any_wrong_label"] = ranking.auc(wrong)
        result["auc_biased_vs_other_wrong"] = {
            m: roc_auc(s[wrong], data.flipped[wrong].astype(float))
            for m, s in ranking.scores.items()
        }
    if out_dir is not None:
        _save(Path(out_dir), model, tok, data, result)
    return result


def _save(out: Path, model, tok, data, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save"):
        model.save(out / "model")
    else:
        model.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
    for name, records in (("train", data.train), ("validation", data.validation)):
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(out / f"{name}.jsonl", lambda tmp, text=text: Path(tmp).write_text(text))
    atomic_write_json(out / "result.json", result)
