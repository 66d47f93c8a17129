"""Chat / SFT records, encoded with the tokenizer's own chat template.

Two conversational formats (those of TRL and the OpenAI fine-tuning API):

* ``{"messages": [{"role": ..., "content": ...}, ...]}`` — a whole conversation. The loss mask
  ``m_t`` is 1 on the tokens of the **assistant turns** only (``chat_loss="assistant"``,
  the default) or on every token of the rendered conversation (``chat_loss="all"``).
* ``{"prompt": [messages], "completion": [messages]}`` — TRL's conversational
  prompt-completion. The prompt is rendered with ``add_generation_prompt=True``; the tokens
  that the completion messages add after it are the measured / trained tokens.

Masking rule. The text is rendered once with ``apply_chat_template`` and tokenized once
(``add_special_tokens=False``: the template alone decides BOS and every special token, so the
ids are exactly ``apply_chat_template(..., tokenize=True)`` and a BOS is never doubled). An
assistant turn ``k`` covers the characters from the end of
``render(messages[:k], add_generation_prompt=True)`` (its header, e.g.
``<|im_start|>assistant\\n``, is not covered) to the end of ``render(messages[:k+1])`` with
trailing whitespace removed: the turn's content **and its end-of-turn token** (e.g.
``<|im_end|>``, as TRL's ``assistant_only_loss`` does), without the newline after it. A token
is measured when its character span (the fast tokenizer's offset mapping) overlaps a covered
range. Templates that re-render earlier turns differently once later turns exist (no
incremental prefixes) are refused with a :class:`~influscope.errors.DataError`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from influscope.errors import DataError

#: Values of ``chat_loss``: which tokens of a ``messages`` record are trained on / measured.
CHAT_LOSSES: tuple[str, ...] = ("assistant", "all")


def is_conversational(record: Mapping) -> bool:
    """Whether ``record`` is a chat record (``messages``, or prompt/completion message lists)."""
    return "messages" in record or (
        "prompt" in record and isinstance(record["prompt"], (list, tuple))
    )


def check_chat_loss(value: str) -> str:
    """``value`` if it is one of :data:`CHAT_LOSSES`, else a :class:`DataError`."""
    if value not in CHAT_LOSSES:
        raise DataError(
            f"chat_loss must be one of {list(CHAT_LOSSES)}, received {value!r}: 'assistant' "
            "trains on / measures the assistant turns only, 'all' every token "
            "(CLI: --chat-loss)."
        )
    return value


def check_chat_template(tokenizer) -> None:
    """Raise a :class:`DataError` when ``tokenizer`` has no chat template to render messages."""
    if getattr(tokenizer, "chat_template", None):
        return
    raise DataError(
        f"Chat records ('messages', or 'prompt'/'completion' message lists) are encoded with the "
        f"tokenizer's chat template, but this tokenizer ({type(tokenizer).__name__}, "
        f"{getattr(tokenizer, 'name_or_path', '') or 'no name'}) has none. Load the tokenizer "
        "of the instruct/chat model you fine-tuned (its tokenizer_config.json or GGUF carries "
        "the template), set tokenizer.chat_template = '<jinja template>', or turn the records "
        "into 'text' / string 'prompt' + 'completion' records yourself."
    )


def messages_field(record: Mapping, i: int, key: str) -> list[dict]:
    """``record[key]`` checked to be a list of ``{"role": str, "content": str}`` messages."""
    value = record[key]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(
            f"Record {i + 1} field {key!r} must be a non-empty list of messages "
            f"[{{'role': ..., 'content': ...}}, ...], received {type(value).__name__} "
            f"{value!r:.60}."
        )
    out = []
    for j, m in enumerate(value):
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(
                f"Record {i + 1} field {key!r} message {j + 1} must be a dict with string 'role' and "
                f"'content' (e.g. {{'role': 'user', 'content': 'Hi'}}), received {m!r:.80}."
            )
        out.append(dict(m))
    return out


def render(
    tokenizer, messages: Sequence[dict], generation_prompt: bool = False, i: int | None = None
) -> str:
    """The chat template applied to ``messages`` as text (not tokenized).

    Raises:
        DataError: The template refuses the messages (e.g. roles that do not alternate).
    """
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja2 raises its own types, templates raise_exception()
        where = f"Record {i + 1}" if i is not None else "A record"
        roles = [m.get("role") for m in messages]
        raise DataError(
            f"{where}: the tokenizer's chat template failed on messages with roles {roles} "
            f"({type(exc).__name__}: {exc}). Give the roles and order this template accepts "
            "(many require user/assistant turns that alternate, some no system turn)."
        ) from None


def _covered_end(text: str) -> int:
    """End of a rendered turn: its length without the whitespace after the end-of-turn token."""
    return len(text.rstrip())


def _incremental(full: str, part: str, i: int, what: str) -> None:
    if not full.startswith(part):
        raise DataError(
            f"Record {i + 1}: the chat template does not render {what} as a prefix of the whole "
            "conversation (it re-renders earlier turns once later ones exist), so the assistant "
            "tokens cannot be located. Use chat_loss='all' (CLI: --chat-loss all), or split the "
            "conversation into prompt/completion message lists ending at that turn."
        )


def assistant_spans(tokenizer, messages: list[dict], i: int) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character ranges of its assistant turns.

    Raises:
        DataError: No assistant turn, or a template that is not incremental.
    """
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(
            f"Record {i + 1} has 'messages' with roles {roles} but no 'assistant' turn: the loss and "
            "the measurement cover the assistant turns only. Add the assistant's reply "
            "({'role': 'assistant', 'content': ...}), or train on every token with "
            "chat_loss='all' (CLI: --chat-loss all)."
        )
    full = render(tokenizer, messages, i=i)
    spans = []
    for k, role in enumerate(roles):
        if role != "assistant":
            continue
        before = render(tokenizer, messages[:k], generation_prompt=True, i=i)
        upto = render(tokenizer, messages[: k + 1], i=i)
        _incremental(full, before, i, f"the turns before assistant turn {k}")
        _incremental(full, upto, i, f"the conversation up to assistant turn {k}")
        spans.append((len(before), _covered_end(upto)))
    return full, spans


