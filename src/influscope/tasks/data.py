"""Encoded datasets: token tensors per example, the records they came from, a fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from influscope.errors import DataError


@dataclass
class EncodedDataset:
    """A list of examples, each a dict of 1-D tensors, with the records they were encoded from.

    Attributes:
        examples: One ``{key: 1-D tensor}`` per example (e.g. ``input_ids``, ``labels``).
        records: The original records (``{"text": ...}`` or ``{"prompt", "completion"}`` …),
            kept for reports; may be empty dicts.
        indices: Global index of each example in the full dataset it was taken from.
    """

    examples: list[dict[str, torch.Tensor]]
    records: list[dict] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.examples:
            raise DataError(
                "The dataset is empty (expected at least one example, received 0). Check the "
                "input file or the filter that selected the examples."
            )
        if not self.records:
            self.records = [{} for _ in self.examples]
        if not self.indices:
            self.indices = list(range(len(self.examples)))
        if not (len(self.records) == len(self.indices) == len(self.examples)):
            raise DataError(
                f"examples, records and indices differ in length ({len(self.examples)}, "
                f"{len(self.records)}, {len(self.indices)})."
            )

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, positions: Sequence[int]) -> EncodedDataset:
        """The examples at ``positions`` (positions in this dataset), keeping global indices."""
        return EncodedDataset(
            [self.examples[i] for i in positions],
            [self.records[i] for i in positions],
            [self.indices[i] for i in positions],
        )

    def batches(self, batch_size: int) -> Iterator[tuple[list[int], list[dict[str, torch.Tensor]]]]:
        """Yield ``(positions, examples)`` chunks of at most ``batch_size``."""
        for start in range(0, len(self), batch_size):
            pos = list(range(start, min(start + batch_size, len(self))))
            yield pos, [self.examples[i] for i in pos]

    def max_length(self) -> int:
        """Longest tensor among all examples (the sequence length a model must accept)."""
        return max(int(t.shape[-1]) for ex in self.examples for t in ex.values() if t.dim())

    def fingerprint(self) -> str:
        """SHA-256 over the example tensors (keys, dtypes, shapes and values) and indices."""
        h = hashlib.sha256()
        h.update(json.dumps(self.indices).encode())
        for ex in self.examples:
            for key in sorted(ex):
                t = ex[key].detach().cpu().contiguous()
                h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


def record_list(records) -> list[dict]:
    """``records`` as a list of dicts, or a :class:`DataError` saying what to pass instead.

    Accepts a list or tuple of mappings, or any iterable of them (a Hugging Face
    ``datasets.Dataset`` yields one dict per row).
    """
    if isinstance(records, (str, bytes, Mapping)):
        one = "a string" if isinstance(records, (str, bytes)) else "a single dict"
        raise DataError(
            f"Expected a list of records (dicts such as {{'text': ...}} or {{'prompt': ..., "
            f"'completion': ...}}), received {one}. Wrap it in a list: [record]."
        )
    try:
        records = list(records)
    except TypeError:
        raise DataError(
            "Expected a list of records (dicts such as {'text': ...}), received "
            f"{type(records).__name__}, which is not iterable."
        ) from None
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            hint = (
                " For plain strings pass [{'text': s} for s in texts]."
                if isinstance(rec, str)
                else ""
            )
            raise DataError(
                f"Record {i + 1} is a {type(rec).__name__}, expected a dict such as {{'text': ...}} "
                f"or {{'prompt': ..., 'completion': ...}}.{hint}"
            )
    return [dict(rec) for rec in records]


def text_field(record: Mapping, i: int, key: str) -> str:
    """``record[key]`` checked to be a string (what a tokenizer accepts)."""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(
            f"Record {i + 1} field {key!r} must be a string, received {type(value).__name__} "
            f"{shown_json(value)}. Convert it to text (or drop the record) before encoding."
        )
    return value


def shown_json(value, limit: int = 400) -> str:
    """``value`` as JSON for a message: whole up to ``limit`` characters, else visibly cut
    (``… (N characters in all)``), never silently."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else f"{text[:limit]} … ({len(text)} characters in all)"


def pad_stack(tensors: Sequence[torch.Tensor], value: int | float, length: int | None = None):
    """Right-pad 1-D tensors to one length and stack them: ``(B, T)``."""
    t = length if length is not None else max(int(x.shape[0]) for x in tensors)
    out = torch.full((len(tensors), t), value, dtype=tensors[0].dtype)
    for i, x in enumerate(tensors):
        out[i, : x.shape[0]] = x
    return out


def example_seeds(seed: int, indices: Sequence[int]) -> torch.Tensor:
    """Per-example seeds for label sampling, independent of batching and of rank: ``(B,)``."""
    return torch.tensor([(seed * 1_000_003 + int(i) * 7_919 + 17) % (2**62) for i in indices])
