"""The stage timer: wall-clock and process-CPU seconds per named stage, which the reports show and
the benchmarks read. Its own module so that every layer that runs a stage can time it."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable


class StageTimer:
    """Wall-clock and process-CPU seconds per named stage, added up over repeated entries.

    The report shows the wall times; benchmarks on shared machines read the CPU times. The clocks
    are parameters so that tests can drive them instead of sleeping."""

    def __init__(self, wall_clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.process_time) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall_clock, self._cpu_clock = wall_clock, cpu_clock

    @contextmanager
    def __call__(self, stage: str):
        wall, cpu = self._wall_clock(), self._cpu_clock()
        try:
            yield
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + self._wall_clock() - wall
            self.cpu[stage] = self.cpu.get(stage, 0.0) + self._cpu_clock() - cpu

    @contextmanager
    def data_wait(self, clock=None):
        """Adds the time spent blocked on data while inside (``clock``, by default the data package's
        ``DATA_WAIT``) as the stage "data wait"; it overlaps the stages it happened in."""
        if clock is None:
            from .data import DATA_WAIT as clock
        before = clock.seconds
        try:
            yield
        finally:
            self.wall["data wait"] = self.wall.get("data wait", 0.0) + clock.seconds - before

    def rounded(self) -> tuple[dict[str, float], dict[str, float]]:
        return ({k: round(v, 3) for k, v in self.wall.items()}, {k: round(v, 3) for k, v in self.cpu.items()})
