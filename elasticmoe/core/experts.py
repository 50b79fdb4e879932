"""Logical experts: ``(layer, expert)`` of the model, and their one text form.

``"3:5"`` (layer 3, expert 5) is how a logical expert is written everywhere
outside Python: the state store, the admin API, metric labels, configs and
the CLI. :func:`parse_expert` is the one parser of that form.
"""

from __future__ import annotations

from typing import NamedTuple


class LogicalExpert(NamedTuple):
    """``(layer, expert)`` of the model; never changes, whatever the placement."""

    layer: int
    expert: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.expert}"


def parse_expert(value: str | tuple[int, int] | LogicalExpert) -> LogicalExpert:
    """``"3:5"`` (layer:expert), a pair or a :class:`LogicalExpert` -> :class:`LogicalExpert`.

    Raises ``ValueError`` naming the bad text and the expected form.
    """
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"expert {value!r}: expected a (layer, expert) pair")
        return LogicalExpert(int(value[0]), int(value[1]))
    layer, sep, expert = str(value).partition(":")
    try:
        if not sep:
            raise ValueError
        return LogicalExpert(int(layer), int(expert))
    except ValueError:
        raise ValueError(f"expert {value!r}: expected 'layer:expert', e.g. '0:3'") from None
