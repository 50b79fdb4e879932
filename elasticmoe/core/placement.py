"""Where replicas go: pure functions of load, limits and the current placement.

A *logical expert* ``(layer, expert)`` has one or more *replicas*, each in one *slot* of
one *worker*; the slots of a worker are shared by all layers. MoE layers run one after
another and a layer finishes when its most loaded worker does, so a placement is judged
per layer: the token load of the most loaded worker against the mean (see
:func:`balancedness`). Every replica that appears on a worker costs a weight copy (see
:func:`count_moves`).

- :func:`initial_placement`: the first placement, before any load has been seen.
- :func:`rebalance`: the product algorithm. Starts from the current placement and improves
  per-layer balance with as few new replica copies as it can.
- :func:`eplb_greedy`: the from-scratch baseline of DeepSeek's EPLB and vLLM, kept to
  measure :func:`rebalance` against.
- :func:`diff_placement`: the migrate / replicate / evict actions from one placement to
  another, for the controller to carry out.

No Ray, no I/O: everything here is a function of its arguments and is deterministic.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from elasticmoe.core.actions import Action
from elasticmoe.core.experts import LogicalExpert

__all__ = [
    "Placement",
    "WorkerSpec",
    "balancedness",
    "count_moves",
    "diff_placement",
    "eplb_greedy",
    "initial_placement",
    "rebalance",
    "worker_layer_loads",
]

Placement = dict[LogicalExpert, tuple[str, ...]]
"""Logical expert -> ids of the workers holding a replica (at most one per worker)."""

# A move must lower the layer's critical path by more than this fraction of the layer's
# mean worker load; below that, float noise could make the search chase its own tail.
_REL_EPS = 1e-6


@dataclass(frozen=True)
class WorkerSpec:
    """A live worker and how many replicas it can hold (slots are shared by all layers)."""

    worker_id: str
    num_slots: int


def initial_placement(
    experts: Sequence[LogicalExpert],
    workers: Sequence[str],
    num_slots: int | Mapping[str, int],
    replicas: int | Mapping[LogicalExpert, int] = 1,
) -> Placement:
    """Spread replicas over workers evenly, never two of one expert on a worker.

    Replicas are dealt round-robin, starting each expert's copies on the
    emptiest workers (by the share of their slots in use, when ``num_slots``
    gives each worker its own count: pools of different accelerators hold
    different numbers of experts), so slot use differs by at most one across
    workers of one size. Raises ``ValueError`` naming the limit when the
    replicas cannot fit.
    """
    if not workers:
        raise ValueError("no workers to place experts on")
    slots = (
        {w: num_slots[w] for w in workers}
        if isinstance(num_slots, Mapping)
        else dict.fromkeys(workers, num_slots)
    )

    def count(e: LogicalExpert) -> int:
        return replicas.get(e, 1) if isinstance(replicas, Mapping) else replicas

    total = sum(count(e) for e in experts)
    if total > sum(slots.values()):
        shape = (
            f"{len(workers)} workers x {num_slots} slots"
            if not isinstance(num_slots, Mapping)
            else f"{len(workers)} workers with {sum(slots.values())} slots in all"
        )
        raise ValueError(f"{total} replicas do not fit in {shape}; add workers or slots_per_worker")
    used = {w: 0 for w in workers}
    placement: Placement = {}
    for expert in experts:
        n = count(expert)
        if not 1 <= n <= len(workers):
            raise ValueError(
                f"expert {expert}: {n} replicas requested, "
                f"must be 1..{len(workers)} (one per worker)"
            )
        chosen = sorted(
            (w for w in workers if used[w] < slots[w]), key=lambda w: used[w] / slots[w]
        )[:n]
        if len(chosen) < n:
            raise ValueError(
                f"expert {expert}: not enough workers with a free slot for {n} replicas"
            )
        for w in chosen:
            used[w] += 1
        placement[expert] = tuple(chosen)
    return placement


# --------------------------------------------------------------------------- metrics


def worker_layer_loads(
    placement: Mapping[LogicalExpert, Sequence[str]], load: Mapping[LogicalExpert, float]
) -> dict[int, dict[str, float]]:
    """Token load per MoE layer per worker: ``{layer: {worker_id: tokens}}``.

    An expert's load (tokens per window) is split evenly across its replicas. Every worker
    that appears anywhere in ``placement`` is listed in every layer (0.0 where it holds
    nothing of that layer). Experts with no replica contribute nothing.
    """
    all_workers = sorted({w for ws in placement.values() for w in ws})
    layers = sorted({e.layer for e in placement} | {e.layer for e in load})
    out = {layer: dict.fromkeys(all_workers, 0.0) for layer in layers}
    for expert, ws in placement.items():
        holders = set(ws)
        if not holders:
            continue
        share = float(load.get(expert, 0.0)) / len(holders)
        per_worker = out[expert.layer]
        for w in holders:
            per_worker[w] += share
    return out


def balancedness(
    placement: Mapping[LogicalExpert, Sequence[str]],
    load: Mapping[LogicalExpert, float],
    workers: Sequence[WorkerSpec | str],
) -> float:
    """Mean over MoE layers of ``mean worker load / max worker load`` (1.0 = perfect).

    The mean is over all ``workers`` (idle ones count as 0), because every worker could
    have taken a share of the layer. Layers with no load are skipped; with no load at all
    the result is 1.0. Raises ``ValueError`` if ``placement`` uses a worker not in
    ``workers``.
    """
    ids = [w.worker_id if isinstance(w, WorkerSpec) else w for w in workers]
    if not ids:
        raise ValueError("balancedness needs at least one worker")
    known = set(ids)
    ratios = []
    for layer, per_worker in sorted(worker_layer_loads(placement, load).items()):
        unknown = sorted(w for w, x in per_worker.items() if w not in known and x > 0.0)
        if unknown:
            raise ValueError(f"layer {layer}: placement uses workers {unknown} not in workers")
        total = sum(per_worker.get(w, 0.0) for w in ids)
        peak = max(per_worker.get(w, 0.0) for w in ids)
        if peak > 0.0:
            ratios.append(total / len(ids) / peak)
    return sum(ratios) / len(ratios) if ratios else 1.0


def count_moves(
    old: Mapping[LogicalExpert, Sequence[str]], new: Mapping[LogicalExpert, Sequence[str]]
) -> int:
    """Replicas in ``new`` that ``old`` did not have: each one is a weight copy."""
    return sum(len(set(ws) - set(old.get(e, ()))) for e, ws in new.items())


# --------------------------------------------------------------------------- diff


def diff_placement(
    old: Mapping[LogicalExpert, Sequence[str]], new: Mapping[LogicalExpert, Sequence[str]]
) -> list[Action]:
    """The actions that turn ``old`` into ``new``.

    Per expert, a replica that leaves worker A while another arrives at worker B becomes
    one ``migrate`` A -> B (pairs taken in worker-id order); other arrivals are
    ``replicate`` and other departures ``evict``. Evictions come first (they free slots
    and never take an expert's last replica: a migrating expert keeps its source until
    the copy lands). Migrations and replications follow in an order where each target
    has a free slot, assuming a worker's capacity is at least the larger of its use in
    ``old`` and in ``new``; a cycle of swaps between full workers (which no order
    avoids) is emitted as is and needs a scratch slot from the controller.
    """
    evicts: list[Action] = []
    arrivals: list[Action] = []
    for expert in sorted(set(old) | set(new)):
        before, after = set(old.get(expert, ())), set(new.get(expert, ()))
        gone, came = sorted(before - after), sorted(after - before)
        pairs = min(len(gone), len(came))
        for src, dst in zip(gone[:pairs], came[:pairs], strict=True):
            arrivals.append(Action("migrate", expert, source=src, target=dst, reason="placement"))
        for dst in came[pairs:]:
            arrivals.append(Action("replicate", expert, target=dst, reason="placement"))
        for src in gone[pairs:]:
            evicts.append(Action("evict", expert, source=src, reason="placement"))

    used: dict[str, int] = defaultdict(int)
    cap: dict[str, int] = defaultdict(int)
    for ws in old.values():
        for w in set(ws):
            used[w] += 1
    for ws in new.values():
        for w in set(ws):
            cap[w] += 1
    for w in list(used):
        cap[w] = max(cap[w], used[w])
    for a in evicts:
        used[a.source] -= 1  # type: ignore[index]

    ordered: list[Action] = []
    pending = arrivals
    while pending:
        ready = next((a for a in pending if used[a.target] < cap[a.target]), pending[0])  # type: ignore[index]
        pending = [a for a in pending if a is not ready]
        ordered.append(ready)
        used[ready.target] += 1  # type: ignore[index]
        if ready.kind == "migrate":
            used[ready.source] -= 1  # type: ignore[index]
    return evicts + ordered


# --------------------------------------------------------------------------- baseline


def eplb_greedy(
    load: Mapping[LogicalExpert, float],
    workers: Sequence[WorkerSpec],
    replicas_per_layer: int,
) -> Placement:
    """From-scratch placement as DeepSeek's EPLB (global policy) and vLLM compute it.

    Per layer: start with one replica per expert and keep adding a replica to the expert
    with the highest load per replica until ``replicas_per_layer`` replicas exist. Then
    pack replicas heaviest first (by load per replica), each onto the least loaded worker
    that still has room in the layer's per-worker quota (``replicas_per_layer //
    num_workers``; the first ``replicas_per_layer % num_workers`` workers take one more)
    and does not already hold that expert. It ignores where replicas are now, which is
    why a system that re-runs it copies most of its experts every time. Experts are the
    keys of ``load``. Raises ``ValueError`` when the quotas do not fit the slots.
    """
    ids = _check_workers(workers)
    num_workers = len(ids)
    layers = _group_by_layer(load)
    if not layers:
        return {}
    quota = [
        replicas_per_layer // num_workers + (1 if i < replicas_per_layer % num_workers else 0)
        for i in range(num_workers)
    ]
    for i, spec in enumerate(workers):
        if quota[i] * len(layers) > spec.num_slots:
            raise ValueError(
                f"worker {spec.worker_id}: num_slots={spec.num_slots} < {quota[i]} replicas "
                f"per layer x {len(layers)} layers; lower replicas_per_layer or add slots"
            )
    placement: Placement = {}
    for layer, experts in layers.items():
        if not len(experts) <= replicas_per_layer <= len(experts) * num_workers:
            raise ValueError(
                f"layer {layer}: replicas_per_layer={replicas_per_layer} must be between the "
                f"number of experts ({len(experts)}) and experts x workers "
                f"({len(experts) * num_workers})"
            )
        counts = dict.fromkeys(experts, 1)
        heap = [(-_load_of(load, e), e) for e in experts]
        heapq.heapify(heap)
        for _ in range(replicas_per_layer - len(experts)):
            _, e = heapq.heappop(heap)
            counts[e] += 1
            if counts[e] < num_workers:
                heapq.heappush(heap, (-_load_of(load, e) / counts[e], e))
        items = sorted(
            ((_load_of(load, e) / counts[e], e) for e in experts for _ in range(counts[e])),
            key=lambda item: (-item[0], item[1]),
        )
        worker_load = [0.0] * num_workers
        held: list[list[tuple[float, LogicalExpert]]] = [[] for _ in range(num_workers)]
        for share, e in items:
            room = [
                i
                for i in range(num_workers)
                if len(held[i]) < quota[i] and all(f != e for _, f in held[i])
            ]
            if room:
                i = min(room, key=lambda i: (worker_load[i], i))
            else:
                i = _make_room(held, worker_load, quota, e)
            held[i].append((share, e))
            worker_load[i] += share
        for i, items_on in enumerate(held):
            for _, e in items_on:
                placement[e] = (*placement.get(e, ()), ids[i])
    return {e: placement[e] for e in sorted(placement)}


def _make_room(
    held: list[list[tuple[float, LogicalExpert]]],
    worker_load: list[float],
    quota: list[int],
    expert: LogicalExpert,
) -> int:
    """Every worker with room already holds ``expert``: move some other replica from a full
    worker that lacks ``expert`` to one with room, and return the full worker."""
    best: tuple[float, int, int, int] | None = None
    for i in range(len(held)):
        if len(held[i]) >= quota[i]:
            continue  # i has room (and holds expert)
        for j in range(len(held)):
            if any(f == expert for _, f in held[j]):
                continue
            for k, (share, f) in enumerate(held[j]):
                if any(g == f for _, g in held[i]):
                    continue
                key = max(worker_load[i] + share, worker_load[j] - share)
                if best is None or key < best[0]:
                    best = (key, i, j, k)
    if best is None:
        raise ValueError(
            f"expert {expert}: no way to place its replicas on distinct workers within the "
            "per-layer quotas; lower replicas_per_layer or add workers"
        )
    _, i, j, k = best
    share, f = held[j].pop(k)
    worker_load[j] -= share
    held[i].append((share, f))
    worker_load[i] += share
    return j


# --------------------------------------------------------------------------- rebalance


def rebalance(
    load: Mapping[LogicalExpert, float],
    workers: Sequence[WorkerSpec],
    current: Mapping[LogicalExpert, Sequence[str]],
    *,
    replicas_per_layer: int | None = None,
    min_replicas: int = 1,
    max_replicas: int | None = None,
    max_moves: int | None = None,
    tolerance: float = 0.02,
) -> Placement:
    """Improve per-layer balance starting from ``current``, copying as few replicas as it can.

    ``load`` is tokens per window per logical expert; ``workers`` are the live workers
    (replicas in ``current`` on any other worker are dropped); the experts placed are the
    keys of ``load`` and of ``current`` (missing load counts as 0). ``replicas_per_layer``
    caps each layer's replicas (physical experts) and, like EPLB's ``num_replicas``, is
    spent where load per replica is highest; without it a layer grows only where its load
    needs it, into its share of the free slots. ``max_replicas`` defaults to one per worker.

    1. Repair. Evict replicas above ``max_replicas``, above a worker's ``num_slots``
       (moving them only if they are needed for ``min_replicas``) and above
       ``replicas_per_layer``, coldest first; give experts below ``min_replicas`` new
       replicas on the least loaded workers (evicting a spare replica of a cold expert
       where no slot is free). These copies are made whatever ``max_moves`` says.
    2. Triage. Per layer, the reference is what a from-scratch packing reaches on this
       load (water-filled replica counts, heaviest replica first onto the least loaded
       worker). A layer whose ``mean / max`` worker load is within ``tolerance`` of the
       reference is left alone -- so a balanced placement comes back unchanged. The
       others are re-balanced, worst first, to within ``0.75 * tolerance``.
    3. Re-balance a layer. _Replica counts change only where an expert's load per
       replica is well above the water level (hysteresis against load noise). Then
       candidate packings: a heaviest-first pass that leaves each replica on its worker
       while that worker stays under a threshold and puts the others on the least
       loaded worker with a free slot (from "keep everything" down to tighter
       thresholds), each refined by a local search that repeatedly takes the most
       loaded worker and migrates one of its replicas to a worker with a free slot or
       swaps it with a lighter one -- the step that removes the most load above the aim
       per weight copy, accepted only if it lowers the local peak by more than an
       epsilon. A from-scratch packing is tried only if no sticky one reaches the
       tolerance. The candidate with the fewest new copies that reaches the aim wins.
       A last single-step search on the real placement may also add or evict replicas
       and make room on a full worker by evicting a spare replica of another layer whose
       critical path does not grow.

    ``max_moves`` caps the copies (replicas in the result that ``current`` lacked); once
    reached, remaining layers are left as they are. Every expert ends with
    ``min_replicas``..``max_replicas`` replicas on distinct live workers and no worker
    holds more than ``num_slots``. Deterministic. Raises ``ValueError`` naming the
    constraint when they cannot all hold.
    """
    ids = _check_workers(workers)
    num_workers = len(ids)
    if min_replicas < 1:
        raise ValueError(f"min_replicas={min_replicas} must be >= 1")
    if min_replicas > num_workers:
        raise ValueError(
            f"min_replicas={min_replicas} needs that many distinct workers, "
            f"only {num_workers} are live; add workers or lower min_replicas"
        )
    if max_replicas is not None and max_replicas < min_replicas:
        raise ValueError(f"max_replicas={max_replicas} < min_replicas={min_replicas}")
    if max_moves is not None and max_moves < 0:
        raise ValueError(f"max_moves={max_moves} must be >= 0")
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be >= 0")
    for e, x in load.items():
        if not (math.isfinite(x) and x >= 0):
            raise ValueError(f"load of expert {e} is {x}; loads must be finite and >= 0")
    experts = sorted(set(load) | set(current))
    layers = _group_by_layer(dict.fromkeys(experts, 0.0))
    num_min = len(experts) * min_replicas
    slots = sum(min(w.num_slots, len(experts)) for w in workers)
    if slots < num_min:
        raise ValueError(
            f"not enough slots: {len(experts)} experts x min_replicas={min_replicas} = "
            f"{num_min} replicas, but the {num_workers} workers have {slots} usable slots "
            "(num_slots, at most one replica of an expert per worker); add workers or slots"
        )
    if replicas_per_layer is not None:
        for layer, les in layers.items():
            if replicas_per_layer < len(les) * min_replicas:
                raise ValueError(
                    f"replicas_per_layer={replicas_per_layer} < layer {layer}'s "
                    f"{len(les)} experts x min_replicas={min_replicas}"
                )
    max_eff = num_workers if max_replicas is None else min(max_replicas, num_workers)

    st = _State(ids, [w.num_slots for w in workers], load, layers, current, replicas_per_layer)
    st.repair(min_replicas, max_eff)
    st.balance(min_replicas, max_eff, max_moves, tolerance)
    return st.result()


# --------------------------------------------------------------------------- internals


def _check_workers(workers: Sequence[WorkerSpec]) -> list[str]:
    ids = [w.worker_id for w in workers]
    if not ids:
        raise ValueError("no workers to place experts on")
    if len(set(ids)) != len(ids):
        dup = sorted({w for w in ids if ids.count(w) > 1})
        raise ValueError(f"duplicate worker ids {dup}")
    for w in workers:
        if w.num_slots < 0:
            raise ValueError(f"worker {w.worker_id}: num_slots={w.num_slots} must be >= 0")
    return ids


def _group_by_layer(load: Mapping[LogicalExpert, float]) -> dict[int, list[LogicalExpert]]:
    layers: dict[int, list[LogicalExpert]] = defaultdict(list)
    for e in sorted(load):
        layers[e.layer].append(e)
    return dict(sorted(layers.items()))


def _load_of(load: Mapping[LogicalExpert, float], e: LogicalExpert) -> float:
    return float(load.get(e, 0.0))


_Replica = tuple[LogicalExpert, int]  # (expert, worker index)

# A layer out of tolerance is re-balanced to within this fraction of the tolerance, so that
# it does not drift straight back out in the next window.
_AIM = 0.75
# An expert gets more replicas only once its load per replica exceeds the layer's water
# level by this fraction: load noise then does not churn replica counts.
_COUNT_SLACK = 0.25
# Sticky re-pack thresholds below "keep everything", as fractions above the lower bound.
_STICKY = (0.05, 0.02, 0.01, 0.0)


def _water_counts(
    loads: Sequence[float], budget: int, min_replicas: int, max_eff: int
) -> list[int]:
    """Replicas per expert that minimise the max load per replica with ``budget`` replicas
    in all, each expert having ``min_replicas``..``max_eff`` (greedy water-filling)."""
    counts = [min_replicas] * len(loads)
    heap = [(-x / min_replicas, i) for i, x in enumerate(loads) if min_replicas < max_eff]
    heapq.heapify(heap)
    for _ in range(max(0, budget - len(loads) * min_replicas)):
        if not heap:
            break
        _, i = heapq.heappop(heap)
        counts[i] += 1
        if counts[i] < max_eff:
            heapq.heappush(heap, (-loads[i] / counts[i], i))
    return counts


def _water_level(loads: Sequence[float], budget: int, min_replicas: int, max_eff: int) -> float:
    """Least possible max load per replica with ``budget`` replicas (see _water_counts)."""
    counts = _water_counts(loads, budget, min_replicas, max_eff)
    return max((x / n for x, n in zip(loads, counts, strict=True)), default=0.0)


@dataclass(frozen=True)
class _Move:
    """One search step: replicas to drop and replicas to copy, applied together."""

    removes: tuple[_Replica, ...]
    adds: tuple[_Replica, ...]


class _Layer:
    """Mutable view of one layer: who holds what, and each worker's load in the layer."""

    def __init__(self, layer: int, experts: list[LogicalExpert], num_workers: int) -> None:
        self.layer = layer
        self.experts = experts
        self.on: list[set[LogicalExpert]] = [set() for _ in range(num_workers)]
        self.wl = [0.0] * num_workers
        self.count = 0
        self.budget = 0  # replicas the layer may have
        self.mean = 0.0  # mean worker load
        self.level = 0.0  # least possible max load per replica within the budget
        self.best_max = 0.0  # lower bound on the layer's critical path
        self.trigger = math.inf  # above this critical path the layer is re-balanced ...
        self.aim = math.inf  # ... down to this one


