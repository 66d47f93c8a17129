"""Progress bars for long stages (tqdm on stderr; silence with ``INFLUSCOPE_PROGRESS=0``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    """Whether progress bars are shown (environment variable ``INFLUSCOPE_PROGRESS``)."""
    return os.environ.get("INFLUSCOPE_PROGRESS", "1") not in ("0", "false", "no")


def track(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "batch"
) -> Iterator[T]:
    """Wrap ``items`` in a progress bar when enabled."""
    if not progress_enabled():
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
