"""One thread that calls something at a deadline unless it is disarmed first: how a wasm evaluation
running in another thread is stopped when its time budget is up (the callback bumps the wasmtime
engine's epoch, and the running module traps at its next loop or call).

`arm` and `disarm` are a lock and a dict operation each; the thread sleeps until the earliest
deadline and does nothing while nothing is armed, so a stream of short evaluations costs no
context switches. Firing and disarming exclude each other: once
`disarm()` returned, the callback has either run or never will.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Alarm:
    __slots__ = ("_key", "_watchdog")

    def __init__(self, watchdog: Watchdog, key: int) -> None:
        self._watchdog, self._key = watchdog, key

    def disarm(self) -> bool:
        """True if the alarm had not gone off."""
        return self._watchdog._disarm(self._key)


class Watchdog:
    def __init__(self, name: str = "policy-watchdog") -> None:
        self._name = name
        self._alarms: dict[int, tuple[float, Callable[[], None]]] = {}
        self._keys = itertools.count()
        self._changed = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._wake_at = math.inf
        """When the thread wakes next. A disarmed alarm does not move it: the thread wakes once for
        nothing rather than being woken on every arm."""

    def arm(self, seconds: float, callback: Callable[[], None]) -> Alarm:
        """Call `callback` (on the watchdog's thread) `seconds` from now unless disarmed before."""
        deadline = time.monotonic() + seconds
        with self._changed:
            key = next(self._keys)
            self._alarms[key] = (deadline, callback)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif deadline < self._wake_at:  # else the thread wakes in time anyway: no context switch
                self._changed.notify()
        return Alarm(self, key)

    def _disarm(self, key: int) -> bool:
        with self._changed:
            return self._alarms.pop(key, None) is not None

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for key, (due, callback) in list(self._alarms.items()):
                    if due <= now:
                        del self._alarms[key]
                        try:
                            callback()
                        except Exception:  # a failing callback must not stop every later alarm
                            log.exception("watchdog callback failed")
                self._wake_at = min((due for due, _ in self._alarms.values()), default=math.inf)
                self._changed.wait(None if self._wake_at == math.inf else max(0.0, self._wake_at - now))
