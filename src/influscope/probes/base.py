"""What every probe shares: scoring completions and texts, hidden states, influence alongside.

A *probe* measures how a model generalises without influence functions (held-out loss and
accuracy, accuracy against length or number of demonstrations, linear decodability of a
property) and puts that measurement next to what influence says about the same examples. The
shared pieces, in the order a probe uses them:

1. :func:`check_context` — refuse sequences longer than the model's context, with the fix.
2. :func:`completion_scores` — per ``{"prompt", "completion"}`` record, the summed
   log-probability ``log p(c | p) = Σ_t log p(c_t | p, c_{<t})``, whether every completion token
   is the model's top-1 (greedy) prediction, and whether the first one is.
3. :func:`text_scores` — per ``{"text"}`` record, the mean token loss
   ``(1/(T-1)) Σ_t −log p(x_t | x_{<t})`` and next-token accuracy.
4. :func:`hidden_features` — pooled hidden states of every layer, ``(L + 1, N, D)``.
5. :class:`InfluenceSide` — one EK-FAC fit on the training records, then per-query scores
   (optionally per layer) for the probe's examples.

Tokenisation adds no special tokens unless ``add_bos`` is set: the demo model was trained on
``tokenizer(text)["input_ids"]`` with none (:func:`influscope.training.train_lm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from influscope.errors import ConfigError, DataError
from influscope.tasks import context_length

__all__ = [
    "CompletionScores",
    "InfluenceSide",
    "TextScores",
    "check_context",
    "completion_scores",
    "encode_completion",
    "hidden_features",
    "probe_section",
    "text_scores",
]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix(tokenizer: Any, add_bos: bool) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if add_bos and bos is not None else []


def check_context(model: nn.Module, n_tokens: int, what: str, fix: str) -> None:
    """Raise :class:`DataError` when ``n_tokens`` exceeds the model's context.

    Args:
        model: The model (its config's ``n_positions`` / ``max_position_embeddings``).
        n_tokens: Length of the longest sequence the probe would feed it.
        what: What that sequence is, for the message.
        fix: How to make it fit, for the message.
    """
    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        raise DataError(
            f"{what} has {n_tokens} tokens, but the model's context is {limit} tokens "
            f"(expected at most {limit}). {fix}"
        )


def encode_completion(
    tokenizer: Any, record: dict[str, Any], index: int, add_bos: bool = False
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` of a ``{"prompt", "completion"}`` record.

    Raises:
        DataError: The record lacks the keys or its completion has no tokens.
    """
    if "prompt" not in record or "completion" not in record:
        raise DataError(
            f"Record {index + 1} has keys {sorted(record)}; this probe expected 'prompt' and "
            "'completion' (the completion is what is scored). Convert the record, e.g. split "
            "a 'text' before its last word."
        )
    prompt = _prefix(tokenizer, add_bos) + _ids(tokenizer, str(record["prompt"]))
    completion = _ids(tokenizer, str(record["completion"]))
    if not completion or not prompt:
        raise DataError(
            f"Record {index + 1} has an empty prompt or completion after tokenisation "
            f"(prompt {record['prompt']!r}, completion {record['completion']!r}); give both "
            "at least one token."
        )
    return prompt, completion


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@dataclass(frozen=True)
class CompletionScores:
    """Scores of ``{"prompt", "completion"}`` records.

    Attributes:
        logprob: ``(N,)`` ``log p(completion | prompt)``, summed over completion tokens.
        n_tokens: ``(N,)`` completion tokens.
        correct: ``(N,)`` every completion token is the top-1 prediction (teacher forcing).
        first_correct: ``(N,)`` the first completion token is the top-1 prediction.
        lengths: ``(N,)`` prompt + completion tokens fed to the model.
    """

    logprob: np.ndarray
    n_tokens: np.ndarray
    correct: np.ndarray
    first_correct: np.ndarray
    lengths: np.ndarray

    @property
    def accuracy(self) -> float:
        """Fraction of records whose whole completion is predicted greedily."""
        return float(self.correct.mean()) if len(self.correct) else float("nan")

    @property
    def loss_per_token(self) -> float:
        """``−Σ logprob / Σ n_tokens`` (nats per completion token)."""
        return float(-self.logprob.sum() / max(1, self.n_tokens.sum()))


@torch.no_grad()
def completion_scores(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 16,
    add_bos: bool = False,
) -> CompletionScores:
    """Teacher-forced scores of each record's completion after its prompt.

    For a record with prompt tokens ``p`` and completion tokens ``c_1 … c_C``,
    ``logprob = Σ_t log softmax(z_t)[c_t]`` where ``z_t`` are the logits at the position before
    ``c_t``; ``correct`` is ``∀t: argmax z_t = c_t``.

    Raises:
        DataError: No records, a record that is not prompt/completion, or one longer than the
            model's context.
    """
    if not records:
        raise DataError("Expected at least one prompt/completion record, received none.")
    pairs = [encode_completion(tokenizer, r, i, add_bos) for i, r in enumerate(records)]
    longest = max(len(p) + len(c) for p, c in pairs)
    check_context(
        model,
        longest,
        "The longest prompt + completion",
        "Use shorter prompts (fewer demonstrations, shorter distractors) or a model with a "
        "longer context.",
    )
    device, pad = _device(model), _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    out: dict[str, list] = {"lp": [], "n": [], "ok": [], "first": [], "len": []}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ids, mask = _pad([p + c for p, c in chunk], pad)  # (B, T)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = logits.float().log_softmax(-1).cpu()  # (B, T, V)
        for row, (p, c) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)  # (C,) predicting positions
            target = torch.tensor(c)  # (C,)
            rows = logp[row, pos]  # (C, V)
            top1 = rows.argmax(-1) == target  # (C,)
            out["lp"].append(float(rows.gather(1, target[:, None]).sum()))
            out["n"].append(len(c))
            out["ok"].append(bool(top1.all()))
            out["first"].append(bool(top1[0]))
            out["len"].append(len(p) + len(c))
    if was_training:
        model.train()
    return CompletionScores(
        logprob=np.asarray(out["lp"], dtype=np.float64),
        n_tokens=np.asarray(out["n"], dtype=np.int64),
        correct=np.asarray(out["ok"], dtype=bool),
        first_correct=np.asarray(out["first"], dtype=bool),
        lengths=np.asarray(out["len"], dtype=np.int64),
    )


