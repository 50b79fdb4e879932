"""The zero-downtime change, as pure data: which plans are accepted, the journaled steps,
and what a restarted controller does with a half-done change.

A change (replicate, evict, migrate, restore, add/remove worker) runs these steps,
each written to the state store's journal *before* it is taken::

    begin -> loaded -> published -> done
       \\________\\_______-> rolled_back

- ``begin``: the plan (:class:`Change`) is journaled; new workers start, new
  replicas load and are verified.
- ``loaded``: every new replica is verified; epoch N+1 is about to be published.
- ``published``: epoch N+1 is the map; engines switch at their next step.
- ``done``: no step on epoch N runs any more; what N+1 dropped is freed.

Before ``published`` a failure rolls the change back (free what was loaded);
after it the change can only be finished. :func:`recover` says which, from the
journal alone. :func:`plan_action` and :func:`check_change` are the one place
that decides whether a plan is acceptable: the controller and ``policy
simulate`` both call them, so simulation and production accept the same plans.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from elasticmoe.core.actions import Action
from elasticmoe.core.experts import LogicalExpert, parse_expert


class Step(enum.StrEnum):
    """A journaled step of a change."""

    BEGIN = "begin"
    LOADED = "loaded"
    PUBLISHED = "published"
    DONE = "done"
    ROLLED_BACK = "rolled_back"


_NEXT: dict[Step | None, frozenset[Step]] = {
    None: frozenset({Step.BEGIN}),
    Step.BEGIN: frozenset({Step.LOADED, Step.ROLLED_BACK}),
    Step.LOADED: frozenset({Step.PUBLISHED, Step.ROLLED_BACK}),
    Step.PUBLISHED: frozenset({Step.DONE}),
    Step.DONE: frozenset(),
    Step.ROLLED_BACK: frozenset(),
}


class ProtocolError(AssertionError):
    """A step out of order: a bug in the caller, never a runtime condition."""


def next_step(last: Step | None, step: Step) -> Step:
    """``step`` if it may follow ``last`` (None: nothing journaled yet); else ProtocolError."""
    if step not in _NEXT[last]:
        allowed = sorted(s.value for s in _NEXT[last]) or ["nothing (the change is over)"]
        raise ProtocolError(f"step {step.value!r} cannot follow {last and last.value!r}: {allowed}")
    return step


class PlanRefused(ValueError):
    """A plan the cluster does not accept; the message says why."""


Replica = tuple[LogicalExpert, str]


@dataclass(frozen=True)
class Change:
    """One zero-downtime change from epoch ``epoch`` to ``epoch + 1``."""

    kind: str
    epoch: int
    add: tuple[Replica, ...] = ()
    remove: tuple[Replica, ...] = ()
    add_workers: tuple[str, ...] = ()
    remove_workers: tuple[str, ...] = ()
    pool: str | None = None  # the pool of ``add_workers``

    def to_journal(self) -> dict[str, Any]:
        """The ``begin`` step's data."""
        return {
            "kind": self.kind,
            "epoch": self.epoch,
            "add": [[str(e), w] for e, w in self.add],
            "remove": [[str(e), w] for e, w in self.remove],
            "add_workers": list(self.add_workers),
            "remove_workers": list(self.remove_workers),
            "pool": self.pool,
        }

    @classmethod
    def from_journal(cls, data: Mapping[str, Any]) -> Change:
        """Inverse of :meth:`to_journal` (older journals lack ``pool``)."""
        return cls(
            kind=data["kind"],
            epoch=int(data["epoch"]),
            add=tuple((parse_expert(e), w) for e, w in data.get("add", ())),
            remove=tuple((parse_expert(e), w) for e, w in data.get("remove", ())),
            add_workers=tuple(data.get("add_workers", ())),
            remove_workers=tuple(data.get("remove_workers", ())),
            pool=data.get("pool"),
        )


@dataclass(frozen=True)
class WorkerSlots:
    """What a plan needs to know of a worker."""

    num_slots: int
    healthy: bool = True
    pool: str | None = None


