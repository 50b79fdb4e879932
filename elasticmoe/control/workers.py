"""The worker registry: every expert-worker process the controller runs, and its lifecycle.

A worker is ``STARTING`` while its process starts (the Kubernetes operator must
see it in the demand, nothing may use it), then ``SPARE`` (started, empty,
outside the map: an ``add_worker`` takes it instantly) or ``ACTIVE`` (in the
expert map). A worker leaves the registry when it is stopped. Health is a
cache: only the health loop probes workers; everything else reads the cache.

Plain data and no I/O: the controller persists entries in the state store.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class Lifecycle(enum.StrEnum):
    """Where a worker process is in its life."""

    STARTING = "starting"
    SPARE = "spare"
    ACTIVE = "active"


@dataclass
class WorkerRecord:
    """One registered worker (what ``ExpertWorker.info()`` said, plus our bookkeeping)."""

    worker_id: str
    address: str
    num_slots: int
    pool: str
    actor: str = ""
    node_id: str | None = None
    node_ip: str | None = None
    started: float = field(default_factory=time.time)
    lifecycle: Lifecycle = Lifecycle.ACTIVE

    def to_entry(self) -> dict[str, Any]:
        """The state store's registry entry (JSON)."""
        return {
            "address": self.address,
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "num_slots": self.num_slots,
            "pool": self.pool,
            "actor": self.actor,
            "started": self.started,
            "lifecycle": self.lifecycle.value,
        }

    @classmethod
    def from_entry(cls, worker_id: str, entry: Mapping[str, Any], pool: str) -> WorkerRecord:
        """Inverse of :meth:`to_entry` (older entries carry ``spare: bool`` instead)."""
        if "lifecycle" in entry:
            lifecycle = Lifecycle(entry["lifecycle"])
        else:
            lifecycle = Lifecycle.SPARE if entry.get("spare") else Lifecycle.ACTIVE
        return cls(
            worker_id=worker_id,
            address=entry["address"],
            num_slots=int(entry["num_slots"]),
            pool=entry.get("pool") or pool,
            actor=entry.get("actor", ""),
            node_id=entry.get("node_id"),
            node_ip=entry.get("node_ip"),
            started=float(entry.get("started", 0.0)),
            lifecycle=lifecycle,
        )


class WorkerRegistry:
    """Registered workers by id, workers being started, and the health cache."""

    def __init__(self, default_pool: str) -> None:
        self.default_pool = default_pool
        self.records: dict[str, WorkerRecord] = {}
        self._starting: dict[str, Lifecycle] = {}  # id -> what it becomes once started
        self._starting_pool: dict[str, str] = {}  # id -> the pool it starts in
        self._next = 0
        self._health: dict[str, bool] = {}  # the health loop's last word
        self._misses: dict[str, int] = {}  # consecutive failed health checks

    # -- ids and lifecycle
    def new_ids(self, count: int, becomes: Lifecycle, pool: str | None = None) -> list[str]:
        """Reserve ``count`` fresh worker ids in ``pool`` (default: the default pool),
        STARTING until registered or released."""
        ids = []
        for _ in range(count):
            ids.append(f"w{self._next}")
            self._next += 1
            self._starting[ids[-1]] = becomes
            self._starting_pool[ids[-1]] = pool or self.default_pool
        return ids

    def note_ids(self, worker_ids: Iterable[str]) -> None:
        """Never hand out these ids (a stored map or an open change still names them)."""
        ids = [int(w[1:]) for w in worker_ids if w[:1] == "w" and w[1:].isdigit()]
        self._next = max(self._next, max(ids, default=-1) + 1)

    def release(self, worker_ids: Iterable[str]) -> None:
        """The reserved workers did not start (or started and were registered)."""
        for w in worker_ids:
            self._starting.pop(w, None)
            self._starting_pool.pop(w, None)

    def num_starting(self, becomes: Lifecycle | None = None, pool: str | None = None) -> int:
        """Worker processes being started now (only those that become ``becomes``, in
        ``pool``)."""
        return sum(
            1
            for w, b in self._starting.items()
            if becomes in (None, b) and pool in (None, self._starting_pool.get(w))
        )

    def register(self, record: WorkerRecord) -> WorkerRecord:
        """Record a started (or adopted) worker; a new worker is presumed healthy."""
        self._starting.pop(record.worker_id, None)
        self._starting_pool.pop(record.worker_id, None)
        self.records[record.worker_id] = record
        self._health.setdefault(record.worker_id, True)
        self.note_ids([record.worker_id])
        return record

    def load(self, entries: Mapping[str, Mapping[str, Any]], in_map: Iterable[str]) -> None:
        """Replace the registry with the stored entries; a worker outside the map is a spare."""
        in_map = set(in_map)
        self.records = {}
        for w, entry in entries.items():
            record = WorkerRecord.from_entry(w, entry, self.default_pool)
            if w not in in_map:
                record.lifecycle = Lifecycle.SPARE
            self.register(record)
        self.note_ids(in_map)

    def forget(self, worker_id: str) -> None:
        """The worker was stopped."""
        self.records.pop(worker_id, None)
        self._starting.pop(worker_id, None)
        self._starting_pool.pop(worker_id, None)
        self._health.pop(worker_id, None)
        self._misses.pop(worker_id, None)

    def spares(self, pool: str | None = None) -> list[str]:
        """Started, empty workers outside the map (of ``pool``, if given), oldest id first."""
        return sorted(
            (
                w
                for w, r in self.records.items()
                if r.lifecycle is Lifecycle.SPARE and pool in (None, r.pool)
            ),
            key=lambda w: (len(w), w),
        )

    def take_spares(self, count: int, pool: str | None = None) -> list[str]:
        """Up to ``count`` spares (of ``pool``), now ACTIVE (they join the map in the
        same change)."""
        taken = self.spares(pool)[:count]
        for w in taken:
            self.records[w].lifecycle = Lifecycle.ACTIVE
        return taken

    def get(self, worker_id: str) -> WorkerRecord | None:
        """The record of ``worker_id`` (None if not registered)."""
        return self.records.get(worker_id)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self.records

    def __iter__(self):
        return iter(self.records)

    # -- health
    def healthy(self, worker_id: str) -> bool:
        """The cached health (a registered worker never probed counts as healthy)."""
        return self._health.get(worker_id, worker_id in self.records)

    def record_health(self, results: Mapping[str, bool]) -> None:
        """One round of the health loop: the new cache, and consecutive misses per worker."""
        self._health.update(results)
        for w, ok in results.items():
            if ok:
                self._misses.pop(w, None)
            else:
                self._misses[w] = self._misses.get(w, 0) + 1

    def misses(self, worker_id: str) -> int:
        """Health checks ``worker_id`` failed in a row."""
        return self._misses.get(worker_id, 0)
