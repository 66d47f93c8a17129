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

import codecs
import json
import os
import re
from pathlib import Path

import torch

from influscope.errors import DataError

ADAPTER_CONFIG = "adapter_config.json"
#: What a Hugging Face hub id looks like (``org/name``): refused with a hint, never fetched.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
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
        if HUB_ID.fullmatch(str(path)):
            raise DataError(
                f"Model {str(path)!r} does not exist locally (working directory: {Path.cwd()}). "
                "If it is a Hugging Face hub id: hub downloads are not supported, influscope "
                "only reads local files. Download it first, e.g. `huggingface-cli download "
                f"{path} --local-dir models/{path.name}`, then pass that directory "
                f"(--model models/{path.name}) or a .gguf file (--model path/to/model.gguf)."
            )
        raise DataError(
            f"Model path {str(path)!r} does not exist (working directory: {Path.cwd()}). Give "
            "a local Hugging Face model directory or a .gguf file."
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


def load_records(path: str | Path, errors: str = "strict") -> list[dict]:
    """Read records from a JSONL / JSON / text file or a saved Hugging Face dataset.

    Args:
        path: The file or dataset directory.
        errors: How bytes that are not UTF-8 are decoded (Python's codec ``errors``):
            ``"strict"`` refuses the file naming the line and byte offset; ``"replace"``
            reads them as U+FFFD.

    Raises:
        DataError: If the file is missing, not UTF-8 (with ``errors="strict"``), malformed,
            or holds no records. Messages give the file, the 1-based line or record number
            and, for JSON, the column.
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
        for n, line in enumerate(read_text(path, errors).splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}: line {n}, column {exc.colno} is not valid JSON: {exc.msg}. "
                        f"The line reads: {_excerpt(line, exc.pos)}. Each line must be one "
                        'JSON object, e.g. {"text": "..."}.'
                    ) from None
    elif path.suffix.lower() == ".json":
        text = read_text(path, errors)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            line = text.splitlines()[exc.lineno - 1] if text.strip() else ""
            raise DataError(
                f"{path}: line {exc.lineno}, column {exc.colno} is not valid JSON: {exc.msg}. "
                f"The line reads: {_excerpt(line, exc.colno - 1)}. Expected a JSON list of "
                "objects; for one object per line use a .jsonl file."
            ) from None
        if not isinstance(records, list):
            raise DataError(
                f"{path} must hold a JSON list of objects, found {type(records).__name__}."
            )
    else:
        text = read_text(path, errors)
        records = [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]
    if not records:
        raise DataError(
            f"{path} holds no records (expected at least one; the file is "
            f"{'empty' if path.is_file() and path.stat().st_size == 0 else 'blank'})."
        )
    bad = [i + 1 for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise DataError(
            f"{path}: records {bad[:5]} (numbered from 1) are not JSON objects; expected "
            'objects such as {"text": "..."} or {"prompt": "...", "completion": "..."}.'
        )
    return records


def read_text(path: Path, errors: str = "strict") -> str:
    """A UTF-8 file's text (a leading byte-order mark dropped).

    Raises:
        DataError: With ``errors="strict"``, for bytes that are not UTF-8: the message gives
            the line, the byte offset and the bytes, and how to convert or replace them.
    """
    data = path.read_bytes()
    start = 3 if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data[:offset].count(b"\n") + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
        raise DataError(
            f"{path} is not UTF-8: line {line}, byte offset {offset} (column {column}) holds "
            f"{data[offset : offset + 4]!r} ({exc.reason}). Convert the file, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > {fixed}`, or (Python API) read it replacing "
            "undecodable bytes with U+FFFD: load_records(path, errors='replace')."
        ) from None


def _excerpt(line: str, pos: int, width: int = 60) -> str:
    """The part of ``line`` around character ``pos``, with a marker at ``pos``."""
    lo = max(0, pos - width // 2)
    head, tail = line[lo:pos], line[pos : pos + width // 2]
    return f"{'…' * (lo > 0)}{head}⟨here⟩{tail}{'…' * (pos + width // 2 < len(line))}"
