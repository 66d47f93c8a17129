"""A small reward model trained from scratch with the Bradley–Terry loss (``arch="gpt2"``).

The model is a ``GPT2ForSequenceClassification`` with one output (the reward, read at the last
non-padding token) on a byte-level BPE tokenizer trained on the pairs' texts
(:func:`influscope.training.train_tokenizer`, :func:`~influscope.training.make_gpt2_config`).
Every parameter is trained and can be tracked, so influence flows through the whole network —
unlike a frozen pretrained encoder with a trained head, where only the head's gradients count
(and which costs ~50 ms per sentence for MiniLM on a 2-core CPU, too slow for the several
passes over the data that a fit, the scores and the baselines need).

Training minimises the mean Bradley–Terry loss ``(1/N) Σ_i −log σ(r(x_i, y_c) − r(x_i, y_r))``
(:class:`~influscope.tasks.RewardTask`) with AdamW, linear warm-up and cosine decay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GPT2ForSequenceClassification, PreTrainedTokenizerFast

from influscope.applications.reward_bias import pair_accuracy, reward_margins
from influscope.config import Settings, require
from influscope.optim import decoupled_adamw
from influscope.tasks import EncodedDataset, RewardTask
from influscope.training import make_gpt2_config, train_tokenizer

__all__ = [
    "RewardModelConfig",
    "build_reward_model",
    "pair_accuracy",
    "reward_margins",
    "train_reward_model",
]


@dataclass(frozen=True)
class RewardModelConfig(Settings):
    """Size and training of the reward model.

    Attributes:
        vocab_size: Upper bound of the BPE vocabulary.
        n_layer: Transformer blocks.
        n_embd: Residual width.
        n_head: Attention heads.
        n_positions: Context length.
        epochs: Passes over the training pairs.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay of the weight matrices.
        batch_size: Pairs per step.
        seed: Seed of the initialisation and the batch order.
    """

    vocab_size: int = 2048
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 128
    epochs: int = 6
    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        require(
            self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}).",
        )
        sizes = (self.n_layer, self.n_positions, self.epochs, self.batch_size)
        require(min(sizes) >= 1 and self.lr > 0, f"Sizes, epochs and lr must be positive: {self}.")


def build_reward_model(
    texts: Sequence[str], config: RewardModelConfig | None = None
) -> tuple[GPT2ForSequenceClassification, PreTrainedTokenizerFast]:
    """Train a tokenizer on ``texts`` and initialise a fresh scalar-head GPT-2 (seeded)."""
    config = config or RewardModelConfig()
    tokenizer = train_tokenizer(texts, config.vocab_size)
    tokenizer.model_max_length = config.n_positions
    gpt2 = make_gpt2_config(
        tokenizer,
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        n_head=config.n_head,
        n_positions=config.n_positions,
    )
    gpt2.num_labels = 1
    torch.manual_seed(config.seed)
    return GPT2ForSequenceClassification(gpt2).eval(), tokenizer


def train_reward_model(
    model: torch.nn.Module,
    data: EncodedDataset,
    config: RewardModelConfig | None = None,
    pad_token_id: int = 0,
) -> list[float]:
    """Minimise the mean Bradley–Terry loss over ``data`` in place; return each epoch's mean loss.

    The same (model initialisation, data, config) give the same model on the same machine.
    """
    config = config or RewardModelConfig()
    task = RewardTask(pad_token_id=pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]  # a frozen encoder stays fixed
    optimizer = decoupled_adamw(params, config.lr, config.weight_decay)
    steps = config.epochs * math.ceil(len(data) / config.batch_size)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        # = cosine_factor(step, steps, warmup, 0.05) up to rounding; this operation order is
        # kept so that the reward figures in docs/applications_reward.md reproduce bit for bit
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (
            1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=generator).tolist()
        total = 0.0
        for first in range(0, len(order), config.batch_size):
            batch = task.collate(
                [data.examples[i] for i in order[first : first + config.batch_size]]
            )
            loss = task.training_loss(model, batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(batch["input_ids"]) / 2
        losses.append(total / len(data))
    model.eval()
    return losses
