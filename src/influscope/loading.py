"""Loading models and records from local files (no hub access is ever attempted).

Models: a local Hugging Face directory, or a ``.gguf`` file (needs the ``gguf`` package;
dequantised to float32 by transformers). Records: JSONL (one object per line with ``text``,
or ``prompt`` + ``completion``), JSON (a list of such objects), plain text (one record per
paragraph, paragraphs separated by blank lines), or a Hugging Face dataset saved with
``save_to_disk`` (needs the ``datasets`` package).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from influscope.errors import DataError


def load_model(path: str | Path, task: str = "causal_lm", dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a local directory or GGUF file, offline.

    Raises:
        DataError: If the path does not exist or holds no loadable model.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    path = Path(path)
    if not path.exists():
        raise DataError(
            f"Model path {str(path)!r} does not exist. Give a local Hugging Face "
            "model directory or a .gguf file."
        )
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    try:
        if path.suffix == ".gguf":
            model = cls.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        else:
            model = cls.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"Could not load a model from {str(path)!r}: {exc}") from exc
    return model.eval(), tokenizer


def load_records(path: str | Path) -> list[dict]:
    """Read records from a JSONL / JSON / text file or a saved Hugging Face dataset.

    Raises:
        DataError: If the file is missing, malformed, or holds no records.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"Data path {str(path)!r} does not exist.")
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"{str(path)!r} is a directory; reading a saved Hugging Face "
                "dataset needs `pip install datasets`."
            ) from None
        records = [dict(r) for r in datasets.load_from_disk(str(path))]
    elif path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n} is not valid JSON ({exc.msg}).") from None
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc.msg}).") from None
        if not isinstance(records, list):
            raise DataError(
                f"{path} must hold a JSON list of objects, found {type(records).__name__}."
            )
    else:
        text = path.read_text(encoding="utf-8")
        records = [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]
    if not records:
        raise DataError(f"{path} holds no records (expected at least one).")
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise DataError(f"{path}: records {bad[:5]} are not JSON objects.")
    return records
