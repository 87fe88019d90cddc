"""Reading the next batch while the current one is worked on, and timing what is still waited for.

Attacks and accuracy loops read lazily stored data a batch at a time; ``prefetched`` reads batch
i + 1 in one background thread (shared by the whole process) while the caller works on batch i, and
``DATA_WAIT`` adds up the seconds spent blocked on data, which the stage timer reports.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np

from .rows import Rows


class WaitClock:
    """Seconds spent blocked waiting for data, over the whole process (read per run as a difference)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds


DATA_WAIT = WaitClock()

_PREFETCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloakonnx-prefetch")


def prefetched(x, bounds: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
    """``x[s:e]`` for each (s, e) in ``bounds``; for lazy rows the next batch is read in the
    background while the caller works on this one, and time blocked on it goes to ``DATA_WAIT``."""
    bounds = list(bounds)
    if not isinstance(x, Rows):
        for s, e in bounds:
            yield x[s:e]
        return
    pending = _PREFETCH.submit(x.__getitem__, slice(*bounds[0])) if bounds else None
    for i in range(len(bounds)):
        t0 = time.perf_counter()
        batch = pending.result()
        DATA_WAIT.add(time.perf_counter() - t0)
        pending = _PREFETCH.submit(x.__getitem__, slice(*bounds[i + 1])) if i + 1 < len(bounds) else None
        yield batch


def batch_bounds(n: int, batch: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch, n)) for s in range(0, n, batch)]
