"""Wall time of each stage of a lab build, for its manifest (``build_s``): how long a user waits for each part."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class Stopwatch:
    """Laps of named stages, each timed from the end of the previous one."""

    def __init__(self, label: str):
        self.label = label
        self.laps: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        self.laps[name] = round(time.perf_counter() - self._clock, 1)
        self._clock = time.perf_counter()
        logger.info("%s: %s done in %.1f s", self.label, name, self.laps[name])

    def report(self) -> dict[str, float]:
        return {**self.laps, "total": round(sum(self.laps.values()), 1)}
