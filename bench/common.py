"""Shared helpers for the benchmark scripts in ``bench/``.

Benchmarks print one JSON document on stdout (:func:`emit_json`) and everything meant for a
human (progress bars, notes) on stderr through :data:`console`, so that
``python bench/x.py > result.json`` captures just the result.

Traffic shapes come from the Azure LLM inference trace 2023 (conversation service):
:func:`load_trace` reads it, :func:`select_rows` picks a window and :class:`LengthScaling`
shrinks its token counts to what a small CPU model can serve.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

__all__ = [
    "DEFAULT_TRACE",
    "REPO_ROOT",
    "LengthScaling",
    "Timer",
    "TraceRow",
    "console",
    "emit_json",
    "load_trace",
    "scale_lengths",
    "select_rows",
    "timer",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"

console = Console(stderr=True)
"""Console for progress and human-readable notes; stdout is reserved for the JSON result."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a trace: arrival time (seconds after the first row) and token counts."""

    timestamp: float
    context_tokens: int
    generated_tokens: int


def load_trace(path: str | Path) -> list[TraceRow]:
    """Read an Azure LLM trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    Timestamps become float seconds relative to the first row (the trace's timestamps carry
    100 ns digits; :func:`datetime.fromisoformat` keeps microseconds).
    """
    rows: list[TraceRow] = []
    start: datetime | None = None
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        for rec in reader:
            ts = datetime.fromisoformat(rec["TIMESTAMP"].strip())
            start = start or ts
            rows.append(
                TraceRow(
                    timestamp=(ts - start).total_seconds(),
                    context_tokens=int(rec["ContextTokens"]),
                    generated_tokens=int(rec["GeneratedTokens"]),
                )
            )
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def select_rows(
    rows: Sequence[TraceRow], n: int, *, seed: int = 0, start: int | None = None
) -> tuple[int, list[TraceRow]]:
    """Pick ``n`` consecutive rows; the first is ``start`` or, if None, drawn from ``seed``.

    Returns ``(start, rows)``; timestamps are re-based so the first selected row is at 0.
    """
    if not 1 <= n <= len(rows):
        raise ValueError(f"cannot take {n} rows from a trace of {len(rows)}")
    if start is None:
        start = random.Random(seed).randrange(len(rows) - n + 1)
    if not 0 <= start <= len(rows) - n:
        raise ValueError(f"start={start} out of range for {n} rows of {len(rows)}")
    window = rows[start : start + n]
    t0 = window[0].timestamp
    return start, [TraceRow(r.timestamp - t0, r.context_tokens, r.generated_tokens) for r in window]


@dataclass(frozen=True, slots=True)
class LengthScaling:
    """Shrink trace lengths: ``clamp(ceil(tokens / divisor), min, max)`` for prompt and output."""

    context_divisor: float = 8.0
    prompt_min: int = 4
    prompt_max: int = 256
    generated_divisor: float = 4.0
    output_min: int = 4
    output_max: int = 128
    rule: str = field(default="clamp(ceil(tokens / divisor), min, max)", init=False)

    def prompt_len(self, context_tokens: int) -> int:
        """The scaled prompt length for a trace row's context tokens."""
        return _clamp(
            math.ceil(context_tokens / self.context_divisor), self.prompt_min, self.prompt_max
        )

    def output_len(self, generated_tokens: int) -> int:
        """The scaled output length for a trace row's generated tokens."""
        return _clamp(
            math.ceil(generated_tokens / self.generated_divisor), self.output_min, self.output_max
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description of the rule (goes into the benchmark's output)."""
        return asdict(self)


def _clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


def scale_lengths(
    rows: Sequence[TraceRow], scaling: LengthScaling | None = None
) -> list[tuple[int, int]]:
    """``(prompt_len, output_len)`` for each row under ``scaling`` (default: /8 and /4)."""
    s = scaling or LengthScaling()
    return [(s.prompt_len(r.context_tokens), s.output_len(r.generated_tokens)) for r in rows]


def emit_json(result: dict[str, Any]) -> None:
    """Print ``result`` as indented JSON on stdout (the benchmark's only stdout output)."""
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    sys.stdout.flush()


@dataclass(slots=True)
class Timer:
    """Wall time of a :func:`timer` block; ``elapsed`` is set when the block exits."""

    elapsed: float = 0.0
    _start: float = 0.0


@contextmanager
def timer() -> Iterator[Timer]:
    """Time a block with :func:`time.perf_counter`: ``with timer() as t: ...; t.elapsed``."""
    t = Timer(_start=time.perf_counter())
    try:
        yield t
    finally:
        t.elapsed = time.perf_counter() - t._start
