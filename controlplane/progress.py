"""The progress bar the CLI's long commands draw on stderr: ``projections rebuild``, ``timers reconcile``,
``verify`` and ``export``. Each hands it on as a ``core.log.reader.Progress`` callback."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from core.log.reader import Progress


def progress_bar(label: str = "rebuild", *, out: TextIO | None = None, width: int = 30) -> Progress:
    """A one-line progress display, to pass as ``progress``. Redraws in place (``\\r``) at most ten
    times a second, on stderr so that stdout stays parseable."""
    return _ProgressBar(label, out or sys.stderr, width)


class _ProgressBar:
    def __init__(self, label: str, out: TextIO, width: int) -> None:
        self._label = label
        self._out = out
        self._width = width
        self._started = time.monotonic()
        self._drawn_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        finished = done >= total
        if not finished and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        filled = self._width if finished else self._width * done // max(total, 1)
        rate = done / max(now - self._started, 1e-9)
        self._out.write(
            f"\r{self._label} [{'#' * filled}{'.' * (self._width - filled)}] {done:,}/{total:,} events, {rate:,.0f}/s"
        )
        if finished:
            self._out.write("\n")
        self._out.flush()
