"""The one percentile used for latency figures (SLO checks, chaos reports, benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by nearest rank, or None without values.

    Nearest rank (a value that was observed, never an interpolation) is what an
    SLO of "99% of tokens within X ms" means.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"q={q}: a percentile is between 0 and 100")
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]