class _State:
    """The placement being built, indexed for the search (workers by position)."""

    def __init__(
        self,
        ids: list[str],
        cap: list[int],
        load: Mapping[LogicalExpert, float],
        layers: dict[int, list[LogicalExpert]],
        current: Mapping[LogicalExpert, Sequence[str]],
        budget: int | None,
    ) -> None:
        self.ids = ids
        self.cap = cap
        self.budget = budget
        self.num_workers = len(ids)
        index = {w: i for i, w in enumerate(ids)}
        self.load = {e: _load_of(load, e) for es in layers.values() for e in es}
        self.layers = {layer: _Layer(layer, es, len(ids)) for layer, es in layers.items()}
        self.holders: dict[LogicalExpert, set[int]] = {e: set() for e in self.load}
        self.order: dict[LogicalExpert, list[int]] = {}  # original order, for the output
        self.used = [0] * len(ids)
        for e in self.load:
            kept = list(dict.fromkeys(index[w] for w in current.get(e, ()) if w in index))
            self.order[e] = kept
            for w in kept:
                self._add(e, w)
        self.orig = {(e, w) for e, ws in self.holders.items() for w in ws}
        self.copies = 0
        for lay in self.layers.values():
            self._refresh(lay, range(self.num_workers))

    # -- primitive edits ---------------------------------------------------------------
    def _add(self, e: LogicalExpert, w: int) -> None:
        self.holders[e].add(w)
        lay = self.layers[e.layer]
        lay.on[w].add(e)
        lay.count += 1
        self.used[w] += 1

    def _remove(self, e: LogicalExpert, w: int) -> None:
        self.holders[e].discard(w)
        lay = self.layers[e.layer]
        lay.on[w].discard(e)
        lay.count -= 1
        self.used[w] -= 1

    def share(self, e: LogicalExpert) -> float:
        n = len(self.holders[e])
        return self.load[e] / n if n else 0.0

    def _refresh(self, lay: _Layer, workers: Iterable[int]) -> None:
        for w in workers:
            lay.wl[w] = sum(self.share(e) for e in lay.on[w])

    def cost(self, move: _Move) -> int:
        """Weight copies the move adds to the final diff (re-adding an original is free)."""
        return sum(r not in self.orig for r in move.adds) - sum(
            r not in self.orig for r in move.removes
        )

    def apply(self, move: _Move, allow_empty: bool = False) -> None:
        """Carry out ``move``; only a repair may leave an expert without replicas for a
        moment (``allow_empty``)."""
        self.copies += self.cost(move)
        touched: dict[int, set[int]] = defaultdict(set)
        experts = {e for e, _ in move.removes} | {e for e, _ in move.adds}
        for e in experts:
            touched[e.layer] |= self.holders[e]
        for e, w in move.removes:
            self._remove(e, w)
            touched[e.layer].add(w)
        for e, w in move.adds:
            assert w not in self.holders[e], f"expert {e} placed twice on worker {w}"
            self._add(e, w)
            touched[e.layer].add(w)
        for e in experts:
            assert allow_empty or self.holders[e], f"move left expert {e} without replicas"
        for w in {w for _, w in move.adds}:
            assert self.used[w] <= self.cap[w], f"worker {self.ids[w]} over its slots"
        for layer, ws in touched.items():
            self._refresh(self.layers[layer], ws)

    def evaluate(self, lay: _Layer, move: _Move) -> dict[int, float]:
        """New loads, in ``lay``, of the workers the move changes (other layers ignored)."""
        delta: dict[int, float] = defaultdict(float)
        changes: dict[LogicalExpert, tuple[set[int], set[int]]] = {}
        for e, w in move.removes:
            if e.layer == lay.layer:
                changes.setdefault(e, (set(), set()))[0].add(w)
        for e, w in move.adds:
            if e.layer == lay.layer:
                changes.setdefault(e, (set(), set()))[1].add(w)
        for e, (gone, came) in changes.items():
            held = self.holders[e]
            n0, n1 = len(held), len(held) - len(gone) + len(came)
            x = self.load[e]
            s0 = x / n0 if n0 else 0.0
            s1 = x / n1 if n1 else 0.0
            for w in held:
                delta[w] += -s0 if w in gone else s1 - s0
            for w in came:
                delta[w] += s1
        return {w: lay.wl[w] + d for w, d in delta.items()}

    # -- victims -------------------------------------------------------------------------
    def _victim_damage(self, e: LogicalExpert) -> float:
        """Heaviest load, relative to its layer's critical path, that evicting one replica
        of ``e`` would leave on one of its other holders."""
        lay = self.layers[e.layer]
        n = len(self.holders[e])
        bump = self.load[e] / (n - 1) - self.load[e] / n
        peak = max(lay.wl) or 1.0
        return (max(lay.wl[w] for w in self.holders[e]) + bump) / peak

    def spare(self, e: LogicalExpert, min_replicas: int) -> bool:
        return len(self.holders[e]) > min_replicas

    def cross_layer_victim(self, w: int, layer: int, min_replicas: int) -> _Replica | None:
        """A spare replica on ``w`` of another layer whose eviction keeps that layer's
        critical path where it is (the least damaging one)."""
        best: tuple[float, LogicalExpert] | None = None
        for other in self.layers.values():
            if other.layer == layer:
                continue
            peak = max(other.wl)
            eps = _REL_EPS * max(other.mean, 1e-12)
            for c in other.on[w]:
                if not self.spare(c, min_replicas):
                    continue
                n = len(self.holders[c])
                bump = self.load[c] / (n - 1) - self.load[c] / n
                worst = max((other.wl[v] + bump for v in self.holders[c] if v != w), default=0.0)
                if peak > 0.0 and worst >= peak - eps:
                    continue
                key = worst / peak if peak > 0.0 else 0.0
                if best is None or (key, c) < best:
                    best = (key, c)
        return (best[1], w) if best else None

    # -- repair --------------------------------------------------------------------------
    def repair(self, min_replicas: int, max_eff: int) -> None:
        """Bring the placement inside the hard limits, with as little change as possible."""
        # too many replicas of an expert: drop those on the most loaded workers
        for e in sorted(self.holders):
            lay = self.layers[e.layer]
            while len(self.holders[e]) > max_eff:
                w = max(self.holders[e], key=lambda w: (lay.wl[w], w))
                self.apply(_Move(((e, w),), ()))
        # workers over their slots (a shrunk worker): evict spares, else move replicas
        for w in range(self.num_workers):
            while self.used[w] > self.cap[w]:
                here = [e for lay in self.layers.values() for e in lay.on[w]]
                spares = [e for e in here if self.spare(e, min_replicas)]
                if spares:
                    e = min(spares, key=lambda e: (self._victim_damage(e), e))
                    self.apply(_Move(((e, w),), ()))
                    continue
                # nothing spare: drop the lightest replica; the restore below re-places it
                e = min(here, key=lambda e: (self.share(e), e))
                self.apply(_Move(((e, w),), ()), allow_empty=True)
        # layers over their replica budget: evict the least damaging spares
        for lay in self.layers.values():
            while self.budget is not None and lay.count > self.budget:
                spares = [
                    (self._victim_damage(e), e, w)
                    for e in lay.experts
                    if self.spare(e, min_replicas)
                    for w in self.holders[e]
                ]
                # evict from the most loaded holder of the least damaging expert
                _, e, _ = min(spares)
                w = max(self.holders[e], key=lambda w: (lay.wl[w], w))
                self.apply(_Move(((e, w),), ()))
        # experts below min_replicas: new replicas on the least loaded workers
        for e in sorted(self.holders, key=lambda e: (-self.load[e], e)):
            while len(self.holders[e]) < min_replicas:
                self.apply(self._restore_move(e, min_replicas))

    def _free_target(self, e: LogicalExpert) -> int | None:
        lay = self.layers[e.layer]
        free = [
            w
            for w in range(self.num_workers)
            if self.used[w] < self.cap[w] and w not in self.holders[e]
        ]
        return min(free, key=lambda w: (lay.wl[w], w)) if free else None

    def _restore_move(self, e: LogicalExpert, min_replicas: int) -> _Move:
        lay = self.layers[e.layer]
        at_budget = self.budget is not None and lay.count >= self.budget
        target = self._free_target(e)
        if target is not None and not at_budget:
            return _Move((), ((e, target),))
        if target is not None:  # slot free but the layer is at its budget
            spares = [c for c in lay.experts if c != e and self.spare(c, min_replicas)]
            if spares:
                c = min(spares, key=lambda c: (self._victim_damage(c), c))
                v = max(self.holders[c], key=lambda v: (lay.wl[v], v))
                return _Move(((c, v),), ((e, target),))
        # no free slot (or no spare in the layer): make room on a worker without e
        options: list[tuple[float, int, LogicalExpert, int]] = []
        for w in range(self.num_workers):
            if w in self.holders[e]:
                continue
            for other in self.layers.values():
                if at_budget and other is not lay:
                    continue
                for c in other.on[w]:
                    if c != e and self.spare(c, min_replicas):
                        options.append((self._victim_damage(c), lay.wl[w], c, w))
        if not options and not at_budget:
            # every worker without e is full of replicas that are needed: move one of them
            # to a worker with a free slot, and put e where it was
            chains: list[tuple[float, LogicalExpert, int, int]] = []
            for w in range(self.num_workers):
                if w in self.holders[e]:
                    continue
                for other in self.layers.values():
                    for c in other.on[w]:
                        for u in range(self.num_workers):
                            if self.used[u] < self.cap[u] and u not in self.holders[c]:
                                chains.append((other.wl[u] + self.share(c), c, w, u))
            if chains:
                _, c, w, u = min(chains)
                return _Move(((c, w),), ((c, u), (e, w)))
        if not options:
            raise ValueError(
                f"cannot give expert {e} min_replicas={min_replicas} replicas: no worker "
                "without it has a free slot or a spare replica to evict (check num_slots, "
                "replicas_per_layer and min_replicas)"
            )
        _, _, c, w = min(options)
        return _Move(((c, w),), ((e, w),))

    # -- balance -------------------------------------------------------------------------
    def balance(
        self, min_replicas: int, max_eff: int, max_moves: int | None, tolerance: float
    ) -> None:
        """Fix the layers that are out of tolerance, worst first (see :func:`rebalance`)."""
        loaded = [lay for lay in self.layers.values() if any(self.load[e] for e in lay.experts)]
        free = sum(self.cap) - sum(self.used)
        for lay in loaded:
            if self.budget is not None:
                lay.budget = self.budget
            else:  # no cap per layer: each layer may grow into its share of the free slots
                lay.budget = lay.count + free // len(loaded)
            lay.budget = min(lay.budget, len(lay.experts) * max_eff)
            self._bounds(lay, min_replicas, max_eff, tolerance)
        for lay in sorted(loaded, key=lambda lay: (-max(lay.wl) / lay.trigger, lay.layer)):
            if max(lay.wl) <= lay.trigger:
                continue
            if max_moves is not None and self.copies >= max_moves:
                break
            self._repack(lay, min_replicas, max_eff, max_moves)
            self._polish(lay, min_replicas, max_eff, max_moves)

    def _bounds(self, lay: _Layer, min_replicas: int, max_eff: int, tolerance: float) -> None:
        """The layer's reference critical path and the trigger/aim derived from it.

        The reference is what a from-scratch packing reaches on this load (replica counts
        by water-filling, then heaviest replica first onto the least loaded worker), never
        below the lower bound ``max(mean, water level)``: a bound alone is often out of
        reach (a few replicas per worker cannot always add up to the mean), and chasing
        it would cost copies every window.
        """
        loads = [self.load[e] for e in lay.experts]
        lay.mean = sum(loads) / self.num_workers
        lay.level = _water_level(loads, lay.budget, min_replicas, max_eff)
        counts = _water_counts(loads, lay.budget, min_replicas, max_eff)
        items = sorted(
            (
                (x / n, i)
                for i, (x, n) in enumerate(zip(loads, counts, strict=True))
                for _ in range(n)
            ),
            reverse=True,
        )
        bins = [0.0] * self.num_workers
        held: list[set[int]] = [set() for _ in range(self.num_workers)]
        for x, i in items:
            w = min((w for w in range(self.num_workers) if i not in held[w]), key=bins.__getitem__)
            bins[w] += x
            held[w].add(i)
        ref_max = max(lay.mean, lay.level, max(bins))
        ref_bal = lay.mean / ref_max if ref_max > 0 else 1.0
        lay.best_max = max(lay.mean, lay.level)

        def at(slack: float) -> float:
            goal = ref_bal - slack
            return lay.mean / goal if goal > 0 else math.inf

        lay.trigger = at(tolerance)
        lay.aim = at(tolerance * _AIM)

    def _target_counts(
        self, lay: _Layer, min_replicas: int, max_eff: int, fill: bool
    ) -> dict[LogicalExpert, int]:
        """Replicas per expert: as now, except that an expert whose load per replica is
        more than ``_COUNT_SLACK`` above the water level gets enough to come under it, and
        spares of the coldest experts go when that overruns the layer's budget. With
        ``fill``, budget left over goes where the load per replica is highest."""
        relaxed = lay.level * (1 + _COUNT_SLACK)
        counts = {}
        need = {}
        for e in lay.experts:
            x = self.load[e]
            n = math.ceil(x / relaxed - 1e-9) if relaxed > 0 else min_replicas
            need[e] = min(max_eff, max(min_replicas, n))
            counts[e] = min(max_eff, max(need[e], len(self.holders[e])))
        excess = sum(counts.values()) - lay.budget
        if excess < 0 and fill:
            grow = [(-self.load[e] / counts[e], e) for e in lay.experts if counts[e] < max_eff]
            heapq.heapify(grow)
            while excess < 0 and grow:
                _, e = heapq.heappop(grow)
                counts[e] += 1
                excess += 1
                if counts[e] < max_eff:
                    heapq.heappush(grow, (-self.load[e] / counts[e], e))
        heap = [(self.load[e] / (counts[e] - 1), e) for e in lay.experts if counts[e] > need[e]]
        heapq.heapify(heap)
        while excess > 0 and heap:
            _, e = heapq.heappop(heap)
            counts[e] -= 1
            excess -= 1
            if counts[e] > need[e]:
                heapq.heappush(heap, (self.load[e] / (counts[e] - 1), e))
        return counts

    def _repack(self, lay: _Layer, min_replicas: int, max_eff: int, max_moves: int | None) -> None:
        """Re-pack the layer, leaving replicas where they are as far as it can.

        Candidates are sticky LPT passes (:meth:`_sticky_lpt`), each refined by
        :meth:`_refine`, at thresholds from "keep everything" down, until one reaches the
        aim; a from-scratch packing is tried only if none reaches the trigger. The
        cheapest candidate that reaches the aim (else the trigger) wins, else the one with
        the lowest critical path. Nothing changes if no candidate beats the current peak.
        """
        peak_now = max(lay.wl)
        eps = _REL_EPS * lay.mean
        current = {e: set(self.holders[e]) for e in lay.experts}
        cost_now = sum((e, w) not in self.orig for e, ws in current.items() for w in ws)
        room = math.inf if max_moves is None else max_moves - self.copies
        avail = [self.cap[w] - self.used[w] + len(lay.on[w]) for w in range(self.num_workers)]
        sticky = [math.inf, *sorted({lay.trigger, lay.aim}, reverse=True)]
        sticky += [lay.best_max * (1 + d) for d in _STICKY]
        cands: list[tuple[float, int, dict[LogicalExpert, set[int]]]] = []
        seen: set[frozenset[_Replica]] = set()

        def collect(counts: dict[LogicalExpert, int], thresholds: Sequence[float]) -> None:
            kept = self._drop_to(lay, current, counts)
            share = {e: self.load[e] / counts[e] for e in lay.experts}
            for t in thresholds:
                packed = self._sticky_lpt(lay, kept, counts, share, avail, t)
                if packed is None:
                    continue
                assert all(len(packed[0][e]) == counts[e] for e in lay.experts), "lost a replica"
                key = frozenset((e, w) for e, ws in packed[0].items() for w in ws)
                if key in seen:
                    continue
                seen.add(key)
                assign, loads = self._refine(lay, *packed, share, avail, eps)
                cost = sum((e, w) not in self.orig for e, ws in assign.items() for w in ws)
                peak = max(loads)
                if cost - cost_now <= room and peak < peak_now - eps:
                    cands.append((peak, cost - cost_now, assign))
                    if peak <= lay.aim:
                        return

        counts = self._target_counts(lay, min_replicas, max_eff, fill=False)
        collect(counts, sticky)
        if self.budget is not None:
            # an explicit replicas_per_layer is the operator's number of physical experts:
            # also try spending what is left of it (taken only if that is cheaper)
            filled = self._target_counts(lay, min_replicas, max_eff, fill=True)
            if filled != counts:
                collect(filled, sticky)
        if not any(c[0] <= lay.trigger for c in cands):
            collect(counts, (-1.0,))
        if not cands:  # the new counts do not fit the free slots: keep the counts
            collect({e: len(ws) for e, ws in current.items()}, (*sticky, -1.0))
        if not cands:
            return
        for level in (lay.aim, lay.trigger):
            good = [c for c in cands if c[0] <= level]
            if good:
                chosen = min(good, key=lambda c: (c[1], c[0]))
                break
        else:
            chosen = min(cands, key=lambda c: (c[0], c[1]))
        assign = chosen[2]
        removes = tuple((e, w) for e in lay.experts for w in sorted(current[e] - assign[e]))
        adds = tuple((e, w) for e in lay.experts for w in sorted(assign[e] - current[e]))
        self.apply(_Move(removes, adds))

    def _refine(
        self,
        lay: _Layer,
        assign: dict[LogicalExpert, set[int]],
        loads: list[float],
        n_on: list[int],
        share: dict[LogicalExpert, float],
        avail: list[int],
        eps: float,
    ) -> tuple[dict[LogicalExpert, set[int]], list[float]]:
        """Local search on a candidate packing: unload its most loaded worker by moving one
        replica to a worker with a free slot or swapping it for a lighter one, best
        reduction per copy first (moving a replica that is not yet in place is free),
        until the aim is reached or no step helps."""
        num_workers = self.num_workers
        orig = self.orig
        on: list[list[LogicalExpert]] = [[] for _ in range(num_workers)]
        for e in lay.experts:
            for w in assign[e]:
                on[w].append(e)
        aim = lay.aim
        for _ in range(4 * num_workers):
            h = max(range(num_workers), key=loads.__getitem__)
            peak = loads[h]
            if peak <= aim:
                break
            limit = peak - eps
            over_h = peak - aim
            # score: load taken above the aim per copy (a step that pushes its target over
            # the aim just creates the next hot spot), then the new local peak
            best: tuple[tuple[float, float], LogicalExpert, int, LogicalExpert | None] | None = None
            for e in on[h]:
                x = share[e]
                out = -((e, h) not in orig)
                for v in range(num_workers):
                    if v == h or v in assign[e]:
                        continue
                    lv = loads[v]
                    over_v = max(0.0, lv - aim)
                    into = out + ((e, v) not in orig)
                    if n_on[v] < avail[v]:
                        top = max(peak - x, lv + x)
                        if top < limit:
                            gain = (
                                over_h + over_v - max(0.0, peak - x - aim) - max(0.0, lv + x - aim)
                            )
                            score = (gain / max(into, 0.5), -top)
                            if best is None or score > best[0]:
                                best = (score, e, v, None)
                    for f in on[v]:
                        y = share[f]
                        if y >= x or h in assign[f]:
                            continue
                        d = x - y
                        top = max(peak - d, lv + d)
                        if top >= limit:
                            continue
                        cost = into + ((f, h) not in orig) - ((f, v) not in orig)
                        gain = over_h + over_v - max(0.0, peak - d - aim) - max(0.0, lv + d - aim)
                        score = (gain / max(cost, 0.5), -top)
                        if best is None or score > best[0]:
                            best = (score, e, v, f)
            if best is None:
                break
            _, e, v, f = best
            assign[e].discard(h)
            assign[e].add(v)
            on[h].remove(e)
            on[v].append(e)
            loads[h] -= share[e]
            loads[v] += share[e]
            if f is None:
                n_on[h] -= 1
                n_on[v] += 1
            else:
                assign[f].discard(v)
                assign[f].add(h)
                on[v].remove(f)
                on[h].append(f)
                loads[v] -= share[f]
                loads[h] += share[f]
        return assign, loads

    def _drop_to(
        self, lay: _Layer, current: dict[LogicalExpert, set[int]], counts: dict
    ) -> dict[LogicalExpert, set[int]]:
        """Current replicas minus those beyond ``counts`` (taken off the busiest workers)."""
        kept = {}
        for e, ws in current.items():
            order = sorted(ws, key=lambda w: (lay.wl[w], w))
            kept[e] = set(order[: counts[e]])
        return kept

    def _sticky_lpt(
        self,
        lay: _Layer,
        kept: dict[LogicalExpert, set[int]],
        counts: dict[LogicalExpert, int],
        share: dict[LogicalExpert, float],
        avail: list[int],
        threshold: float,
    ) -> tuple[dict[LogicalExpert, set[int]], list[float], list[int]] | None:
        """One LPT pass over the layer's replicas, heaviest first: a replica stays on its
        worker while that worker stays under ``threshold``; any other (displaced or new)
        goes to the worker with the least projected load (placed so far plus replicas
        still waiting to stay there) that has a slot and lacks the expert."""
        num_workers = self.num_workers
        loads = [0.0] * num_workers
        n_on = [0] * num_workers
        pending = [0.0] * num_workers
        pending_n = [0] * num_workers
        items: list[tuple[float, LogicalExpert, int]] = []
        for e in lay.experts:
            if threshold < 0:  # from scratch
                items.extend((-share[e], e, num_workers) for _ in range(counts[e]))
                continue
            for w in kept[e]:
                items.append((-share[e], e, w))
                pending[w] += share[e]
                pending_n[w] += 1
            items.extend((-share[e], e, num_workers) for _ in range(counts[e] - len(kept[e])))
        items.sort()
        assign: dict[LogicalExpert, set[int]] = {e: set() for e in lay.experts}
        for neg, e, w in items:
            x = -neg
            if w < num_workers:
                pending[w] -= x
                pending_n[w] -= 1
                if loads[w] + x <= threshold and n_on[w] < avail[w] and w not in assign[e]:
                    assign[e].add(w)
                    loads[w] += x
                    n_on[w] += 1
                    continue
            best = None
            for v in range(num_workers):
                if n_on[v] >= avail[v] or v in assign[e] or (v != w and v in kept[e]):
                    continue
                # a slot promised to a replica waiting to stay is taken only as a last resort
                key = (
                    n_on[v] + pending_n[v] >= avail[v],
                    loads[v] + pending[v],
                    (e, v) not in self.orig,
                    v,
                )
                if best is None or key < best:
                    best = key
            if best is None:
                return None
            v = best[3]
            assign[e].add(v)
            loads[v] += x
            n_on[v] += 1
        return assign, loads, n_on

    def _polish(self, lay: _Layer, min_replicas: int, max_eff: int, max_moves: int | None) -> None:
        """Single-step local search on the layer's most loaded worker, down to the aim."""
        for _ in range(20 * self.num_workers):
            if max_moves is not None and self.copies >= max_moves:
                return
            peak = max(lay.wl)
            if peak <= lay.aim:
                return
            move = self._best_move(lay, lay.wl.index(peak), min_replicas, max_eff, max_moves)
            if move is None:
                return
            self.apply(move)

    def _best_move(
        self, lay: _Layer, h: int, min_replicas: int, max_eff: int, max_moves: int | None
    ) -> _Move | None:
        """The best single step that unloads worker ``h`` (the layer's most loaded):
        evict, migrate, replicate or swap one of its replicas, making room on a full
        target by evicting a spare replica there. Accepted only if every worker it
        touches ends below ``h``'s load by more than an epsilon; ranked by that reduction
        per weight copy. None if no step helps."""
        peak = lay.wl[h]
        limit = peak - _REL_EPS * lay.mean
        room = None if max_moves is None else max_moves - self.copies
        best: tuple[float, _Move] | None = None

        def consider(move: _Move, new: dict[int, float] | None = None) -> None:
            nonlocal best
            if new is None:
                new = self.evaluate(lay, move)
            if h not in new or max(new.values()) >= limit:
                return
            cost = self.cost(move)
            if room is not None and cost > room:
                return
            score = (peak - max(new.values())) / max(cost, 0.5)
            if best is None or score > best[0]:
                best = (score, move)

        num_workers = self.num_workers
        free = [self.used[w] < self.cap[w] for w in range(num_workers)]
        under_budget = self.budget is None or lay.count < self.budget
        layer_spares = [
            (c, v)
            for c in lay.experts
            if self.spare(c, min_replicas)
            for v in sorted(self.holders[c])
        ]
        cross: dict[int, _Replica | None] = {}

        def cross_victim(w: int) -> _Replica | None:
            if w not in cross:
                cross[w] = self.cross_layer_victim(w, lay.layer, min_replicas)
            return cross[w]

        wl = lay.wl
        for e in sorted(lay.on[h], key=lambda e: (-self.share(e), e)):
            s = self.share(e)
            held = self.holders[e]
            n = len(held)
            if n > min_replicas:  # 1. evict: free, the other holders absorb the share
                consider(_Move(((e, h),), ()))
            for w in range(num_workers):
                if w == h or w in held:
                    continue
                # 2. migrate e from h to w (making room on w if it is full)
                if free[w]:
                    consider(_Move(((e, h),), ((e, w),)), {h: peak - s, w: wl[w] + s})
                else:
                    for c in sorted(lay.on[w]):
                        if c != e and self.spare(c, min_replicas):
                            consider(_Move(((e, h), (c, w)), ((e, w),)))
                    victim = cross_victim(w)
                    if victim is not None:
                        consider(_Move(((e, h), victim), ((e, w),)), {h: peak - s, w: wl[w] + s})
                # 3. replicate e onto w
                if n >= max_eff:
                    continue
                if free[w] and under_budget:
                    consider(_Move((), ((e, w),)))
                elif free[w]:
                    for c, v in layer_spares:
                        if c != e:
                            consider(_Move(((c, v),), ((e, w),)))
                else:
                    for c in sorted(lay.on[w]):
                        if c != e and self.spare(c, min_replicas):
                            consider(_Move(((c, w),), ((e, w),)))
                    if under_budget:
                        victim = cross_victim(w)
                        if victim is not None:
                            consider(_Move((victim,), ((e, w),)))
            # 4. swap e (on h) with a lighter f on w
            for w in range(num_workers):
                if w == h or w in held:
                    continue
                for f in sorted(lay.on[w]):
                    sf = self.share(f)
                    if sf >= s or h in self.holders[f]:
                        continue
                    d = s - sf
                    consider(_Move(((e, h), (f, w)), ((e, w), (f, h))), {h: peak - d, w: wl[w] + d})
        return best[1] if best else None

    # -- output --------------------------------------------------------------------------
    def result(self) -> Placement:
        out: Placement = {}
        for e in sorted(self.holders):
            held = self.holders[e]
            kept = [w for w in self.order[e] if w in held]
            new = sorted(held - set(kept))
            out[e] = tuple(self.ids[w] for w in kept + new)
        return out
