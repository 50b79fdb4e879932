"""Recent time-to-first-token and inter-token latencies, for SLO checks."""

from __future__ import annotations

import time
from collections import deque


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
        samples = sorted(v for t, v in getattr(self, kind) if t >= now - window_s)
        if not samples:
            return None
        return 1e3 * samples[min(len(samples) - 1, int(q / 100 * len(samples)))]
