"""Stopping on a signal: the first Ctrl-C or SIGTERM asks the training loop to stop after the current step (it
then writes a complete checkpoint with resume state); a second one stops at once (KeyboardInterrupt). How a run
that ends early is reported is common/errors.py (RunFailed and its kinds)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM before the training loop: handled as Ctrl-C is, so that start-up cleans up after itself."""

    signum = signal.SIGTERM


@contextmanager
def terminate_as_interrupt():
    """While inside (start-up: loading, caching), SIGTERM raises Terminated instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopSignals:
    """Context manager: while inside, SIGINT/SIGTERM set `signum` instead of stopping the process."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum:  # the second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self, accelerator, due: bool = True) -> int:
        """The signal that asks to stop, agreed by every process (0: go on). With several processes they agree
        only at the steps the caller says are `due` (every process says the same): one tiny all-gather and host
        sync then, none at the other steps, so a stop is seen at the next due step."""
        if accelerator.num_processes == 1:
            return self.signum
        if not due:
            return 0
        flags = accelerator.gather(torch.tensor([self.signum], device=accelerator.device))
        return int(flags.max().item())


