"""The expert map: logical expert -> the workers holding a replica, with an epoch.

Immutable: every change makes a new map with epoch + 1, so an engine step can
run on one map from start to end while the controller publishes the next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from elasticmoe.core.experts import LogicalExpert, parse_expert


@dataclass(frozen=True)
class ExpertMap:
    """Where every logical expert has replicas, and how to reach each worker."""

    epoch: int
    # logical expert -> worker ids holding a replica (at most one per worker)
    replicas: Mapping[LogicalExpert, tuple[str, ...]]
    # worker id -> "host:port" of its gRPC service
    workers: Mapping[str, str]
    _by_worker: dict[str, tuple[LogicalExpert, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        by_worker: dict[str, list[LogicalExpert]] = {w: [] for w in self.workers}
        for expert, workers in self.replicas.items():
            if len(set(workers)) != len(workers):
                raise ValueError(f"expert {expert} has two replicas on one worker: {workers}")
            for w in workers:
                if w not in self.workers:
                    raise ValueError(f"expert {expert} is placed on unknown worker {w!r}")
                by_worker[w].append(expert)
        object.__setattr__(self, "_by_worker", {w: tuple(e) for w, e in by_worker.items()})

    def replicas_of(self, expert: LogicalExpert) -> tuple[str, ...]:
        """Workers holding ``expert`` (empty if none)."""
        return self.replicas.get(expert, ())

    def experts_on(self, worker_id: str) -> tuple[LogicalExpert, ...]:
        """Logical experts with a replica on ``worker_id``."""
        return self._by_worker.get(worker_id, ())

    @property
    def num_replicas(self) -> int:
        """Total replicas (physical experts) in the map."""
        return sum(len(w) for w in self.replicas.values())

    def missing(self, experts: Iterable[LogicalExpert]) -> list[LogicalExpert]:
        """Experts of ``experts`` that have no replica at all."""
        return [e for e in experts if not self.replicas.get(e)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (state store, admin API, pushes to engines)."""
        return {
            "epoch": self.epoch,
            "workers": dict(self.workers),
            "replicas": {str(e): list(w) for e, w in sorted(self.replicas.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertMap:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming a bad entry."""
        try:
            replicas = {}
            for key, workers in data["replicas"].items():
                replicas[parse_expert(key)] = tuple(workers)
            return cls(int(data["epoch"]), replicas, dict(data["workers"]))
        except (KeyError, ValueError, AttributeError, TypeError) as e:
            raise ValueError(f"invalid expert map: {e}") from e

    def with_changes(
        self,
        add: Iterable[tuple[LogicalExpert, str]] = (),
        remove: Iterable[tuple[LogicalExpert, str]] = (),
        workers: Mapping[str, str] | None = None,
    ) -> ExpertMap:
        """A new map (epoch + 1) with replicas added/removed and optionally a new worker set."""
        replicas = {e: list(w) for e, w in self.replicas.items()}
        for expert, worker in remove:
            if worker in replicas.get(expert, []):
                replicas[expert].remove(worker)
        for expert, worker in add:
            if worker not in replicas.setdefault(expert, []):
                replicas[expert].append(worker)
        return ExpertMap(
            self.epoch + 1,
            {e: tuple(w) for e, w in replicas.items()},
            dict(self.workers if workers is None else workers),
        )
