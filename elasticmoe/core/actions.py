"""Scaling actions: what the autoscaler decides and the controller carries out.

Plain, immutable data with a JSON form, so a decision can be journaled,
shown by the CLI and replayed by the simulator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from elasticmoe.core.experts import LogicalExpert, parse_expert

ActionKind = Literal["replicate", "evict", "migrate", "add_worker", "remove_worker", "restore"]


@dataclass(frozen=True)
class Action:
    """One change to the placement or the worker set.

    - replicate: new replica of ``expert`` on ``target`` (None: controller picks)
    - evict: drop the replica of ``expert`` on ``source``
    - migrate: move the replica of ``expert`` from ``source`` to ``target``
    - add_worker: start ``count`` workers in ``pool``
    - remove_worker: drain and stop worker ``source``
    - restore: bring back ``expert`` that lost its last replica (on ``target``)
    """

    kind: ActionKind
    expert: LogicalExpert | None = None
    source: str | None = None
    target: str | None = None
    pool: str | None = None
    count: int = 1
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = asdict(self)
        d["expert"] = str(self.expert) if self.expert is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Action:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        if data.get("expert") is not None:
            data["expert"] = parse_expert(data["expert"])
        return cls(**data)

    def __str__(self) -> str:
        parts = [self.kind]
        if self.expert is not None:
            parts.append(f"expert={self.expert}")
        if self.source:
            parts.append(f"from={self.source}")
        if self.target:
            parts.append(f"to={self.target}")
        if self.pool:
            parts.append(f"pool={self.pool} x{self.count}")
        if self.reason:
            parts.append(f"({self.reason})")
        return " ".join(parts)
