"""Sentiment classifier on MiniLM for the mislabel-detection benchmark (``docs/accuracy.md`` (c)).

Data: the 10,605 movie-review sentences of Hutto & Gilbert (2014) with their mean human rating
in ``[-4, 4]`` (:func:`influscope.assets.vader_movie_reviews`); sentences rated exactly 0 are
dropped and the label is the sign of the rating (1 = positive). :func:`movie_review_split` draws
a deterministic train / test split.

Model: the all-MiniLM-L6-v2 encoder (6 BERT layers, width 384) with its lower
``6 - top_layers`` layers **frozen**: their output hidden states are computed once per sentence
(:func:`encoder_states`, cached as safetensors) and the top ``top_layers`` BERT layers plus a
linear head on the masked mean of the token states are trained
(:class:`SentimentClassifier`). With ``top_layers = 0`` the classifier is a head on frozen
sentence embeddings. Training the top layers costs a fraction of a full fine-tune on a CPU
(the frozen layers run once, forward only) while letting the features adapt to the task.

Task: :class:`HiddenStateTask` — examples ``{"h": (T, 384), "attention_mask": (T,),
"labels": ()}``; training loss ``-log p(y | x)``; measurement the margin
``z_y - log Σ_{c≠y} e^{z_c}`` (as :class:`~influscope.tasks.ClassificationTask`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from influscope.config import Settings, require
from influscope.errors import DataError
from influscope.storage import atomic_write_tensors, read_tensors
from influscope.tasks import EncodedDataset, Task, loss_precision, sample_categorical
from influscope.tasks.data import pad_stack

#: Width of all-MiniLM-L6-v2's hidden states.
MINILM_WIDTH = 384
#: Number of encoder layers of all-MiniLM-L6-v2.
MINILM_LAYERS = 6


@dataclass(frozen=True)
class SentimentConfig(Settings):
    """Data split and classifier training of the sentiment benchmark.

    Attributes:
        n_train: Training sentences (drawn at random, deterministic in ``split_seed``).
        n_test: Held-out sentences used to report the classifier's accuracy.
        split_seed: Seed of the train / test draw.
        max_length: Word-piece tokens per sentence (longer ones are truncated).
        top_layers: MiniLM layers trained on top of the frozen ones (0 … 6).
        hidden: Width of the head's hidden GELU layer (0: a linear head).
        epochs: Passes over the training set.
        lr: Peak AdamW learning rate (linear decay to 0).
        weight_decay: AdamW decoupled weight decay.
        batch_size: Training batch size.
        train_seed: Seed of the head's initialisation, the batch order and dropout.
    """

    n_train: int = 3000
    n_test: int = 1000
    split_seed: int = 0
    max_length: int = 64
    top_layers: int = 0
    hidden: int = 64
    epochs: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    train_seed: int = 0

    def __post_init__(self) -> None:
        require(self.n_train >= 10, f"n_train must be ≥ 10, received {self.n_train}.")
        require(self.n_test >= 1, f"n_test must be ≥ 1, received {self.n_test}.")
        require(self.max_length >= 4, f"max_length must be ≥ 4, received {self.max_length}.")
        require(
            0 <= self.top_layers <= MINILM_LAYERS,
            f"top_layers must be in [0, {MINILM_LAYERS}], received {self.top_layers}.",
        )
        require(self.hidden >= 0, f"hidden must be ≥ 0, received {self.hidden}.")
        require(self.epochs >= 1, f"epochs must be ≥ 1, received {self.epochs}.")
        require(self.lr > 0, f"lr must be > 0, received {self.lr}.")
        require(self.weight_decay >= 0, f"weight_decay must be ≥ 0, received {self.weight_decay}.")
        require(self.batch_size >= 1, f"batch_size must be ≥ 1, received {self.batch_size}.")


# ------------------------------------------------------------------------------------------ data


def movie_review_split(
    reviews: list[tuple[str, float]], n_train: int, n_test: int, seed: int = 0
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Drop sentences rated exactly 0, label the rest by sign, draw disjoint train / test sets.

    Args:
        reviews: ``(sentence, mean rating)`` pairs (:func:`influscope.assets.vader_movie_reviews`).
        n_train: Training sentences.
        n_test: Test sentences.
        seed: Seed of the random draw.

    Returns:
        ``(train, test)``, each a list of ``(sentence, label)`` with label 1 = positive.
    """
    rated = [(text, int(rating > 0)) for text, rating in reviews if rating != 0]
    if n_train + n_test > len(rated):
        raise DataError(
            f"Asked for {n_train} train + {n_test} test sentences; only {len(rated)} have a "
            "non-zero rating. Lower n_train / n_test."
        )
    order = torch.randperm(len(rated), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rated[i] for i in order[:n_train]], [
        rated[i] for i in order[n_train : n_train + n_test]
    ]