@dataclass(frozen=True)
class ClusterView:
    """The placement and workers a plan is checked against (a snapshot, immutable)."""

    epoch: int
    placement: Mapping[LogicalExpert, tuple[str, ...]]
    workers: Mapping[str, WorkerSlots]
    experts: frozenset[LogicalExpert] = frozenset()  # every expert of the model
    max_workers: int | None = None
    _used: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        used = dict.fromkeys(self.workers, 0)
        for holders in self.placement.values():
            for w in holders:
                used[w] = used.get(w, 0) + 1
        object.__setattr__(self, "_used", used)

    def holders(self, e: LogicalExpert) -> tuple[str, ...]:
        """Workers holding a replica of ``e``."""
        return tuple(self.placement.get(e, ()))

    def used(self, worker: str) -> int:
        """Slots of ``worker`` in use."""
        return self._used.get(worker, 0)

    def pick_target(
        self,
        e: LogicalExpert,
        exclude: Iterable[str] = (),
        planned: Mapping[str, int] | None = None,
    ) -> str:
        """The healthy worker with the most free slots that does not hold ``e``."""
        exclude = set(exclude)
        planned = planned or {}
        candidates = []
        for w, spec in self.workers.items():
            if w in exclude or w in self.holders(e) or not spec.healthy:
                continue
            used = self.used(w) + planned.get(w, 0)
            if used < spec.num_slots:
                candidates.append((used - spec.num_slots, w))
        if not candidates:
            raise PlanRefused(f"no worker has a free slot for expert {e}; add a worker")
        return min(candidates)[1]

    def _check_target(self, e: LogicalExpert, target: str) -> None:
        spec = self.workers.get(target)
        if spec is None:
            raise PlanRefused(f"no worker {target!r}; workers: {sorted(self.workers)}")
        if not spec.healthy:
            raise PlanRefused(f"worker {target} is not healthy")
        if target in self.holders(e):
            raise PlanRefused(f"worker {target} already holds expert {e}")

    def _check_expert(self, e: LogicalExpert | None) -> LogicalExpert:
        if e is None:
            raise PlanRefused("the action names no expert")
        if self.experts and e not in self.experts:
            raise PlanRefused(f"expert {e} does not exist in the model")
        return e


def plan_action(
    view: ClusterView,
    action: Action,
    new_worker_ids: Sequence[str] = (),
    keep_off: Iterable[str] = (),
) -> Change:
    """The change that carries out ``action`` on ``view``, or :class:`PlanRefused`.

    ``new_worker_ids`` names the workers an ``add_worker`` brings (the caller
    owns naming: spares first, then fresh ids). ``keep_off``: workers a
    ``remove_worker`` must not move replicas to (they are being drained too).
    """
    kind = action.kind
    if kind in ("replicate", "restore"):
        e = view._check_expert(action.expert)
        # restore: no replica on a healthy worker (one on a dead worker still in the map
        # counts for nothing: the health loop removes that worker later)
        live = [w for w in view.holders(e) if w in view.workers and view.workers[w].healthy]
        if kind == "restore" and live:
            raise PlanRefused(f"expert {e} has a replica on healthy {live}; use replicate")
        target = action.target or view.pick_target(e)
        view._check_target(e, target)
        change = Change(kind, view.epoch, add=((e, target),))
    elif kind == "evict":
        e = view._check_expert(action.expert)
        if action.source not in view.holders(e):
            raise PlanRefused(f"worker {action.source} holds no replica of expert {e}")
        if len(view.holders(e)) <= 1:
            raise PlanRefused(f"expert {e} has one replica; evicting it would lose the expert")
        change = Change(kind, view.epoch, remove=((e, action.source),))
    elif kind == "migrate":
        e = view._check_expert(action.expert)
        if action.source not in view.holders(e):
            raise PlanRefused(f"worker {action.source} holds no replica of expert {e}")
        target = action.target or view.pick_target(e)
        view._check_target(e, target)
        change = Change(kind, view.epoch, add=((e, target),), remove=((e, action.source),))
    elif kind == "add_worker":
        if action.count < 1:
            raise PlanRefused(f"add_worker count={action.count}: must be at least 1")
        if len(new_worker_ids) != action.count:
            raise PlanRefused(f"add_worker of {action.count} needs as many new worker ids")
        if view.max_workers is not None and len(view.workers) + action.count > view.max_workers:
            raise PlanRefused(
                f"adding {action.count} worker(s) would exceed max_workers={view.max_workers}"
            )
        clash = sorted(set(new_worker_ids) & set(view.workers))
        if clash:
            raise PlanRefused(f"worker ids {clash} are in use")
        change = Change(kind, view.epoch, add_workers=tuple(new_worker_ids), pool=action.pool)
    elif kind == "remove_worker":
        worker = action.source
        if worker not in view.workers:
            raise PlanRefused(f"no worker {worker!r}; workers: {sorted(view.workers)}")
        if len(view.workers) <= 1:
            raise PlanRefused("cannot remove the last worker")
        exclude = {worker, *keep_off}
        adds: list[Replica] = []
        removes: list[Replica] = []
        planned: dict[str, int] = {}
        for e in sorted(x for x, ws in view.placement.items() if worker in ws):
            removes.append((e, worker))
            live = [w for w in view.holders(e) if w not in exclude]
            if not live:  # no copy stays: move it (from a peer, else the checkpoint)
                target = view.pick_target(e, exclude=exclude, planned=planned)
                planned[target] = planned.get(target, 0) + 1
                adds.append((e, target))
        change = Change(
            kind, view.epoch, add=tuple(adds), remove=tuple(removes), remove_workers=(worker,)
        )
    else:
        raise PlanRefused(f"unknown action kind {kind!r}")
    check_change(view, change)
    return change