@dataclass(frozen=True)
class TextScores:
    """Scores of ``{"text"}`` records.

    Attributes:
        loss: ``(N,)`` mean next-token cross-entropy of each text (nats per token).
        accuracy: ``(N,)`` fraction of its tokens that are the top-1 prediction.
        n_tokens: ``(N,)`` predicted tokens (``T − 1``).
    """

    loss: np.ndarray
    accuracy: np.ndarray
    n_tokens: np.ndarray


def _text_ids(tokenizer: Any, records: Sequence[dict[str, Any]], add_bos: bool) -> list[list[int]]:
    seqs = []
    for i, r in enumerate(records):
        if "text" in r:
            ids = _prefix(tokenizer, add_bos) + _ids(tokenizer, str(r["text"]))
        elif "prompt" in r and "completion" in r:
            ids = _prefix(tokenizer, add_bos) + _ids(tokenizer, f"{r['prompt']}{r['completion']}")
        else:
            raise DataError(
                f"Record {i + 1} has keys {sorted(r)}; expected 'text', or 'prompt' and "
                "'completion'. Rename the field that holds the text."
            )
        if len(ids) < 2:
            raise DataError(
                f"Record {i + 1} has {len(ids)} token(s); a next-token loss needs at least 2. "
                "Drop it or give a longer text."
            )
        seqs.append(ids)
    return seqs


@torch.no_grad()
def text_scores(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 16,
    add_bos: bool = False,
    truncate: bool = True,
) -> TextScores:
    """Mean token loss and next-token accuracy of each record's text.

    A prompt/completion record counts as the text ``prompt + completion``. With ``truncate``,
    texts longer than the model's context lose their end (else :class:`DataError`).
    """
    if not records:
        raise DataError("Expected at least one record, received none.")
    seqs = _text_ids(tokenizer, records, add_bos)
    limit = context_length(model)
    if limit is not None and truncate:
        seqs = [s[:limit] for s in seqs]
    check_context(
        model, max(len(s) for s in seqs), "The longest text", "Pass truncate=True or split it."
    )
    device, pad = _device(model), _pad_id(tokenizer)
    model.eval()
    losses, accs, counts = [], [], []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids, mask = _pad(chunk, pad)  # (B, T)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = logits[:, :-1].float().log_softmax(-1).cpu()  # (B, T-1, V)
        target = ids[:, 1:]  # (B, T-1)
        nll = -logp.gather(2, target[..., None])[..., 0]  # (B, T-1)
        hit = (logp.argmax(-1) == target).float()  # (B, T-1)
        valid = mask[:, 1:].float()  # (B, T-1)
        n = valid.sum(1)  # (B,)
        losses.extend(((nll * valid).sum(1) / n).tolist())
        accs.extend(((hit * valid).sum(1) / n).tolist())
        counts.extend(n.long().tolist())
    return TextScores(np.asarray(losses), np.asarray(accs), np.asarray(counts))


@torch.no_grad()
def hidden_features(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    pool: str = "mean",
    batch_size: int = 16,
    add_bos: bool = False,
) -> np.ndarray:
    """Pooled hidden states of every layer: ``(L + 1, N, D)`` (index 0 = the embeddings).

    ``pool="mean"`` averages the states over a text's tokens (padding excluded),
    ``pool="last"`` takes the state at its last token. Texts longer than the context are cut.

    Raises:
        ConfigError: Unknown ``pool``.
        DataError: No texts, or a text with no tokens.
    """
    if pool not in ("mean", "last"):
        raise ConfigError(f"Invalid pool: {pool!r}. Supported: ('last', 'mean').")
    if not texts:
        raise DataError("Expected at least one text, received none.")
    seqs = [_prefix(tokenizer, add_bos) + _ids(tokenizer, str(t)) for t in texts]
    empty = [i for i, s in enumerate(seqs) if not s]
    if empty:
        raise DataError(f"Texts {empty[:5]} have no tokens; drop them or give non-empty text.")
    limit = context_length(model)
    if limit is not None:
        seqs = [s[:limit] for s in seqs]
    device, pad = _device(model), _pad_id(tokenizer)
    model.eval()
    layers: list[list[np.ndarray]] = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = _pad(seqs[start : start + batch_size], pad)  # (B, T)
        out = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True
        )
        m = mask.to(device)[..., None].float()  # (B, T, 1)
        last = mask.sum(1) - 1  # (B,)
        for li, h in enumerate(out.hidden_states):  # each (B, T, D)
            h = h.float()
            if pool == "mean":
                pooled = (h * m).sum(1) / m.sum(1)  # (B, D)
            else:
                pooled = h[torch.arange(len(last)), last.to(device)]  # (B, D)
            if len(layers) <= li:
                layers.append([])
            layers[li].append(pooled.cpu().numpy())
    return np.stack([np.concatenate(chunks) for chunks in layers])  # (L+1, N, D)