def load_minilm(model_dir: str | os.PathLike[str]) -> tuple[nn.Module, object]:
    """``(BertModel, tokenizer)`` from the all-MiniLM-L6-v2 directory (eager attention, eval)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    return model, tokenizer


def _states_key(texts: list[str], layer: int, max_length: int, model_dir: Path) -> str:
    """Hash of the inputs, the settings and the weights file (its size and first 64 KiB)."""
    weights = model_dir / "model.safetensors"
    h = hashlib.sha256(json.dumps([layer, max_length, texts, weights.stat().st_size]).encode())
    with open(weights, "rb") as handle:
        h.update(handle.read(1 << 16))
    return h.hexdigest()[:16]


@torch.no_grad()
def encoder_states(
    texts: list[str],
    model_dir: str | os.PathLike[str],
    layer: int,
    max_length: int = 64,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """Hidden states after MiniLM layer ``layer`` (0 = embeddings) for each sentence.

    Sentences are tokenized with special tokens (``[CLS] … [SEP]``) and truncated to
    ``max_length``. With ``cache_dir`` the states are stored there as one safetensors file named
    by a hash of the texts, layer, length and model, and read back on the next call.

    Returns:
        One ``(T_i, 384)`` float32 tensor per sentence (padding removed).
    """
    model_dir = Path(model_dir)
    require(
        0 <= layer <= MINILM_LAYERS, f"layer must be in [0, {MINILM_LAYERS}], received {layer}."
    )
    path = None
    if cache_dir is not None:
        path = (
            Path(cache_dir) / f"minilm-l{layer}-{_states_key(texts, layer, max_length, model_dir)}"
        )
        path = path.with_suffix(".safetensors")
        if path.is_file():
            t = read_tensors(path)
            return list(torch.split(t["states"], t["lengths"].tolist()))
    bert, tokenizer = load_minilm(model_dir)
    out: list[torch.Tensor | None] = [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = bert(**enc, output_hidden_states=True).hidden_states[layer]  # (B, T, 384)
        for j, i in enumerate(idx):
            out[i] = hidden[j, : int(enc["attention_mask"][j].sum())].float().clone()
    states = [t for t in out if t is not None]
    if path is not None:
        atomic_write_tensors(
            path,
            {"states": torch.cat(states), "lengths": torch.tensor([len(t) for t in states])},
        )
    return states


def mean_pooled(states: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each sentence's states replaced by their mean, as one ``(1, 384)`` "token".

    A classifier with ``top_layers = 0`` only sees ``mean_t(h_t)``, so its logits (and every
    gradient of its head) are the same on these inputs, and training and influence passes are
    ``T`` times cheaper.
    """
    return [h.mean(0, keepdim=True) for h in states]


def states_dataset(states: list[torch.Tensor], labels: list[int]) -> EncodedDataset:
    """Examples ``{"h": (T, 384), "attention_mask": (T,), "labels": ()}`` for :class:`HiddenStateTask`."""
    if len(states) != len(labels):
        raise DataError(f"Got {len(states)} sentences but {len(labels)} labels; pass one each.")
    return EncodedDataset(
        [
            {
                "h": h,
                "attention_mask": torch.ones(len(h), dtype=torch.long),
                "labels": torch.tensor(int(y)),
            }
            for h, y in zip(states, labels)
        ]
    )


# ----------------------------------------------------------------------------------------- model