def check_change(
    view: ClusterView, change: Change, new_worker_slots: int | None = None
) -> dict[LogicalExpert, tuple[str, ...]]:
    """The placement after ``change``, or :class:`PlanRefused` (the last word on a plan).

    ``new_worker_slots``: slots of each added worker (None: not checked, added
    workers hold nothing in the same change).
    """
    if change.epoch != view.epoch:
        raise PlanRefused(f"planned on epoch {change.epoch}, but the map is at {view.epoch}")
    workers = set(view.workers) | set(change.add_workers)
    for w in change.remove_workers:
        if w not in view.workers:
            raise PlanRefused(f"no worker {w!r} to remove")
    workers -= set(change.remove_workers)
    if not workers:
        raise PlanRefused("the change would leave no worker")
    placement = {e: list(ws) for e, ws in view.placement.items()}
    for e, w in change.remove:
        if w not in placement.get(e, []):
            raise PlanRefused(f"worker {w} holds no replica of expert {e}")
        placement[e].remove(w)
    for e, w in change.add:
        if w not in workers:
            raise PlanRefused(f"expert {e}: target {w!r} is not a worker after the change")
        if w in placement.setdefault(e, []):
            raise PlanRefused(f"worker {w} already holds expert {e}")
        placement[e].append(w)
    for w in change.remove_workers:
        stranded = sorted(str(e) for e, ws in placement.items() if w in ws)
        if stranded:
            raise PlanRefused(f"worker {w} is removed but still holds {stranded[:8]}")
    used: dict[str, int] = {}
    for ws in placement.values():
        for w in ws:
            used[w] = used.get(w, 0) + 1
    for w, n in used.items():
        slots = view.workers[w].num_slots if w in view.workers else new_worker_slots
        if slots is not None and n > slots:
            raise PlanRefused(f"worker {w} would hold {n} replicas in {slots} slots")
    experts = view.experts or frozenset(view.placement)
    missing = sorted(str(e) for e in experts if not placement.get(e))
    if missing:
        raise PlanRefused(f"change would leave experts without a replica: {missing[:8]}")
    return {e: tuple(ws) for e, ws in placement.items() if ws}


@dataclass(frozen=True)
class Recovery:
    """What a restarted controller does with an open change (from its journal alone)."""

    change: Change
    outcome: Literal["finish", "roll_back"]
    # finish: wait until no step runs on change.epoch, then free what it dropped
    drain_epoch: int | None
    unload: tuple[Replica, ...]
    stop_workers: tuple[str, ...]
    journal: tuple[Step, ...]  # the steps to journal once it is carried out


def recover(entries: Sequence[Mapping[str, Any]], map_epoch: int | None) -> Recovery:
    """Finish or roll back an open change.

    ``entries``: its journal (each ``{"step": ..., "data": ...}``, oldest first);
    ``map_epoch``: the epoch of the stored map. The change is finished when it
    reached ``published`` or when the stored map is past its epoch (the publish
    landed but the controller died before journaling it); else rolled back.
    """
    last: Step | None = None
    begin: Mapping[str, Any] | None = None
    for entry in entries:
        last = next_step(last, Step(entry["step"]))
        if last is Step.BEGIN:
            begin = entry["data"]
    if begin is None:
        raise ProtocolError("an open operation without a begin step")
    change = Change.from_journal(begin)
    published = last is Step.PUBLISHED or (map_epoch is not None and map_epoch > change.epoch)
    if published:
        steps = (Step.DONE,) if last is Step.PUBLISHED else (Step.PUBLISHED, Step.DONE)
        return Recovery(change, "finish", change.epoch, change.remove, change.remove_workers, steps)
    return Recovery(
        change, "roll_back", None, change.add, change.add_workers, (Step.ROLLED_BACK,)
    )
