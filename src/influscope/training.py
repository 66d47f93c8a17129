"""Train a small GPT-2 and its tokenizer from scratch (the library's bottom layer).

Generic pieces that the demo, the probes and the benchmarks share; nothing here knows the
demo's corpus:

1. :func:`train_tokenizer` — byte-level BPE (``tokenizers``) on the texts, wrapped as a
   ``transformers`` fast tokenizer; ``<|endoftext|>`` is bos, eos, pad and unk. It adds no special
   tokens: ``tokenizer(text)["input_ids"]`` is exactly what the model was trained on.
2. :func:`make_gpt2_config` — a ``GPT2Config`` with dropout off (influence functions assume a
   deterministic loss).
3. :func:`train_lm` — AdamW on the causal-LM loss of each record's ``text``. The objective is
   the one influence functions assume (DESIGN.md §1): the mean over sequences of the *summed*
   token cross-entropies, J(θ) = (1/N) Σ_i Σ_t −log p(x_{i,t} | x_{i,<t}). It is a plain function of
   (records, subset, seed), so a retraining harness (LOO, LDS) can call it on index subsets.
4. :func:`evaluate_queries` — log-probability of each query's completion after its prompt.

:func:`fixed_threads` pins torch's intra-op thread count for reproducible CPU training. The
demo (:mod:`influscope.demo.train`) builds its model from these.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from influscope.errors import ConfigError, DataError
from influscope.optim import adamw_cosine

__all__ = [
    "EOT",
    "Checkpoint",
    "QueryEval",
    "TrainResult",
    "evaluate_queries",
    "fixed_threads",
    "make_gpt2_config",
    "sequence_losses",
    "train_lm",
    "train_tokenizer",
]

logger = logging.getLogger(__name__)

EOT = "<|endoftext|>"


@contextmanager
def fixed_threads(n: int | None) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(n)`` and restore the previous count after.

    CPU kernels split their reductions (matmul, sums) over the intra-op threads, so the float
    rounding — and, over hundreds of AdamW steps, the trained weights — depend on the thread
    count, which by default is the number of cores of the machine. A fixed count makes a run
    reproducible across machines; ``None`` leaves torch's setting alone.
    """
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_tokenizer(
    texts: Sequence[str], vocab_size: int = 4096, *, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style, no prefix space) on ``texts``.

    Args:
        texts: Training texts.
        vocab_size: Upper bound of the vocabulary, special token included (a small corpus may
            yield fewer merges).
        min_frequency: Minimum count of a pair to be merged.

    Returns:
        A fast tokenizer with ``<|endoftext|>`` as bos/eos/pad/unk token (id 0).

    Raises:
        ConfigError: ``vocab_size`` is not above the 257 byte-level symbols.
    """
    if vocab_size <= 257:
        raise ConfigError(f"vocab_size must exceed 257 (bytes + {EOT}), got {vocab_size}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT
    )


def make_gpt2_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 128,
) -> GPT2Config:
    """Return a small ``GPT2Config`` for ``tokenizer``, dropout off, embeddings tied."""
    if n_embd % n_head:
        raise ConfigError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head}).")
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@dataclass
class Checkpoint:
    """A copy of the parameters taken during :func:`train_lm` (for TracIn, Pruthi et al. 2020).

    Attributes:
        step: Optimizer steps taken when the copy was made.
        lr: Learning rate of the step that produced these parameters (the schedule's value for
            step ``step``), the ``η_k`` weight of TracIn-CP.
        state_dict: Detached copies of the model's tensors (``GPT2LMHeadModel.load_state_dict``).
    """

    step: int
    lr: float
    state_dict: dict[str, torch.Tensor]

    def model(self, config: GPT2Config) -> GPT2LMHeadModel:
        """A fresh model (eval mode) holding this checkpoint's parameters."""
        model = GPT2LMHeadModel(config)
        model.load_state_dict(self.state_dict)
        return model.eval()


