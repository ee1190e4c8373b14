"""SIGINT and SIGTERM as a request to save and stop (the CLI then exits with status 75)."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["Interrupt"]


class Interrupt:
    """A context in which SIGINT and SIGTERM set `requested` instead of killing the process.

    The loop checks `requested` after each step, saves a checkpoint and returns. A second
    signal of either kind restores the previous handlers and goes to its own: a Python handler
    (SIGINT's raises KeyboardInterrupt) is called at once, the default action is re-raised, so a
    stuck run can still be stopped. Outside the main thread it does nothing (signals cannot be
    caught there).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            previous = self._previous.get(signum)
            self._restore()
            if callable(previous):  # Python's SIGINT handler: KeyboardInterrupt, here and now
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: saving a checkpoint and stopping (send it again to stop "
              "at once)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._restore()
