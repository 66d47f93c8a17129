"""Progress bars for long stages (tqdm on stderr; silence with ``INFLUSCOPE_PROGRESS=0``).

Two kinds of bar, both with the elapsed time and, once a step is done, the estimated time left:

* :func:`track` wraps an iterable (batches of a pass, layers of an eigendecomposition);
* :func:`watch` follows one long call whose progress can be polled, such as a save whose
  bytes on disk grow (:func:`tmp_bytes`).

Every bar is also announced to the listeners of :func:`recording` (``(description, total,
unit)``), whether or not bars are shown, so that tests can check which steps report progress.

When stderr is not a terminal (a log file, ``nohup``, a batch job), redrawn bars would fill the
log with carriage returns, or nothing at all would show for an hour-long fit. There each bar is
instead a plain line every :data:`LINE_SECONDS` seconds (``INFLUSCOPE_PROGRESS_SECONDS``):
``influscope: covariance 1/3: 5/16 batch (31 %), 4 min 10 s elapsed, about 9 min 10 s left``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: ``(description, total, unit)`` of a bar that starts.
BarEvent = tuple[str, "int | float | None", str]
_LISTENERS: list[Callable[[str, int | float | None, str], None]] = []


#: Seconds between progress lines when stderr is not a terminal.
LINE_SECONDS = 60.0


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
    if not _on_terminal():
        yield from _lines(items, desc, total, unit)
        return
    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


class LineBar:
    """The part of tqdm's interface that solvers use (``update``, ``set_postfix``, ``close``),
    printed as a :func:`progress_line` every :func:`line_seconds` seconds: a bar off a
    terminal."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.postfix = 0, ""
        self._every = line_seconds()
        self._start = self._last = time.monotonic()
        self._said = False

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self._every and (self.total is None or self.n < self.total):
            self._print(now)

    def close(self) -> None:
        if self._said or time.monotonic() - self._start >= self._every:
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        line = progress_line(self.desc, self.n, self.total, self.unit, now - self._start)
        _say(line + (f" [{self.postfix}]" if self.postfix else ""))
        self._last, self._said = now, True


def bar(total: int | None, desc: str, unit: str = "step"):
    """A manual bar (``update``/``set_postfix``/``close``): tqdm on a terminal, a
    :class:`LineBar` elsewhere, ``None`` when progress is off."""
    _announce(desc, total, unit)
    if not progress_enabled():
        return None
    if not _on_terminal():
        return LineBar(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def _on_terminal() -> bool:
    """Whether stderr is a terminal (bars redraw in place) rather than a file or a pipe."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def line_seconds() -> float:
    """Seconds between progress lines off a terminal (``INFLUSCOPE_PROGRESS_SECONDS``)."""
    try:
        return max(0.0, float(os.environ.get("INFLUSCOPE_PROGRESS_SECONDS", LINE_SECONDS)))
    except ValueError:
        return LINE_SECONDS


def progress_line(desc: str, done: float, total: float | None, unit: str, elapsed: float) -> str:
    """One progress line: where a step is, the time spent and, once begun, the time left.

    Example:
        >>> progress_line("covariance", 5, 16, "batch", 250.0)
        'influscope: covariance: 5/16 batch (31 %), 4 min 10 s elapsed, about 9 min 10 s left'
    """
    if unit == "B":
        count = f"{done / 2**30:.2f}/{(total or 0) / 2**30:.2f} GiB" if total else ""
    else:
        count = f"{done:g}/{total:g} {unit}" if total else f"{done:g} {unit}"
    text = f"influscope: {desc}: {count}"
    if total:
        text += f" ({100 * done / total:.0f} %)"
    text += f", {_duration(elapsed)} elapsed"
    if total and 0 < done < total:
        text += f", about {_duration(elapsed * (total - done) / done)} left"
    return text


def _duration(seconds: float) -> str:
    seconds = math.ceil(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _say(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


def _lines(items: Iterable[T], desc: str, total: int | None, unit: str) -> Iterator[T]:
    """``items`` with a :class:`LineBar` advanced per item."""
    bar = LineBar(total, desc, unit)
    for item in items:
        yield item
        bar.update(1)
    bar.close()


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
    if not _on_terminal():
        bar = LineBar(total, desc, "B")
    else:
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