@dataclass
class TrainResult:
    """What :func:`train_lm` returns.

    Attributes:
        model: The trained model, in eval mode.
        epoch_losses: Mean per-sequence loss (summed over tokens) of each epoch.
        seconds: Wall-clock training time.
        cpu_seconds: CPU time of this process during training (all threads); on an idle machine
            with one torch thread it equals ``seconds``.
        steps: Optimizer steps taken.
        stopped_early: Whether ``time_budget_s`` ended training before ``epochs``.
        checkpoints: Parameter copies every ``checkpoint_every`` steps (empty by default).
        optimizer: The AdamW optimizer after training, when ``keep_optimizer`` is set.
    """

    model: GPT2LMHeadModel
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    steps: int = 0
    stopped_early: bool = False
    checkpoints: list[Checkpoint] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None


def _encode(records: Sequence[dict[str, Any]], tokenizer: Any, max_len: int) -> list[list[int]]:
    ids = [tokenizer(r["text"])["input_ids"][:max_len] for r in records]
    if any(len(x) < 2 for x in ids):
        raise DataError("Every record's text must encode to at least 2 tokens.")
    return ids


def _batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)  # (B, T)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(seq)] = torch.tensor(seq)
    return input_ids, labels


def sequence_losses(
    model: GPT2LMHeadModel, input_ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Return each sequence's summed next-token cross-entropy, shape ``(B,)``.

    ``labels`` is ``-100`` at padding; position t's hidden state predicts token t + 1. The
    LM head (the largest matrix of a small-vocabulary model) runs only on positions that have a
    target, so padding costs no head compute.
    """
    mask = (labels != -100).long()  # (B, T)
    hidden = model.transformer(
        input_ids=input_ids, attention_mask=mask
    ).last_hidden_state  # (B, T, D)
    targets = labels[:, 1:]  # (B, T-1)
    rows, cols = (targets != -100).nonzero(as_tuple=True)  # (M,), (M,)
    logits = model.lm_head(hidden[rows, cols])  # (M, V)
    nll = torch.nn.functional.cross_entropy(logits, targets[rows, cols], reduction="none")  # (M,)
    return torch.zeros(len(input_ids), dtype=nll.dtype).index_add(0, rows, nll)  # (B,)


def train_lm(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerFast,
    config: GPT2Config,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    subset: Sequence[int] | None = None,
    time_budget_s: float | None = None,
    warmup_frac: float = 0.05,
    init: GPT2LMHeadModel | None = None,
    on_epoch_end: Callable[[int, GPT2LMHeadModel], None] | None = None,
    checkpoint_every: int | None = None,
    keep_optimizer: bool = False,
) -> TrainResult:
    """Train ``GPT2LMHeadModel(config)`` (fresh, or a copy of ``init``) on the records' ``text``.

    Minimises J(θ) = (1/N) Σ_i L(z_i, θ) with L the summed token cross-entropy of sequence z_i,
    using AdamW (decoupled weight decay on weight matrices only, not on biases and LayerNorm),
    linear warm-up over ``warmup_frac`` of the steps, cosine decay to 0.1 × ``lr``, gradient
    clipping at norm 1. Initialisation and batch order depend only on ``seed``, so the same
    (records, subset, seed) reproduce the same model on the same machine.

    Args:
        records: Training records with a ``"text"`` key.
        tokenizer: Tokenizer from :func:`train_tokenizer`; texts are truncated to
            ``config.n_positions`` tokens.
        config: Model configuration (:func:`make_gpt2_config`).
        epochs: Passes over the (subset of) records.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        batch_size: Sequences per step.
        seed: Seed of the initialisation and of the batch order.
        subset: Indices into ``records`` to train on (default: all), e.g. for leave-one-out or
            LDS retraining; an index listed r times is visited r times per epoch (up-weighting).
        time_budget_s: Stop after this many seconds (breaks reproducibility across machines;
            leave ``None`` for retraining experiments).
        warmup_frac: Fraction of the steps spent warming up.
        init: Start from a copy of this model instead of a fresh initialisation (fine-tuning;
            ``init`` itself is left untouched).
        on_epoch_end: Called as ``on_epoch_end(epoch, model)`` after each epoch (e.g. to keep
            checkpoints); the model is in train mode and keeps training afterwards.
        checkpoint_every: Keep a :class:`Checkpoint` (a copy of every parameter and the
            step's learning rate) after every ``checkpoint_every`` optimizer steps, e.g. for
            TracIn. Copying changes neither the random streams nor the trained model.
        keep_optimizer: Return the AdamW optimizer in :attr:`TrainResult.optimizer` (its
            second moments are what TrackStar's index scaling reads).

    Returns:
        The trained model (eval mode) with its loss history (and checkpoints, if asked).

    Raises:
        ConfigError: A non-positive ``epochs``, ``lr``, ``batch_size`` or
            ``checkpoint_every``.
        DataError: An empty subset or a text shorter than 2 tokens.
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ConfigError(
            f"Need epochs >= 1, lr > 0, batch_size >= 1; got {epochs}, {lr}, {batch_size}."
        )
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigError(
            f"checkpoint_every must be a positive number of steps or None, got {checkpoint_every}."
        )
    chosen = [records[i] for i in subset] if subset is not None else list(records)
    if not chosen:
        raise DataError("No records to train on (empty subset).")
    seqs = _encode(chosen, tokenizer, config.n_positions)
    pad_id = tokenizer.pad_token_id

    torch.manual_seed(seed)
    model = copy.deepcopy(init) if init is not None else GPT2LMHeadModel(config)
    model.train()
    total = epochs * math.ceil(len(seqs) / batch_size)
    optimizer, scheduler = adamw_cosine(
        model.parameters(), lr, weight_decay, total, max(1, int(warmup_frac * total)), floor=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    result = TrainResult(model=model)
    start, cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        order = torch.randperm(len(seqs), generator=generator).tolist()
        total_loss = 0.0
        for first in range(0, len(order), batch_size):
            input_ids, labels = _batch([seqs[i] for i in order[first : first + batch_size]], pad_id)
            losses = sequence_losses(model, input_ids, labels)  # (B,)
            loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            step_lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            result.steps += 1
            if checkpoint_every is not None and result.steps % checkpoint_every == 0:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                result.checkpoints.append(Checkpoint(result.steps, step_lr, state))
            total_loss += float(losses.detach().sum())
        result.epoch_losses.append(total_loss / len(seqs))
        logger.info("epoch %d/%d loss %.3f", epoch + 1, epochs, result.epoch_losses[-1])
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            result.stopped_early = epoch + 1 < epochs
            break
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    result.optimizer = optimizer if keep_optimizer else None
    model.eval()
    return result


@dataclass
class QueryEval:
    """Log-probabilities of query completions under a model.

    Attributes:
        logprob: Per query, log p(completion | prompt) summed over completion tokens.
        first_logprob: Per query, log-probability of the completion's first token.
        first_top1: Per query, whether that first token is the model's top-1 prediction.
        greedy_match: Per query, whether every completion token is the top-1 prediction.
    """

    logprob: list[float]
    first_logprob: list[float]
    first_top1: list[bool]
    greedy_match: list[bool]

    def summary(self) -> dict[str, float]:
        """Means over the queries."""
        n = max(1, len(self.logprob))
        return {
            "mean_logprob": sum(self.logprob) / n,
            "mean_first_token_logprob": sum(self.first_logprob) / n,
            "first_token_top1_accuracy": sum(self.first_top1) / n,
            "greedy_match_accuracy": sum(self.greedy_match) / n,
        }


@torch.no_grad()
def evaluate_queries(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, queries: Sequence[dict[str, Any]]
) -> QueryEval:
    """Score each query's ``completion`` after its ``prompt`` (no special tokens added)."""
    out = QueryEval([], [], [], [])
    model.eval()
    for query in queries:
        prompt = tokenizer(query["prompt"])["input_ids"]
        completion = tokenizer(query["completion"])["input_ids"]
        ids = torch.tensor([prompt + completion])  # (1, P + C)
        logprobs = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)  # (C, V)
        target = torch.tensor(completion)  # (C,)
        token_lp = logprobs.gather(1, target[:, None])[:, 0]  # (C,)
        top1 = logprobs.argmax(-1) == target  # (C,)
        out.logprob.append(float(token_lp.sum()))
        out.first_logprob.append(float(token_lp[0]))
        out.first_top1.append(bool(top1[0]))
        out.greedy_match.append(bool(top1.all()))
    return out
