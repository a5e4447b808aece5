"""Section timers for the training step: exclusive wall time per named section, for the speed benchmarks (bench/).

The trainer always runs its step inside these sections; with `NULL_TIMER` (the default) they cost a few
hundred nanoseconds and never synchronise the device.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch


class SectionTimer:
    """Exclusive seconds per section (time in a nested section counts only there)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        start = self._now()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            _, inner = self._stack.pop()
            elapsed = self._now() - start
            self.totals[name] += elapsed - inner
            if self._stack:
                self._stack[-1][1] += elapsed

    def reset(self) -> None:
        self.totals.clear()


class _NullTimer:
    def __call__(self, name: str):
        return nullcontext()


NULL_TIMER = _NullTimer()
