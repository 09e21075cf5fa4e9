"""Stopping a run gracefully: SIGINT/SIGTERM end it at the next step boundary."""

from __future__ import annotations

import signal
import sys
import threading


class GracefulStop:
    """SIGINT/SIGTERM ask training to stop at the next step boundary; a second signal exits at once."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.signal_number is not None:
            print(f"\n{signal.Signals(number).name} again: exiting now", file=sys.stderr, flush=True)
            raise SystemExit(128 + number)
        self.signal_number = number
        print(
            f"\n{signal.Signals(number).name}: stopping at the next step boundary (send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )
