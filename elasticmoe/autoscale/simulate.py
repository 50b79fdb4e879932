"""Replay a load trace through an autoscaling policy, without a cluster.

:func:`simulate` steps a simulated clock by the policy's ``interval_s``. At
each step it (1) measures the interval that just ended with the placement
that served it, (2) applies the actions decided one step earlier (an action
takes one interval to carry out: load weights, publish an epoch, drain),
(3) calls :func:`~elasticmoe.core.decide.decide` on the load of the last
``window_s``. Nothing runs on a device: load is token counts, and a worker's
cost is the tokens routed to its replicas, an expert's tokens split evenly
over its replicas (what the router's load-aware dispatch aims for).

Trace formats (:func:`load_trace` tells them apart by the header):

**Expert-routing trace** (what the load recorder writes), one row per
(time, logical expert) with the tokens the gate routed there::

    timestamp,layer,expert,tokens
    0.000,0,3,17
    0.000,0,5,9
    0.041,1,3,12

``timestamp`` is seconds (any origin: the first row is time 0) or an ISO
8601 date-time; ``layer`` is the MoE layer's index in the model, ``expert``
the expert's index in the layer; ``tokens`` a count (each token counts once
per expert the gate picked). Rows need not be sorted.

**Request trace** (Azure LLM inference trace 2023:
``TIMESTAMP,ContextTokens,GeneratedTokens``): it has no routing, so
per-expert load is *synthesised*: every request's context plus generated
tokens pass through each of ``layers`` MoE layers and are routed to
``top_k`` of ``experts`` experts with a Zipf(``zipf_s``) popularity; in
each layer, every ``drift_s`` simulated seconds one expert of the top
quarter swaps popularity with a random expert (seeded). All tokens of a
request count at its arrival time. :attr:`SyntheticRequestTrace.description`
says this, and the CLI prints it.

Latency is a proxy. Layers run one after another and each waits for its
most loaded worker, so the expert time of an interval is the sum over layers
of (slowest worker's tokens / its capacity); with ``rho`` that time over
the interval's length, the simulator reports
``ttft_p99 = base_ttft_ms / (1 - rho)`` and ``itl_p99 = base_itl_ms / (1 - rho)``
(capped at 50x base), and feeds them to the policy's SLO rule.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from elasticmoe.core import placement as placement_mod
from elasticmoe.core.actions import Action
from elasticmoe.core.decide import ObservedState, PolicyState, WorkerState, decide
from elasticmoe.core.experts import LogicalExpert
from elasticmoe.core.policy import Policy
from elasticmoe.core.protocol import (
    ClusterView,
    PlanRefused,
    WorkerSlots,
    check_change,
    plan_action,
)

ROUTING_COLUMNS = ("timestamp", "layer", "expert", "tokens")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_MAX_SLOWDOWN = 50.0  # latency proxy cap: beyond this the service is simply overloaded


class LoadTrace(Protocol):
    """Tokens per logical expert over time, on the simulated clock (seconds from 0)."""

    num_layers: int
    num_experts: int
    duration_s: float
    description: str

    def window_load(self, start: float, end: float) -> dict[LogicalExpert, float]:
        """Tokens per logical expert with ``start < time <= end``."""
        ...


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.strip()).timestamp()


def _check_scale(time_scale: float) -> None:
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")


class RoutingTrace:
    """An expert-routing trace: (time, layer, expert, tokens) events."""

    def __init__(
        self,
        times: np.ndarray,
        layers: np.ndarray,
        experts: np.ndarray,
        tokens: np.ndarray,
        num_layers: int | None = None,
        num_experts: int | None = None,
        description: str = "expert-routing trace",
    ) -> None:
        if len(times) == 0:
            raise ValueError("routing trace has no rows")
        order = np.argsort(times, kind="stable")
        self.num_layers = int(num_layers if num_layers is not None else layers.max() + 1)
        self.num_experts = int(num_experts if num_experts is not None else experts.max() + 1)
        if layers.min() < 0 or experts.min() < 0:
            raise ValueError("routing trace: layer and expert must be >= 0")
        if layers.max() >= self.num_layers or experts.max() >= self.num_experts:
            raise ValueError(
                f"routing trace has layer {layers.max()}, expert {experts.max()}: "
                f"beyond --layers {self.num_layers} / --experts {self.num_experts}"
            )
        self._times = times[order] - times[order][0]
        self._index = (layers * self.num_experts + experts)[order].astype(np.int64)
        self._tokens = tokens[order].astype(np.float64)
        self.duration_s = float(self._times[-1])
        self.description = description

    @classmethod
    def from_csv(
        cls,
        path: Path | str,
        time_scale: float = 1.0,
        num_layers: int | None = None,
        num_experts: int | None = None,
    ) -> RoutingTrace:
        """Read ``timestamp,layer,expert,tokens``; ``time_scale`` x faster than recorded."""
        _check_scale(time_scale)
        rows: list[tuple[float, int, int, float]] = []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = set(ROUTING_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)}")
            for lineno, row in enumerate(reader, start=2):
                try:
                    rows.append(
                        (
                            _parse_time(row["timestamp"]),
                            int(row["layer"]),
                            int(row["expert"]),
                            float(row["tokens"]),
                        )
                    )
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{path}, line {lineno}: {e}") from None
        arr = np.array(rows, dtype=np.float64).reshape(-1, 4)
        return cls(
            arr[:, 0] / time_scale,
            arr[:, 1].astype(np.int64),
            arr[:, 2].astype(np.int64),
            arr[:, 3],
            num_layers,
            num_experts,
            description=f"expert-routing trace {Path(path).name}, replayed {time_scale:g}x",
        )

    def window_load(self, start: float, end: float) -> dict[LogicalExpert, float]:
        """Tokens per logical expert with ``start < time <= end``."""
        i0, i1 = np.searchsorted(self._times, [start, end], side="right")
        counts = np.bincount(
            self._index[i0:i1],
            weights=self._tokens[i0:i1],
            minlength=self.num_layers * self.num_experts,
        )
        return _to_experts(counts, self.num_experts)


def _to_experts(counts: np.ndarray, num_experts: int) -> dict[LogicalExpert, float]:
    return {
        LogicalExpert(i // num_experts, i % num_experts): float(c)
        for i, c in enumerate(counts)
        if c > 0
    }


class SyntheticRequestTrace:
    """Per-expert load synthesised from a request trace (see the module docstring)."""

    def __init__(
        self,
        times: np.ndarray,
        tokens: np.ndarray,
        num_layers: int = 2,
        num_experts: int = 8,
        top_k: int = 2,
        zipf_s: float = 1.0,
        drift_s: float = 300.0,
        seed: int = 0,
        source: str = "request trace",
    ) -> None:
        if len(times) == 0:
            raise ValueError("request trace has no rows")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be 1..experts ({num_experts}), got {top_k}")
        if num_layers < 1 or drift_s <= 0:
            raise ValueError("layers must be >= 1 and drift_s > 0")
        order = np.argsort(times, kind="stable")
        self._times = times[order] - times[order][0]
        # Every token is routed to top_k experts in each layer.
        self._cum = np.concatenate([[0.0], np.cumsum(tokens[order] * top_k)])
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.duration_s = float(self._times[-1])
        self.drift_s = drift_s
        self._popularity = self._drifting_zipf(zipf_s, seed)
        self.description = (
            f"synthetic expert load from {source}: request context+generated tokens x "
            f"top_k={top_k} per layer, {num_layers} layers x {num_experts} experts, "
            f"Zipf(s={zipf_s:g}) popularity drifting every {drift_s:g}s (seed {seed})"
        )

    def _drifting_zipf(self, s: float, seed: int) -> np.ndarray:
        """[epochs, layers, experts] popularity, rows summing to 1."""
        rng = np.random.default_rng(seed)
        num_e = self.num_experts
        weights = 1.0 / np.arange(1, num_e + 1) ** s
        weights /= weights.sum()
        epochs = int(self.duration_s // self.drift_s) + 2
        rank_to_expert = [rng.permutation(num_e) for _ in range(self.num_layers)]
        out = np.zeros((epochs, self.num_layers, num_e))
        for j in range(epochs):
            for layer, perm in enumerate(rank_to_expert):
                if j > 0:  # a popular expert trades places with a random one
                    a = int(rng.integers(0, max(1, num_e // 4)))
                    b = int(rng.integers(0, num_e))
                    perm[a], perm[b] = perm[b], perm[a]
                out[j, layer, perm] = weights
        return out

    @classmethod
    def from_azure_csv(
        cls,
        path: Path | str,
        time_scale: float = 1.0,
        token_scale: float = 1.0,
        **kwargs: Any,
    ) -> SyntheticRequestTrace:
        """Read ``TIMESTAMP,ContextTokens,GeneratedTokens`` (Azure LLM trace 2023)."""
        _check_scale(time_scale)
        times: list[float] = []
        tokens: list[float] = []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = set(AZURE_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)}")
            for lineno, row in enumerate(reader, start=2):
                try:
                    times.append(_parse_time(row["TIMESTAMP"]))
                    tokens.append(float(row["ContextTokens"]) + float(row["GeneratedTokens"]))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{path}, line {lineno}: {e}") from None
        scale_note = f"{Path(path).name} replayed {time_scale:g}x"
        if token_scale != 1.0:
            scale_note += f", tokens x{token_scale:g}"
        return cls(
            np.array(times) / time_scale,
            np.array(tokens) * token_scale,
            source=scale_note,
            **kwargs,
        )

    def window_load(self, start: float, end: float) -> dict[LogicalExpert, float]:
        """Tokens per logical expert with ``start < time <= end``."""
        num_epochs = self._popularity.shape[0]
        j0 = max(0, int(max(start, 0.0) // self.drift_s))
        j1 = min(num_epochs - 1, int(max(end, 0.0) // self.drift_s))
        total = np.zeros((self.num_layers, self.num_experts))
        for j in range(j0, j1 + 1):
            lo = start if j == j0 else j * self.drift_s
            hi = end if j == j1 else (j + 1) * self.drift_s
            i0, i1 = np.searchsorted(self._times, [lo, hi], side="right")
            total += (self._cum[i1] - self._cum[i0]) * self._popularity[j]
        return _to_experts(total.reshape(-1), self.num_experts)


def load_trace(
    path: Path | str,
    *,
    layers: int | None = None,
    experts: int | None = None,
    time_scale: float = 1.0,
    top_k: int = 2,
    zipf_s: float = 1.0,
    drift_s: float = 300.0,
    seed: int = 0,
    token_scale: float = 1.0,
) -> LoadTrace:
    """Open a routing trace or a request trace, telling them apart by the header.

    ``layers``/``experts`` size a synthesised load (request traces; default
    2 x 8) and bound a routing trace (default: what it contains).
    """
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if set(ROUTING_COLUMNS) <= set(header):
        return RoutingTrace.from_csv(path, time_scale, layers, experts)
    if set(AZURE_COLUMNS) <= set(header):
        return SyntheticRequestTrace.from_azure_csv(
            path,
            time_scale=time_scale,
            token_scale=token_scale,
            num_layers=layers or 2,
            num_experts=experts or 8,
            top_k=top_k,
            zipf_s=zipf_s,
            drift_s=drift_s,
            seed=seed,
        )
    raise ValueError(
        f"{path}: unknown trace format (header {header}); expected columns "
        f"{','.join(ROUTING_COLUMNS)} (routing trace) or {','.join(AZURE_COLUMNS)} (request trace)"
    )


class SimClock:
    """The simulated clock: ``now`` only moves when :meth:`advance` is called."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def advance(self, seconds: float) -> float:
        """Move forward ``seconds``; returns the new time."""
        self.now += seconds
        return self.now


@dataclass(frozen=True)
class TimedAction:
    """An action and the simulated time it was decided at (it completes one interval later)."""

    time: float
    action: Action

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"time": self.time, **self.action.to_dict()}


@dataclass(frozen=True)
class IntervalStats:
    """One control interval as served by the placement in effect during it."""

    time: float  # end of the interval
    tokens: float  # expert token-rows routed in the interval
    balancedness: float  # mean over layers of mean/max worker load
    replicas: int
    workers: int  # healthy workers
    utilization: float  # busy fraction of the interval, slowest worker per layer (SLO proxy)
    ttft_p99_ms: float
    itl_p99_ms: float
    actions: int  # actions decided at the end of the interval

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return dict(self.__dict__)


@dataclass
class SimulationResult:
    """What :func:`simulate` returns: actions with times, per-interval stats, a summary."""

    policy: str
    autoscale: bool
    interval_s: float
    actions: list[TimedAction]
    intervals: list[IntervalStats]
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[float, Action, str]] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        """Actions by kind, mean balancedness, worker-seconds, SLO proxy figures."""
        n = len(self.intervals)
        bal = [s.balancedness for s in self.intervals]
        util = [s.utilization for s in self.intervals]
        kinds = Counter(a.action.kind for a in self.actions)
        return {
            "intervals": n,
            "duration_s": self.intervals[-1].time if n else 0.0,
            "actions": len(self.actions),
            "actions_by_kind": dict(sorted(kinds.items())),
            "skipped_actions": len(self.skipped),
            "mean_balancedness": float(np.mean(bal)) if n else 1.0,
            "min_balancedness": float(np.min(bal)) if n else 1.0,
            "final_replicas": self.intervals[-1].replicas if n else 0,
            "max_workers": max((s.workers for s in self.intervals), default=0),
            "final_workers": self.intervals[-1].workers if n else 0,
            "worker_seconds": float(sum(s.workers for s in self.intervals) * self.interval_s),
            "mean_utilization": float(np.mean(util)) if n else 0.0,
            "overloaded_intervals": sum(u >= 1.0 for u in util),
            "max_ttft_p99_ms": max((s.ttft_p99_ms for s in self.intervals), default=0.0),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "policy": self.policy,
            "autoscale": self.autoscale,
            "interval_s": self.interval_s,
            "notes": self.notes,
            "summary": self.summary,
            "actions": [a.to_dict() for a in self.actions],
            "skipped": [{"time": t, **a.to_dict(), "why": why} for t, a, why in self.skipped],
            "intervals": [s.to_dict() for s in self.intervals],
        }


class _Cluster:
    """The simulated worker set and placement; applies actions like the controller would."""

    def __init__(
        self,
        workers: list[WorkerState],
        placement: dict[LogicalExpert, tuple[str, ...]],
        slots: Mapping[str, int],
    ) -> None:
        self.workers = {w.worker_id: w for w in workers}
        self.placement = dict(placement)
        self.experts = frozenset(placement)
        self.epoch = 1
        self.pool_slots = dict(slots)
        self.next_id: Counter[str] = Counter()
        for w in workers:
            self.next_id[w.pool] += 1

    def healthy(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.healthy]

    def used(self, worker_id: str) -> int:
        return sum(worker_id in reps for reps in self.placement.values())

    def view(self) -> ClusterView:
        """The simulated cluster as the controller's planner sees it."""
        return ClusterView(
            epoch=self.epoch,
            placement=self.placement,
            workers={
                w.worker_id: WorkerSlots(w.num_slots, w.healthy, w.pool)
                for w in self.workers.values()
            },
            experts=self.experts,
        )

    def apply(self, action: Action) -> str | None:
        """Carry out ``action`` as the controller would; returns why it was refused, or None.

        Plans go through :func:`~elasticmoe.core.protocol.plan_action` and
        :func:`~elasticmoe.core.protocol.check_change`, the controller's own
        planner, so a plan refused here is refused in production and the other
        way round (a ``remove_worker`` moves the worker's sole replicas first; the
        last replica of an expert is never evicted).
        """
        new_ids: list[str] = []
        if action.kind == "add_worker":
            pool = action.pool or ""
            if pool not in self.pool_slots:
                return f"unknown pool {pool!r}"
            for i in range(action.count):
                new_ids.append(f"{pool}-{self.next_id[pool] + 1 + i}")
        view = self.view()
        try:
            change = plan_action(view, action, new_ids)
            self.placement = check_change(view, change)
        except PlanRefused as e:
            return str(e)
        self.epoch += 1
        for wid in change.add_workers:
            pool = change.pool or ""
            self.next_id[pool] += 1
            self.workers[wid] = WorkerState(wid, pool, self.pool_slots[pool])
        for wid in change.remove_workers:
            del self.workers[wid]
        return None

    def fail(self, worker_id: str) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            self.workers[worker_id] = WorkerState(w.worker_id, w.pool, w.num_slots, healthy=False)


