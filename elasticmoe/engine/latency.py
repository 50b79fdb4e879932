"""Recent time-to-first-token and inter-token latencies, for SLO checks."""

from __future__ import annotations

import time
from collections import deque

from elasticmoe.core.stats import percentile


class LatencyRecorder:
    """Bounded history of (timestamp, seconds) samples of TTFT and ITL."""

    def __init__(self, history: int = 20000) -> None:
        self.ttft: deque[tuple[float, float]] = deque(maxlen=history)
        self.itl: deque[tuple[float, float]] = deque(maxlen=history)

    def percentile_ms(
        self, kind: str, q: float, window_s: float, now: float | None = None
    ) -> float | None:
        """The q-th percentile (0..100) of ``kind`` ("ttft"|"itl") over the last window, in ms."""
        now = time.time() if now is None else now
        value = percentile((v for t, v in getattr(self, kind) if t >= now - window_s), q)
        return None if value is None else 1e3 * value
