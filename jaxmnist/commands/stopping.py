"""Stopping a run gracefully: SIGINT/SIGTERM end it at the next step boundary, a second signal at once.

Python runs signal handlers in the main thread only, between bytecodes: a main thread blocked in a
compiled call (or in its compilation) would hold them back until the call returns, which for an epoch
of many seeds is many seconds. So the command trains in a worker thread (``run_in_worker``) while the
main thread only waits, in short polls, and answers signals at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

Result = TypeVar("Result")

# How often the waiting main thread wakes to let Python run a pending signal handler.
_POLL_SECONDS = 0.05


class GracefulStop:
    """SIGINT/SIGTERM ask training to stop at the next step boundary; a second signal exits at once.

    Before ``arm()`` (data loading, compilation of nothing yet) there is no work to save, so the first
    signal exits at once too.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self.armed = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def arm(self) -> None:
        """Training has begun: from now on a first signal stops at the next step boundary."""
        self.armed = True

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.signal_number is not None or not self.armed:
            why = "again: exiting now" if self.signal_number is not None else "before training began: exiting now"
            _exit_now(f"\n{name} {why}", 128 + number)
        self.signal_number = number
        print(
            f"\n{name}: stopping at the next step boundary (send it again to exit at once)", file=sys.stderr, flush=True
        )


def _exit_now(message: str, code: int) -> None:
    """Ends the process without waiting for the computation in flight; files are written atomically, so
    every checkpoint and output is the old one or the new one."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


def run_in_worker(function: Callable[..., Result], *args: object) -> Result:
    """``function(*args)`` in a worker thread while this thread waits in short polls; its result or error.

    Keeps the main thread free to run signal handlers while the worker is inside a long compiled call.
    """
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["result"] = function(*args)
        except BaseException as error:  # handed to the waiting thread, which raises it as its own
            outcome["error"] = error

    worker = threading.Thread(target=work, name="jaxmnist-train", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(_POLL_SECONDS)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