class InfluenceSide:
    """EK-FAC influence of training records on a probe's examples (the side-by-side column).

    Fits the curvature once (:meth:`influscope.Influence.fit`, true-Fisher EK-FAC, MLP layers by
    default) and scores any list of query records against the training set.

    Args:
        model: The model.
        tokenizer: Its tokenizer.
        train_records: Training records (``{"text"}``), e.g. the demo corpus.
        modules: Tracked modules (see :class:`~influscope.Influence`).
        run_dir: Where the factors are stored (``None``: in memory).
        device: Device of the influence computation.
        query_rank: Low-rank query approximation (``None`` = full rank).
        normalize: ``None``, or ``"relatif"`` to rank by ``I_q(z) / sqrt(self-influence(z))``
            (suppresses sequences with large gradients); may be changed between calls.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        train_records: Sequence[dict[str, Any]],
        *,
        modules: str = "mlp",
        run_dir: str | None = None,
        device: str | None = "cpu",
        query_rank: int | None = 32,
        normalize: str | None = None,
    ) -> None:
        from influscope.analyzer import Influence
        from influscope.config import FitConfig

        self.inf = Influence(
            model, "causal_lm", modules=modules, run_dir=run_dir, tokenizer=tokenizer, device=device
        )
        self.train_records = list(train_records)
        self.train = self.inf.encode(self.train_records, truncate=True)
        self.factors = self.inf.fit(self.train, FitConfig(curvature="ekfac"), overwrite=True)
        self.query_rank = query_rank
        self.normalize = normalize

    @property
    def layer_names(self) -> list[str]:
        return self.inf.layer_names

    def scores(self, queries: Sequence[dict[str, Any]], per_layer: bool = False):
        """:class:`~influscope.scoring.pairwise.Scores` of ``queries`` (``(Q, N)``)."""
        from influscope.config import ScoreConfig

        encoded = self.inf.encode(list(queries), truncate=True)
        config = ScoreConfig(
            query_rank=self.query_rank, per_layer=per_layer, normalize=self.normalize
        )
        return self.inf.score(encoded, self.train, self.factors, config)

    def top(self, queries: Sequence[dict[str, Any]], k: int = 10) -> np.ndarray:
        """Training positions of each query's top-``k`` proponents, ``(Q, k)``."""
        pairwise = self.scores(queries).pairwise.detach().cpu().numpy()  # (Q, N)
        return np.argsort(-pairwise, axis=1, kind="stable")[:, :k]


def markdown_rows(markdown: str) -> list[list[str]]:
    """The cells of a ``| a | b |`` Markdown table (header first, the rule row dropped)."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def probe_section(title: str, markdown: str, svg: str, caption: str = ""):
    """A studies-report :class:`~influscope.report.views.Section` from a probe's table and plot.

    Args:
        title: Section title.
        markdown: The result's :meth:`markdown` table (``| a | b |`` rows, second row a rule).
        svg: The result's plot.
        caption: Caption of the plot.
    """
    from influscope.report.html import html_figure, html_table
    from influscope.report.views import Section

    rows = markdown_rows(markdown)
    return Section(title, html_table(rows[0], rows[1:]) + html_figure(svg, caption))


def report_section(result) -> dict[str, str]:
    """``{"title", "markdown"}`` of a probe result, stored beside it for the studies report.

    Only text is stored (no HTML or SVG), so a stored file cannot inject markup into a report:
    :func:`stored_sections` escapes every cell when it renders the table.
    """
    return {"title": result.to_section().title, "markdown": result.markdown()}


def stored_sections(run) -> list:
    """Sections of the studies report for every probe stored under ``RUN/probes/*.json``.

    Files without a ``report_section`` (or unreadable ones) are skipped with a warning.
    """
    import logging
    from pathlib import Path

    from influscope.report.html import html_paragraph, html_table
    from influscope.report.views import Section
    from influscope.storage.atomic import read_json

    out = []
    for path in sorted((Path(run) / "probes").glob("*.json")):
        try:
            sec = read_json(path)["report_section"]
            rows = markdown_rows(str(sec["markdown"]))
            html = html_table(rows[0], rows[1:]) + html_paragraph(
                f"From {path.name} (influscope probe); the plot is in the probe's --svg file.",
                muted=True,
            )
            out.append(Section(f"Probe: {sec['title']}", html))
        except (KeyError, IndexError, TypeError, ValueError, OSError) as exc:
            logging.getLogger(__name__).warning("probe section %s skipped: %s", path, exc)
    return out
