"""Which replica computes which rows: a pure function of counts, map and load.

Rows of one logical expert go to the live replica with the least load; a hot
expert with several live replicas has its rows split across them so they
level out. Load is the rows already given to a worker in this plan, weighted
by the worker's cost (1.0 normally; more for a worker seen to be slow). A
slow worker gets rows only for experts that have no replica on a normal one.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from elasticmoe.core.expert_map import ExpertMap
from elasticmoe.core.experts import LogicalExpert


@dataclass(frozen=True)
class RowSlice:
    """Rows ``start:end`` (in expert-grouped order) of logical expert ``expert``."""

    expert: int
    start: int
    end: int

    @property
    def num_rows(self) -> int:
        """How many rows."""
        return self.end - self.start


class NoLiveReplicaError(RuntimeError):
    """Some experts have no live replica right now."""

    def __init__(self, experts: list[LogicalExpert]) -> None:
        self.experts = experts
        shown = ", ".join(str(e) for e in experts[:8]) + ("..." if len(experts) > 8 else "")
        super().__init__(f"no live replica of expert(s) {shown}")


DispatchPlan = dict[str, list[RowSlice]]


class DispatchTable:
    """One step's dispatch inputs, fixed at the step's start.

    Live replicas (``down`` removed), the slow/normal split and the costs are
    taken once (per layer on first use, from the map, down set and costs the
    step began with); each layer then only splits its rows (:meth:`plan`).
    A worker that fails during the step is taken out with :meth:`mark_down`.
    """

    def __init__(
        self,
        expert_map: ExpertMap,
        down: Collection[str] = (),
        worker_cost: Mapping[str, float] | None = None,
        min_split_rows: int = 16,
    ) -> None:
        self.expert_map = expert_map
        self.down = set(down)
        self.cost = dict(worker_cost or {})
        self.min_split_rows = max(min_split_rows, 1)
        # layer -> expert -> candidate replicas (live; normal ones only, if any)
        self._rows: dict[int, dict[int, list[str]]] = {}

    def mark_down(self, worker: str) -> None:
        """``worker`` failed during the step: no more rows go there."""
        if worker not in self.down:
            self.down.add(worker)
            self._rows.clear()

    def candidates(self, layer: int, expert: int) -> list[str]:
        """The replicas rows of ``expert`` may go to (empty: none is live)."""
        row = self._rows.get(layer)
        if row is None:
            row = self._rows[layer] = {}
        live = row.get(expert)
        if live is None:
            live = [
                w for w in self.expert_map.replicas_of(LogicalExpert(layer, expert))
                if w not in self.down
            ]
            # a slow worker's delay is per call, not per row: any rows sent there hold up the
            # whole layer, so it gets none while the expert has a replica on a normal worker
            normal = [w for w in live if self.cost.get(w, 1.0) <= 1.0]
            live = row[expert] = normal or live
        return live

    def plan(self, layer: int, ranges: list[tuple[int, int, int]]) -> DispatchPlan:
        """Assign each expert's row range to live replicas.

        ranges: (expert, start, end) for every expert with rows, as from
        :meth:`ExpertGroups.ranges`. Raises :class:`NoLiveReplicaError` naming every
        expert left without a replica.
        """
        cost = self.cost
        load: dict[str, float] = {}
        plan: DispatchPlan = {}
        missing: list[LogicalExpert] = []
        # biggest first so the heavy experts claim the emptiest workers
        for expert, start, end in sorted(ranges, key=lambda r: r[1] - r[2]):
            live = self.candidates(layer, expert)
            if not live:
                missing.append(LogicalExpert(layer, expert))
                continue
            rows = end - start
            if len(live) == 1:
                worker = live[0]
                plan.setdefault(worker, []).append(RowSlice(expert, start, end))
                load[worker] = load.get(worker, 0.0) + rows * cost.get(worker, 1.0)
                continue
            parts = max(1, min(len(live), rows // self.min_split_rows))
            # the `parts` least-loaded replicas share the rows, level-filling them
            # projected load if this worker took all the rows: cost counts as well as load
            chosen = sorted(live, key=lambda w: (load.get(w, 0.0) + rows * cost.get(w, 1.0), w))
            chosen = chosen[:parts]
            share = _level_fill(
                rows, [load.get(w, 0.0) for w in chosen], [cost.get(w, 1.0) for w in chosen]
            )
            offset = start
            for worker, n in zip(chosen, share, strict=True):
                if n == 0:
                    continue
                plan.setdefault(worker, []).append(RowSlice(expert, offset, offset + n))
                load[worker] = load.get(worker, 0.0) + n * cost.get(worker, 1.0)
                offset += n
        if missing:
            raise NoLiveReplicaError(missing)
        return plan


def plan_dispatch(
    layer: int,
    ranges: list[tuple[int, int, int]],
    expert_map: ExpertMap,
    down: Collection[str] = (),
    worker_cost: Mapping[str, float] | None = None,
    min_split_rows: int = 16,
) -> DispatchPlan:
    """:meth:`DispatchTable.plan` with a table made for this one call."""
    return DispatchTable(expert_map, down, worker_cost, min_split_rows).plan(layer, ranges)


def _level_fill(rows: int, loads: list[float], costs: list[float]) -> list[int]:
    """Split ``rows`` so that load_i + n_i * cost_i comes out as even as possible."""
    share = [0] * len(loads)
    current = list(loads)
    # few replicas per expert, so an O(rows/chunk * replicas) loop is fine
    chunk = max(1, rows // (8 * len(loads)))
    remaining = rows
    while remaining:
        i = min(range(len(current)), key=lambda j: current[j] + chunk * costs[j])
        n = min(chunk, remaining)
        share[i] += n
        current[i] += n * costs[i]
        remaining -= n
    return share
