"""Waiting on conditions, never on durations: the one helper the tests poll with."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 60.0) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout_s`` (a bound
    for a stuck test on a loaded machine, not a measured duration)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
