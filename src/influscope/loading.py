"""Loading models and records from local files (no hub access is ever attempted).

Models: a local Hugging Face directory, or a ``.gguf`` file (needs the ``gguf`` package;
dequantised to float32 by transformers), optionally with a PEFT adapter (LoRA) applied on top
(needs the ``peft`` package). A PEFT adapter directory (one with ``adapter_config.json``) may
also be given as the model itself when the base model it names is a local path.

Records: JSONL (one object per line with ``text``, or ``prompt`` + ``completion``), JSON (a
list of such objects), plain text (``.txt``, ``.text``, ``.md``: one record per paragraph,
paragraphs separated by blank lines), or a Hugging Face dataset saved with ``save_to_disk``
(needs the ``datasets`` package). Any other file suffix is refused rather than read as text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from influscope.errors import DataError

ADAPTER_CONFIG = "adapter_config.json"
#: Suffixes read as plain text, one record per paragraph.
TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".text", ".md")


def load_model(
    path: str | Path,
    task: str = "causal_lm",
    dtype: torch.dtype = torch.float32,
    adapter: str | Path | None = None,
):
    """Load ``(model, tokenizer)`` from a local directory or GGUF file, offline.

    Args:
        path: A Hugging Face model directory, a ``.gguf`` file, or a PEFT adapter directory
            whose ``base_model_name_or_path`` is a local path.
        task: A name in :data:`influscope.tasks.TASKS`; its ``auto_model`` class loads the
            model (``causal_lm``: a causal LM head; ``classification`` and ``reward``: a
            sequence classifier).
        dtype: Parameter dtype.
        adapter: A PEFT adapter directory to apply on top of the model at ``path``.

    Raises:
        DataError: If the path does not exist or holds no loadable model, or the adapter
            cannot be applied.
    """
    path = Path(path)
    if adapter is None and (path / ADAPTER_CONFIG).is_file():
        adapter, path = path, _adapter_base(path)
    model, tokenizer = _load_base(path, task, dtype)
    if adapter is not None:
        model = _apply_adapter(model, Path(adapter))
        if any((Path(adapter) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(adapter)
    return model.eval(), tokenizer


def _adapter_base(adapter: Path) -> Path:
    """The local base model named by a PEFT adapter directory's ``adapter_config.json``."""
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{adapter / ADAPTER_CONFIG} is not valid JSON ({exc.msg}).") from None
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise DataError(
            f"{str(adapter)!r} is a PEFT adapter whose base model {base!r} is not a local path "
            "(no model hub is used). Give the base model and the adapter separately: "
            f"--model BASE_DIR_OR.gguf --adapter {adapter}."
        )
    return Path(base)


def _apply_adapter(model, adapter: Path):
    """``PeftModel.from_pretrained(model, adapter)``, with clear errors."""
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise DataError(
            f"Adapter {str(adapter)!r} has no {ADAPTER_CONFIG}: expected a directory written by "
            "PEFT's `save_pretrained`."
        )
    try:
        from peft import PeftModel
    except ImportError:
        raise DataError(
            "Loading a LoRA/PEFT adapter needs the peft package: pip install 'influscope[peft]'."
        ) from None
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise DataError(f"Could not apply the adapter {str(adapter)!r}: {exc}") from exc


def _load_base(path: Path, task: str, dtype: torch.dtype):
    """``(model, tokenizer)`` from a Hugging Face directory or a GGUF file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoTokenizer

    from influscope.errors import lookup
    from influscope.tasks import TASKS

    if not path.exists():
        raise DataError(
            f"Model path {str(path)!r} does not exist. Give a local Hugging Face "
            "model directory or a .gguf file."
        )
    cls = getattr(transformers, lookup(TASKS, task, "task").auto_model)
    try:
        if path.suffix == ".gguf":
            model = cls.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        else:
            model = cls.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"Could not load a model from {str(path)!r}: {exc}") from exc
    return model, tokenizer


def load_records(path: str | Path) -> list[dict]:
    """Read records from a JSONL / JSON / text file or a saved Hugging Face dataset.

    Raises:
        DataError: If the file is missing, malformed, or holds no records.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"Data path {str(path)!r} does not exist (working directory: {Path.cwd()}). Give a "
            ".jsonl/.json/.txt file or a saved Hugging Face dataset directory."
        )
    if path.is_file() and path.suffix.lower() not in (".jsonl", ".json", *TEXT_SUFFIXES):
        raise DataError(
            f"Cannot read {str(path)!r}: {path.suffix or 'a name without a suffix'} is not a "
            "supported format. Expected .jsonl (one JSON object per line with 'text', or "
            "'prompt' + 'completion'), .json (a list of such objects), .txt/.md (one record "
            "per paragraph) or a directory written by datasets' save_to_disk. Convert it, "
            "e.g. pandas: df.to_json('data.jsonl', orient='records', lines=True)."
        )
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"{str(path)!r} is a directory; reading a saved Hugging Face "
                "dataset needs `pip install datasets`."
            ) from None
        records = [dict(r) for r in datasets.load_from_disk(str(path))]
    elif path.suffix.lower() == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n} is not valid JSON ({exc.msg}).") from None
    elif path.suffix.lower() == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc.msg}).") from None
        if not isinstance(records, list):
            raise DataError(
                f"{path} must hold a JSON list of objects, found {type(records).__name__}."
            )
    else:
        text = path.read_text(encoding="utf-8-sig")
        records = [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]
    if not records:
        raise DataError(f"{path} holds no records (expected at least one).")
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise DataError(f"{path}: records {bad[:5]} are not JSON objects.")
    return records
