"""Clean stops on SIGTERM (what schedulers send before killing a job) and SIGINT (Ctrl-C).

While a loop runs inside `stop_requests()`, either signal only sets a flag: the loop finishes the step it is in,
writes its checkpoint and raises `Interrupted`, which the CLI reports in one line (with how that command
continues) and exit status 128 + the signal (143, 130).  A second signal of the same kind does what it would have done alone (SIGINT raises
KeyboardInterrupt at once; SIGTERM ends the process), for a user who will not wait for the step to end.
Outside such a loop the signals keep their usual meaning.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from ..errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130}


class StopRequest:
    """The first stop signal received (None while running); read by the loop after every step."""

    def __init__(self):
        self.signal_number: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def interrupted(self, where: str) -> Interrupted:
        """The error that ends the run, naming the signal and what was saved (`where`)."""
        name = signal.Signals(self.signal_number).name
        return Interrupted(f"stopped by {name} {where}", self.signal_number)


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Catch SIGTERM and SIGINT into a `StopRequest` for the duration; the previous handlers come back on leaving.
    Off the main thread (signals cannot be caught there) the request simply never comes."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    previous = {number: signal.getsignal(number) for number in SIGNALS}

    def handle(number: int, frame) -> None:
        if request.signal_number == number:  # the second time: no more waiting
            signal.signal(number, previous[number] if callable(previous[number]) else signal.SIG_DFL)
            if number == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(number)
            return
        request.signal_number = request.signal_number or number

    for number in SIGNALS:
        signal.signal(number, handle)
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


__all__ = ["StopRequest", "stop_requests", "EXIT_STATUS"]