def _busy_seconds(
    placement: Mapping[LogicalExpert, Sequence[str]],
    load: Mapping[LogicalExpert, float],
    capacity: Mapping[str, float],
) -> float:
    """Seconds the expert layers take to serve ``load``: layers run one after another and
    each waits for its slowest worker, so it is the sum over layers of the slowest worker's
    tokens / capacity (what balancedness measures, in time)."""
    return sum(
        max((x / capacity[w] for w, x in per_worker.items()), default=0.0)
        for per_worker in placement_mod.worker_layer_loads(placement, load).values()
    )


def simulate(
    policy: Policy,
    trace: LoadTrace,
    *,
    workers: int | None = None,
    slots: int | None = None,
    duration_s: float | None = None,
    capacity_tokens_per_s: float | None = None,
    base_ttft_ms: float = 250.0,
    base_itl_ms: float = 25.0,
    failures: Mapping[str, float] | None = None,
    autoscale: bool = True,
    clock: SimClock | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Replay ``trace`` through ``policy``; see the module docstring for the model.

    ``workers``/``slots``: the starting workers of the first pool (default:
    enough for its min_workers and for every expert's min_replicas at 75% slot
    use) and their slots (default: the pool's ``slots_per_worker``). Other
    pools start at ``min_workers``. ``capacity_tokens_per_s``: per worker,
    where a pool does not set ``tokens_per_s_per_worker`` (default: the
    starting fleet, perfectly balanced, is 50% busy at the trace's mean rate). ``failures``: worker
    id -> time it dies. ``autoscale=False`` replays with the starting
    placement unchanged (the baseline). ``clock`` starts the simulated time
    (default 0); ``progress(done, total)`` is called after every interval.
    """
    spec = policy.spec
    clock = clock or SimClock()
    start = clock.now
    first = spec.pools[0]
    num_slots = slots or first.slots_per_worker
    experts = [
        LogicalExpert(layer, e)
        for layer in range(trace.num_layers)
        for e in range(trace.num_experts)
    ]
    need = len(experts) * spec.experts.min_replicas
    if workers is None:
        workers = min(
            first.max_workers,
            max(first.min_workers, 1, math.ceil(need / (0.75 * num_slots))),
        )
    if workers < 1 or num_slots < 1:
        raise ValueError("workers and slots must be >= 1")
    notes = [trace.description]

    initial = [WorkerState(f"{first.name}-{i + 1}", first.name, num_slots) for i in range(workers)]
    for p in spec.pools[1:]:
        initial += [
            WorkerState(f"{p.name}-{i + 1}", p.name, p.slots_per_worker)
            for i in range(p.min_workers)
        ]
    try:
        placement = placement_mod.initial_placement(
            experts,
            [w.worker_id for w in initial if w.pool == first.name],
            num_slots,
            replicas=spec.experts.min_replicas,
        )
    except ValueError as e:
        raise ValueError(f"starting placement: {e} (use more --workers or --slots)") from None
    cluster = _Cluster(initial, placement, {p.name: p.slots_per_worker for p in spec.pools})
    notes.append(
        f"start: {workers} x {first.name} workers with {num_slots} slots, "
        f"{len(experts)} experts x {spec.experts.min_replicas} replica(s)"
    )

    total_s = trace.duration_s if duration_s is None else min(duration_s, trace.duration_s)
    steps = max(1, math.ceil(total_s / spec.interval_s))
    if capacity_tokens_per_s is None:
        rate = sum(trace.window_load(-math.inf, total_s).values()) / max(total_s, 1e-9)
        capacity_tokens_per_s = max(rate / (0.5 * workers), 1e-9)
        notes.append(
            f"worker capacity {capacity_tokens_per_s:,.0f} token-rows/s (calibrated: the "
            f"starting {workers} workers, perfectly balanced, are 50% busy at the mean rate)"
        )
    pool_capacity = {p.name: p.tokens_per_s_per_worker or capacity_tokens_per_s for p in spec.pools}
    notes.append(
        f"latency proxy: p99 = base / (1 - busy), busy = sum over layers of the slowest "
        f"worker's tokens / capacity, per second of the interval; base ttft "
        f"{base_ttft_ms:g} ms, itl {base_itl_ms:g} ms"
    )
    if not autoscale:
        notes.append("baseline: no autoscaling, starting placement kept")

    pending: list[Action] = []
    timeline: list[TimedAction] = []
    stats: list[IntervalStats] = []
    skipped: list[tuple[float, Action, str]] = []
    state = PolicyState()
    for k in range(1, steps + 1):
        prev, now = clock.now, clock.advance(spec.interval_s)
        t = now - start
        for wid, when in sorted((failures or {}).items()):
            if prev - start < when <= t:
                cluster.fail(wid)
        healthy = {w.worker_id for w in cluster.healthy()}

        # 1. the interval that just ended, served by the placement in effect during it
        # (the first interval also takes the trace's first instant, t = 0)
        served = trace.window_load(-math.inf if k == 1 else t - spec.interval_s, t)
        live = {e: tuple(w for w in reps if w in healthy) for e, reps in cluster.placement.items()}
        capacity = {
            w: pool_capacity.get(cluster.workers[w].pool, capacity_tokens_per_s) for w in healthy
        }
        util = _busy_seconds(live, served, capacity) / spec.interval_s
        slowdown = min(_MAX_SLOWDOWN, 1.0 / max(1.0 - util, 1.0 / _MAX_SLOWDOWN))
        specs = [
            placement_mod.WorkerSpec(worker_id=w.worker_id, num_slots=w.num_slots)
            for w in sorted(cluster.healthy(), key=lambda w: w.worker_id)
        ]
        balance = placement_mod.balancedness(live, served, specs) if served else 1.0

        # 2. last interval's decisions are done now
        for action in pending:
            why = cluster.apply(action)
            if why:
                skipped.append((t, action, why))
        pending = []

        # 3. decide on the load window
        actions: list[Action] = []
        if autoscale:
            observed = ObservedState(
                load=trace.window_load(t - spec.window_s, t),
                placement=cluster.placement,
                workers=sorted(cluster.workers.values(), key=lambda w: w.worker_id),
                ttft_p99_ms=base_ttft_ms * slowdown,
                itl_p99_ms=base_itl_ms * slowdown,
            )
            actions, state = decide(policy, observed, now, state)
            pending = actions
            timeline += [TimedAction(t, a) for a in actions]
        stats.append(
            IntervalStats(
                time=t,
                tokens=float(sum(served.values())),
                balancedness=float(balance),
                replicas=sum(len(live[e]) for e in live),
                workers=len(healthy),
                utilization=float(util),
                ttft_p99_ms=base_ttft_ms * slowdown,
                itl_p99_ms=base_itl_ms * slowdown,
                actions=len(actions),
            )
        )
        if progress is not None:
            progress(k, steps)
    return SimulationResult(
        policy=policy.metadata.name,
        autoscale=autoscale,
        interval_s=spec.interval_s,
        actions=timeline,
        intervals=stats,
        notes=notes,
        skipped=skipped,
    )


__all__ = [
    "IntervalStats",
    "LoadTrace",
    "RoutingTrace",
    "SimClock",
    "SimulationResult",
    "SyntheticRequestTrace",
    "TimedAction",
    "load_trace",
    "simulate",
]