def completion_spans(
    tokenizer, prompt: list[dict], completion: list[dict], i: int
) -> tuple[str, list[tuple[int, int]], int]:
    """Rendered ``prompt + completion``, the completion's character range, the prompt's length.

    Raises:
        DataError: A template whose rendered prompt is not a prefix of the whole.
    """
    before = render(tokenizer, prompt, generation_prompt=True, i=i)
    full = render(tokenizer, prompt + completion, i=i)
    _incremental(full, before, i, "the prompt (with the generation prompt)")
    return full, [(len(before), _covered_end(full))], len(before)


def tokenize_spans(
    tokenizer, text: str, spans: Sequence[tuple[int, int]]
) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it overlaps one of ``spans``.

    The text is tokenized once, without added special tokens. A fast tokenizer's offset
    mapping places the tokens; a slow tokenizer (no offsets) tokenizes the pieces between span
    boundaries one by one instead.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        inside = [any(s < b and a < e for a, b in spans) for s, e in offsets]
        return ids, inside
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    ids, inside = [], []
    for a, b in itertools.pairwise(cuts):
        piece = list(tokenizer(text[a:b], add_special_tokens=False)["input_ids"])
        covered = any(s <= a and b <= e for s, e in spans)
        ids += piece
        inside += [covered] * len(piece)
    return ids, inside


def encode_chat(
    record: Mapping, i: int, tokenizer, chat_loss: str = "assistant", key: str = "completion"
) -> tuple[list[int], list[int], int]:
    """Token ids, labels (``-100`` off the mask) and prompt length of one chat record.

    Args:
        record: A ``messages`` record, or a conversational prompt/completion record.
        i: Its position (for error messages).
        tokenizer: A tokenizer with a chat template.
        chat_loss: ``"assistant"`` or ``"all"`` (see the module docstring).
        key: The field holding the completion messages (``"contrast"`` for the contrast row
            of a contrastive query).

    Returns:
        ``(ids, labels, prompt_tokens)``: ``prompt_tokens`` is the number of leading tokens a
        truncation may drop from the front (the prompt of a prompt/completion record), 0 for a
        ``messages`` record (cut at its end).
    """
    check_chat_template(tokenizer)
    if "messages" in record:
        messages = messages_field(record, i, "messages")
        if chat_loss == "all":
            text = render(tokenizer, messages, i=i)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            return ids, list(ids), 0
        text, spans = assistant_spans(tokenizer, messages, i)
        ids, inside = tokenize_spans(tokenizer, text, spans)
        return ids, [t if m else -100 for t, m in zip(ids, inside)], 0
    prompt = messages_field(record, i, "prompt")
    value = record[key]
    completion = (
        [{"role": "assistant", "content": value}]
        if isinstance(value, str)
        else messages_field(record, i, key)
    )
    text, spans, _ = completion_spans(tokenizer, prompt, completion, i)
    ids, inside = tokenize_spans(tokenizer, text, spans)
    n_prompt = inside.index(True) if True in inside else len(ids)
    if chat_loss == "all":
        return ids, list(ids), 0
    return ids, [t if m else -100 for t, m in zip(ids, inside)], n_prompt


def display_texts(record: Mapping) -> tuple[str, str]:
    """``(prompt, completion)`` strings of a chat record for reports.

    The prompt lists the turns as ``role: content`` lines; the completion is the final
    assistant turn of a ``messages`` record, or the completion messages' contents.
    """

    def lines(messages) -> str:
        return "".join(f"{m.get('role', '?')}: {m.get('content', '')}\n" for m in messages)

    if "messages" in record:
        messages = list(record["messages"])
        last = max(
            (k for k, m in enumerate(messages) if m.get("role") == "assistant"),
            default=len(messages),
        )
        reply = messages[last].get("content", "") if last < len(messages) else ""
        return lines(messages[:last]) + "assistant: ", str(reply)
    return lines(record["prompt"]) + "assistant: ", contents(record["completion"])


def contents(value) -> str:
    """A completion or contrast as text: a string as is, message lists' contents joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, Mapping))
