"""Progress bars for long stages (tqdm on stderr; silence with ``INFLUSCOPE_PROGRESS=0``).

Two kinds of bar, both with the elapsed time and, once a step is done, the estimated time left:

* :func:`track` wraps an iterable (batches of a pass, layers of an eigendecomposition);
* :func:`watch` follows one long call whose progress can be polled, such as a save whose
  bytes on disk grow (:func:`tmp_bytes`).

Every bar is also announced to the listeners of :func:`recording` (``(description, total,
unit)``), whether or not bars are shown, so that tests can check which steps report progress.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: ``(description, total, unit)`` of a bar that starts.
BarEvent = tuple[str, "int | float | None", str]
_LISTENERS: list[Callable[[str, int | float | None, str], None]] = []


def progress_enabled() -> bool:
    """Whether progress bars are shown (environment variable ``INFLUSCOPE_PROGRESS``)."""
    return os.environ.get("INFLUSCOPE_PROGRESS", "1") not in ("0", "false", "no")


@contextlib.contextmanager
def recording() -> Iterator[list[BarEvent]]:
    """Collect ``(description, total, unit)`` of every bar started inside the block.

    Example:
        >>> with recording() as bars:
        ...     _ = list(track(range(3), "covariance"))
        >>> bars
        [('covariance', 3, 'batch')]
    """
    events: list[BarEvent] = []

    def listen(desc: str, total: int | float | None, unit: str) -> None:
        events.append((desc, total, unit))

    _LISTENERS.append(listen)
    try:
        yield events
    finally:
        _LISTENERS.remove(listen)


def _announce(desc: str, total: int | float | None, unit: str) -> None:
    for listen in list(_LISTENERS):
        listen(desc, total, unit)


def track(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "batch"
) -> Iterator[T]:
    """Wrap ``items`` in a progress bar when enabled."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    _announce(desc, total, unit)
    if not progress_enabled():
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def watch(
    desc: str, total: float, done: Callable[[], float], interval: float = 0.5
) -> Iterator[None]:
    """A byte bar for one long call: ``done()`` is polled every ``interval`` seconds.

    Args:
        desc: Bar label, e.g. ``"saving factors"``.
        total: Expected bytes (the bar's 100%).
        done: Bytes done so far (e.g. :func:`tmp_bytes` of the file being written).
        interval: Seconds between polls.
    """
    _announce(desc, total, "B")
    if not progress_enabled():
        yield
        return
    bar = tqdm(
        desc=desc,
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
        dynamic_ncols=True,
    )
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(OSError):
                bar.update(max(0.0, min(float(done()), total) - bar.n))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.update(max(0.0, total - bar.n))
        bar.close()


def tmp_bytes(directory: str | Path, name: str) -> int:
    """Bytes in the temporary files (or directories) ``.{name}.*.tmp`` under ``directory``.

    The atomic writers of :mod:`influscope.storage` write to such a temporary beside the
    destination before moving it into place, so its size is how far a save has got.
    """
    total = 0
    with contextlib.suppress(OSError):
        for entry in Path(directory).iterdir():
            if not (entry.name.startswith(f".{name}.") and entry.name.endswith(".tmp")):
                continue
            files = entry.rglob("*") if entry.is_dir() else [entry]
            for f in files:
                with contextlib.suppress(OSError):
                    total += f.stat().st_size if f.is_file() else 0
    return total