class SentimentClassifier(nn.Module):
    """Top MiniLM layers + masked mean pooling + head.

    ``logits = head(mean_t(h_t))`` with ``h = layer_K(… layer_1(h_in))`` where ``h_in`` are the
    frozen encoder's states (:func:`encoder_states`); ``head`` is ``W_2 GELU(W_1 x + b_1) + b_2``
    (``hidden > 0``) or ``W x + b``.

    Args:
        layers: BERT layers to train (copied), e.g. ``bert.encoder.layer[4:]``; may be empty.
        hidden: Width of the head's hidden layer (0: linear head).
        n_classes: Output classes.
        seed: Seed of the head's initialisation.
    """

    def __init__(
        self, layers: list[nn.Module], hidden: int = 64, n_classes: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in layers)
        torch.manual_seed(seed)
        self.head = (
            nn.Sequential(nn.Linear(MINILM_WIDTH, hidden), nn.GELU(), nn.Linear(hidden, n_classes))
            if hidden
            else nn.Linear(MINILM_WIDTH, n_classes)
        )

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``h``: ``(B, T, 384)``; ``attention_mask``: ``(B, T)`` → logits ``(B, C)``."""
        keep = attention_mask.to(h.dtype)  # (B, T)
        bias = (1.0 - keep)[:, None, None, :] * torch.finfo(h.dtype).min  # (B, 1, 1, T)
        for layer in self.layers:
            h = layer(h, bias)
            h = h[0] if isinstance(h, tuple) else h
        pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)  # (B, 384)
        return self.head(pooled)


def make_classifier(
    model_dir: str | os.PathLike[str], top_layers: int = 0, hidden: int = 64, seed: int = 0
) -> SentimentClassifier:
    """A :class:`SentimentClassifier` starting from MiniLM's top ``top_layers`` layers."""
    layers: list[nn.Module] = []
    if top_layers:
        bert, _ = load_minilm(model_dir)
        layers = list(bert.encoder.layer)[MINILM_LAYERS - top_layers :]
    return SentimentClassifier(layers, hidden=hidden, seed=seed)


class HiddenStateTask(Task):
    """Classification from precomputed encoder states (see :class:`SentimentClassifier`)."""

    name = "hidden_state_classification"

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(e["h"]) for e in examples)
        h = torch.zeros(
            len(examples), length, examples[0]["h"].shape[-1], dtype=examples[0]["h"].dtype
        )
        for i, e in enumerate(examples):
            h[i, : len(e["h"])] = e["h"]
        return {
            "h": h,  # (B, T, 384)
            "attention_mask": pad_stack([e["attention_mask"] for e in examples], 0),  # (B, T)
            "labels": torch.stack([e["labels"] for e in examples]),  # (B,)
        }

    def outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(batch["h"].to(device), batch["attention_mask"].to(device))  # (B, C)

    def loss_from_outputs(self, outputs, batch, sample_seeds=None) -> torch.Tensor:
        y = batch["labels"].to(outputs.device)
        if sample_seeds is not None:
            y = sample_categorical(outputs, sample_seeds)
        return F.cross_entropy(loss_precision(outputs), y, reduction="none")

    def training_loss(self, model, batch, sample_seeds=None) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(model, batch), batch, sample_seeds)

    def measurement(self, model, batch) -> torch.Tensor:
        logits = loss_precision(self.outputs(model, batch))  # (B, C)
        y = batch["labels"].to(logits.device)
        others = logits.scatter(1, y[:, None], float("-inf"))
        return logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(others, dim=1)


# -------------------------------------------------------------------------------------- training


def train_classifier(
    model: SentimentClassifier, train: EncodedDataset, config: SentimentConfig
) -> SentimentClassifier:
    """AdamW with linear learning-rate decay, dropout on, shuffled batches; returns ``model.eval()``."""
    task = HiddenStateTask()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(train) // config.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    g = torch.Generator().manual_seed(config.train_seed)
    torch.manual_seed(config.train_seed)  # dropout
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(train), generator=g).tolist()
        for start in range(0, len(order), config.batch_size):
            batch = task.collate(
                [train.examples[i] for i in order[start : start + config.batch_size]]
            )
            loss = task.training_loss(model, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, data: EncodedDataset, batch_size: int = 128) -> torch.Tensor:
    """Logits ``(N, C)`` of ``model`` (in eval mode) on ``data``."""
    task = HiddenStateTask()
    model.eval()
    return torch.cat([task.outputs(model, task.collate(ex)) for _, ex in data.batches(batch_size)])


def accuracy(model: nn.Module, data: EncodedDataset, batch_size: int = 128) -> float:
    """Share of ``data`` whose label is the arg-max class."""
    y = torch.stack([e["labels"] for e in data.examples])
    return float((predict(model, data, batch_size).argmax(1) == y).double().mean())
