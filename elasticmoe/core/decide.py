"""The autoscaling decision: a pure function of policy, observation, time and state.

``decide(policy, observed, now, state) -> (actions, state)`` holds no state
of its own and reads no clock: everything it remembers between two calls
(cooldown timestamps, since when an SLO has been breached, since when a pool
has been idle) is in the returned :class:`PolicyState`, which is JSON
round-trippable. A controller that persists the state after each call and
restarts resumes with exactly the decisions it would have made had it never
stopped, and tests drive time by passing ``now``.

One call, in order of priority:

1. **restore** every expert left without a replica on a healthy worker
   (always, no cooldown, no action limit: tokens for it would fail).
2. enforce ``min_replicas``/``max_replicas`` (a policy may have changed).
3. **replicate** hot experts, hottest first: load per replica above
   ``hot_threshold`` x the layer's mean load per replica.
4. **evict** replicas of cold experts (below ``cold_threshold`` x mean), down
   to ``min_replicas``, never making the expert hot again.
   2-4 share ``max_actions_per_interval`` and the per-expert cooldowns.
5. **rebalance** when balancedness falls below ``min_balancedness``: the
   placement module's ``rebalance`` + ``diff_placement``, mostly migrations
   (it may also add or drop a spare replica), at most
   ``max_moves_per_interval`` weight copies, within the expert cooldowns,
   then ``rebalance.cooldown_s``.
6. **add_worker**: pools below ``min_workers``; an SLO breached for
   ``slo.window_s``; or hot experts that found no free slot. New workers go to
   the first pool (policy order) below ``max_workers``, after its cooldown.
7. **remove_worker**: a pool whose utilisation stayed below
   ``scale_down_utilization`` for ``window_s`` loses its least loaded worker,
   only if all its replicas fit elsewhere (the migrations are emitted first).

Actions are in the order the controller should carry them out. Unhealthy
workers hold no replicas as far as this function is concerned; replacing
them is the pool floor's job (rule 6).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from elasticmoe.core import placement as placement_mod
from elasticmoe.core.actions import Action
from elasticmoe.core.experts import LogicalExpert
from elasticmoe.core.policy import Policy, PolicySpec, PoolSpec

STATE_VERSION = 1


class WorkerLike(Protocol):
    """What :func:`decide` needs to know about a worker."""

    @property
    def worker_id(self) -> str: ...
    @property
    def pool(self) -> str: ...
    @property
    def num_slots(self) -> int: ...
    @property
    def healthy(self) -> bool: ...


@dataclass(frozen=True)
class WorkerState:
    """A worker as the controller sees it."""

    worker_id: str
    pool: str
    num_slots: int
    healthy: bool = True


@dataclass(frozen=True)
class ObservedState:
    """What the controller observed at one control interval.

    ``load`` is tokens per logical expert summed over the policy's
    ``window_s``; experts absent from it had no tokens. ``placement`` maps each
    logical expert to the workers holding a replica (replicas on unhealthy or
    unknown workers are ignored). Latencies are p99 over the SLO window, None
    when not measured.
    """

    load: Mapping[LogicalExpert, float]
    placement: Mapping[LogicalExpert, tuple[str, ...]]
    workers: Sequence[WorkerLike]
    ttft_p99_ms: float | None = None
    itl_p99_ms: float | None = None


@dataclass(frozen=True)
class PolicyState:
    """Everything :func:`decide` remembers between calls; persist it as JSON.

    ``expert_last[kind]["layer:expert"]`` is the time of the last ``kind``
    action on that expert; ``pool_last_up/down[pool]`` the last scale-up or
    scale-down; ``low_util_since[pool]`` since when the pool has been under
    its scale-down utilisation; ``slo_breach_since`` since when a latency
    target has been breached. All times are the ``now`` passed to ``decide``.
    """

    expert_last: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    pool_last_up: Mapping[str, float] = field(default_factory=dict)
    pool_last_down: Mapping[str, float] = field(default_factory=dict)
    low_util_since: Mapping[str, float] = field(default_factory=dict)
    last_rebalance: float | None = None
    slo_breach_since: float | None = None
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (keys sorted, so equal states serialise equally)."""
        return {
            "version": self.version,
            "expert_last": {
                k: dict(sorted(v.items())) for k, v in sorted(self.expert_last.items())
            },
            "pool_last_up": dict(sorted(self.pool_last_up.items())),
            "pool_last_down": dict(sorted(self.pool_last_down.items())),
            "low_util_since": dict(sorted(self.low_util_since.items())),
            "last_rebalance": self.last_rebalance,
            "slo_breach_since": self.slo_breach_since,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyState:
        """Inverse of :meth:`to_dict`; refuses a state written by a newer version."""
        version = int(data.get("version", STATE_VERSION))
        if version > STATE_VERSION:
            raise ValueError(
                f"policy state version {version} is newer than this elasticmoe "
                f"understands ({STATE_VERSION}); upgrade elasticmoe or drop the state"
            )
        return cls(
            expert_last={
                str(k): {str(e): float(t) for e, t in v.items()}
                for k, v in data.get("expert_last", {}).items()
            },
            pool_last_up={str(k): float(v) for k, v in data.get("pool_last_up", {}).items()},
            pool_last_down={str(k): float(v) for k, v in data.get("pool_last_down", {}).items()},
            low_util_since={str(k): float(v) for k, v in data.get("low_util_since", {}).items()},
            last_rebalance=_opt_float(data.get("last_rebalance")),
            slo_breach_since=_opt_float(data.get("slo_breach_since")),
            version=STATE_VERSION,
        )

    def to_json(self) -> str:
        """Serialise for the state store."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PolicyState:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _cooled(last: float | None, now: float, cooldown: float) -> bool:
    return last is None or now - last >= cooldown


class _Plan:
    """The placement as it will be once this interval's actions are carried out.

    Rules that run later in a call see the effect of earlier ones (slots taken
    by a replication, replicas drained off a worker), so one interval never
    over-commits a worker.
    """

    def __init__(self, observed: ObservedState) -> None:
        self.load = observed.load
        self.workers = {w.worker_id: w for w in observed.workers if w.healthy}
        self.placement: dict[LogicalExpert, list[str]] = {}
        for e in sorted(set(observed.placement) | set(observed.load)):
            # dict.fromkeys: drop duplicate entries, keep order
            reps = [w for w in dict.fromkeys(observed.placement.get(e, ())) if w in self.workers]
            self.placement[e] = sorted(reps)
        self.initial = {e: tuple(r) for e, r in self.placement.items()}
        self.layer_experts: dict[int, list[LogicalExpert]] = {}
        for e in self.placement:
            self.layer_experts.setdefault(e.layer, []).append(e)
        self.used = {w: 0 for w in self.workers}
        for reps in self.placement.values():
            for w in reps:
                self.used[w] += 1
        self.touched: set[str] = set()  # workers that some action of this interval uses
        self.removing: set[str] = set()

    def replicas(self, e: LogicalExpert) -> int:
        return len(self.placement[e])

    def free(self, w: str) -> int:
        return self.workers[w].num_slots - self.used[w]

    def layer_worker_loads(self, layer: int) -> dict[str, float]:
        """Tokens per worker in ``layer``, an expert's tokens split evenly over its replicas."""
        in_layer = {e: self.placement[e] for e in self.layer_experts.get(layer, ())}
        loads = placement_mod.worker_layer_loads(in_layer, self.load).get(layer, {})
        return {w: loads.get(w, 0.0) for w in self.workers}

    def worker_load(self, w: str) -> float:
        return sum(
            self.load.get(e, 0.0) / len(reps) for e, reps in self.placement.items() if w in reps
        )

    def has_room(self, e: LogicalExpert) -> bool:
        """Whether :meth:`best_target` would find a worker (cheaper: no load figures)."""
        return any(
            w not in self.removing and self.free(w) > 0 and w not in self.placement[e]
            for w in self.workers
        )

    def best_target(
        self, e: LogicalExpert, exclude: set[str] = frozenset(), prefer_pool: str | None = None
    ) -> str | None:
        """Healthy worker with a free slot and no replica of ``e``, least loaded in its layer."""
        loads = self.layer_worker_loads(e.layer)
        candidates = [
            w
            for w in self.workers
            if w not in exclude
            and w not in self.removing
            and self.free(w) > 0
            and w not in self.placement[e]
        ]
        if not candidates:
            return None
        return min(
            candidates,
            key=lambda w: (
                prefer_pool is not None and self.workers[w].pool != prefer_pool,
                loads[w],
                self.used[w] / self.workers[w].num_slots,
                w,
            ),
        )

    def add(self, e: LogicalExpert, w: str) -> None:
        self.placement[e] = sorted([*self.placement[e], w])
        self.used[w] += 1
        self.touched.add(w)

    def drop(self, e: LogicalExpert, w: str) -> None:
        self.placement[e] = [x for x in self.placement[e] if x != w]
        self.used[w] -= 1
        self.touched.add(w)

    def frozen(self) -> dict[LogicalExpert, tuple[str, ...]]:
        return {e: tuple(r) for e, r in self.placement.items()}

    def worker_specs(self) -> list[Any]:
        return [
            placement_mod.WorkerSpec(worker_id=w, num_slots=self.workers[w].num_slots)
            for w in sorted(self.workers)
            if w not in self.removing
        ]


class _Memory:
    """Mutable working copy of :class:`PolicyState` during one call."""

    def __init__(self, state: PolicyState) -> None:
        self.expert_last = {k: dict(v) for k, v in state.expert_last.items()}
        self.pool_last_up = dict(state.pool_last_up)
        self.pool_last_down = dict(state.pool_last_down)
        self.low_util_since = dict(state.low_util_since)
        self.last_rebalance = state.last_rebalance
        self.slo_breach_since = state.slo_breach_since

    def last(self, kind: str, e: LogicalExpert) -> float | None:
        return self.expert_last.get(kind, {}).get(str(e))

    def mark(self, kind: str, e: LogicalExpert, now: float) -> None:
        self.expert_last.setdefault(kind, {})[str(e)] = now

    def freeze(self, spec: PolicySpec, now: float) -> PolicyState:
        # Forget expert timestamps no cooldown can still see, so the state stays
        # bounded by the experts touched within the longest cooldown.
        horizon = max(spec.experts.replicate_cooldown_s, spec.experts.evict_cooldown_s)
        expert_last = {
            kind: {e: t for e, t in sorted(times.items()) if now - t < horizon}
            for kind, times in sorted(self.expert_last.items())
        }
        return PolicyState(
            expert_last={k: v for k, v in expert_last.items() if v},
            pool_last_up=dict(sorted(self.pool_last_up.items())),
            pool_last_down=dict(sorted(self.pool_last_down.items())),
            low_util_since=dict(sorted(self.low_util_since.items())),
            last_rebalance=self.last_rebalance,
            slo_breach_since=self.slo_breach_since,
        )


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def layer_mean_load_per_replica(
    load: Mapping[LogicalExpert, float], placement: Mapping[LogicalExpert, Sequence[str]]
) -> dict[int, float]:
    """Per layer: total tokens / total replicas (the yardstick for hot and cold)."""
    tokens: dict[int, float] = {}
    replicas: dict[int, int] = {}
    for e, reps in placement.items():
        if reps:
            tokens[e.layer] = tokens.get(e.layer, 0.0) + load.get(e, 0.0)
            replicas[e.layer] = replicas.get(e.layer, 0) + len(reps)
    return {layer: tokens[layer] / replicas[layer] for layer in tokens}


def decide(
    policy: Policy | PolicySpec,
    observed: ObservedState,
    now: float,
    state: PolicyState | None = None,
) -> tuple[list[Action], PolicyState]:
    """One control interval: the actions to take now and the state to keep.

    Pure and deterministic: equal arguments give equal results; nothing
    outside the arguments is read. See the module docstring for the rules.
    """
    spec = policy.spec if isinstance(policy, Policy) else policy
    now = float(now)
    memory = _Memory(state or PolicyState())
    plan = _Plan(observed)
    actions: list[Action] = []

    starved = _restore(plan, memory, now, actions)
    budget = [spec.experts.max_actions_per_interval]
    starved += _replica_bounds(spec, plan, memory, now, actions, budget)
    starved += _replicate_hot(spec, plan, memory, now, actions, budget)
    evicted = _evict_cold(spec, plan, memory, now, actions, budget)
    _rebalance(spec, plan, memory, now, actions)
    _scale_workers(spec, observed, plan, memory, now, actions, starved, evicted)
    return actions, memory.freeze(spec, now)


def _restore(plan: _Plan, memory: _Memory, now: float, actions: list[Action]) -> int:
    """Rule 1; returns how many experts found no slot."""
    starved = 0
    for e in sorted(plan.placement):
        if plan.placement[e]:
            continue
        target = plan.best_target(e)
        if target is None:
            starved += 1
            continue
        plan.add(e, target)
        # Its own kind: a restore must not hold back the replicas min_replicas asks for.
        memory.mark("restore", e, now)
        actions.append(Action("restore", e, target=target, reason="no replica on a healthy worker"))
    return starved


def _replica_bounds(
    spec: PolicySpec,
    plan: _Plan,
    memory: _Memory,
    now: float,
    actions: list[Action],
    budget: list[int],
) -> int:
    """Rule 2: replicas back within [min_replicas, max_replicas]; returns slot shortfall."""
    cfg = spec.experts
    starved = 0
    for e in sorted(plan.placement):
        n = plan.replicas(e)
        if 0 < n < cfg.min_replicas:
            if budget[0] <= 0 or not _cooled(
                memory.last("replicate", e), now, cfg.replicate_cooldown_s
            ):
                continue
            target = plan.best_target(e)
            if target is None:
                starved += 1
                continue
            plan.add(e, target)
            memory.mark("replicate", e, now)
            budget[0] -= 1
            actions.append(
                Action(
                    "replicate", e, target=target, reason=f"below min_replicas {cfg.min_replicas}"
                )
            )
        elif n > cfg.max_replicas:
            while plan.replicas(e) > cfg.max_replicas and budget[0] > 0:
                source = _busiest_replica(plan, e)
                plan.drop(e, source)
                memory.mark("evict", e, now)
                budget[0] -= 1
                actions.append(
                    Action(
                        "evict", e, source=source, reason=f"above max_replicas {cfg.max_replicas}"
                    )
                )
    return starved


def _busiest_replica(plan: _Plan, e: LogicalExpert) -> str:
    # Dropping the copy on the most loaded worker evens the layer out the most.
    loads = plan.layer_worker_loads(e.layer)
    return max(plan.placement[e], key=lambda w: (loads[w], w))


def _replicate_hot(
    spec: PolicySpec,
    plan: _Plan,
    memory: _Memory,
    now: float,
    actions: list[Action],
    budget: list[int],
) -> int:
    """Rule 3; returns how many hot experts found no free slot."""
    cfg = spec.experts
    # The yardstick is the observed placement, not the plan: one replication must
    # not change whether the next expert counts as hot in the same interval.
    means = layer_mean_load_per_replica(plan.load, plan.initial)
    hot: list[tuple[float, LogicalExpert]] = []
    for e, reps in plan.initial.items():
        mean = means.get(e.layer, 0.0)
        if not reps or mean <= 0:
            continue
        ratio = plan.load.get(e, 0.0) / len(reps) / mean
        if ratio > cfg.hot_threshold:
            hot.append((ratio, e))
    starved = 0
    for ratio, e in sorted(hot, key=lambda x: (-x[0], x[1])):
        if plan.replicas(e) >= cfg.max_replicas:
            continue
        if not _cooled(memory.last("replicate", e), now, cfg.replicate_cooldown_s):
            continue
        if budget[0] <= 0:
            # Out of actions this interval; still count it if it has nowhere to go.
            starved += not plan.has_room(e)
            continue
        target = plan.best_target(e)
        if target is None:
            starved += 1
            continue
        plan.add(e, target)
        memory.mark("replicate", e, now)
        budget[0] -= 1
        actions.append(
            Action(
                "replicate",
                e,
                target=target,
                reason=f"hot: {_fmt(ratio)}x layer mean per replica > {cfg.hot_threshold}",
            )
        )
    return starved


def _evict_cold(
    spec: PolicySpec,
    plan: _Plan,
    memory: _Memory,
    now: float,
    actions: list[Action],
    budget: list[int],
) -> int:
    """Rule 4; returns the number of evictions."""
    cfg = spec.experts
    means = layer_mean_load_per_replica(plan.load, plan.initial)
    cold: list[tuple[float, LogicalExpert]] = []
    for e, reps in plan.initial.items():
        mean = means.get(e.layer, 0.0)
        # An idle layer (mean 0) says nothing about which experts are unneeded.
        if len(reps) <= cfg.min_replicas or mean <= 0:
            continue
        tokens = plan.load.get(e, 0.0)
        ratio = tokens / len(reps) / mean
        # Hysteresis: never evict a replica whose loss would make the expert hot.
        if ratio < cfg.cold_threshold and tokens / (len(reps) - 1) / mean <= cfg.hot_threshold:
            cold.append((ratio, e))
    evicted = 0
    for ratio, e in sorted(cold):
        if budget[0] <= 0:
            break
        if plan.replicas(e) <= cfg.min_replicas or plan.replicas(e) != len(plan.initial[e]):
            continue  # already changed by an earlier rule this interval
        if not (
            _cooled(memory.last("evict", e), now, cfg.evict_cooldown_s)
            and _cooled(memory.last("replicate", e), now, cfg.evict_cooldown_s)
        ):
            continue
        source = _busiest_replica(plan, e)
        plan.drop(e, source)
        memory.mark("evict", e, now)
        budget[0] -= 1
        evicted += 1
        actions.append(
            Action(
                "evict",
                e,
                source=source,
                reason=f"cold: {_fmt(ratio)}x layer mean per replica < {cfg.cold_threshold}",
            )
        )
    return evicted


def _rebalance(
    spec: PolicySpec, plan: _Plan, memory: _Memory, now: float, actions: list[Action]
) -> None:
    """Rule 5: the placement module's rebalancer, bounded and within the expert cooldowns."""
    cfg = spec.rebalance
    if not cfg.enabled or not plan.workers or not plan.placement:
        return
    if not _cooled(memory.last_rebalance, now, cfg.cooldown_s):
        return
    workers = plan.worker_specs()
    current = plan.frozen()
    before = placement_mod.balancedness(current, plan.load, workers)
    if before >= cfg.min_balancedness:
        return
    try:
        new = placement_mod.rebalance(
            plan.load,
            workers,
            current,
            min_replicas=spec.experts.min_replicas,
            max_replicas=spec.experts.max_replicas,
            max_moves=cfg.max_moves_per_interval,
        )
    except ValueError:
        # Constraints that cannot hold now (too few workers or slots for min_replicas)
        # are rules 1, 2 and 6's to fix; balance waits for the next interval.
        return
    reason = f"balancedness {_fmt(before)} < {cfg.min_balancedness}"
    xcfg = spec.experts
    copies = 0
    taken = 0
    # diff_placement orders evictions first, so the slots they free are seen by the
    # copies after them; each step is re-checked against the plan and skipped if it no
    # longer holds (an earlier step was skipped, or it would break a cooldown).
    for act in placement_mod.diff_placement(current, new):
        e, src, dst = act.expert, act.source, act.target
        if e is None or e not in plan.placement:
            continue
        # Only replicas that exist now may be moved or dropped: one planned this
        # interval is not loaded yet.
        src_ok = src is not None and src in plan.initial[e] and src in plan.placement[e]
        dst_ok = (
            dst is not None
            and dst in plan.workers
            and dst not in plan.placement[e]
            and plan.free(dst) > 0
        )
        if act.kind == "evict":
            if not src_ok or plan.replicas(e) <= xcfg.min_replicas:
                continue
            if not (
                _cooled(memory.last("evict", e), now, xcfg.evict_cooldown_s)
                and _cooled(memory.last("replicate", e), now, xcfg.evict_cooldown_s)
            ):
                continue
            plan.drop(e, src)
            memory.mark("evict", e, now)
            actions.append(Action("evict", e, source=src, reason=reason))
        elif act.kind == "replicate":
            if not dst_ok or copies >= cfg.max_moves_per_interval:
                continue
            if plan.replicas(e) >= xcfg.max_replicas or not _cooled(
                memory.last("replicate", e), now, xcfg.replicate_cooldown_s
            ):
                continue
            plan.add(e, dst)
            memory.mark("replicate", e, now)
            copies += 1
            actions.append(Action("replicate", e, target=dst, reason=reason))
        elif act.kind == "migrate":
            if not (src_ok and dst_ok) or copies >= cfg.max_moves_per_interval:
                continue
            plan.drop(e, src)
            plan.add(e, dst)
            copies += 1
            actions.append(Action("migrate", e, source=src, target=dst, reason=reason))
        else:
            continue
        taken += 1
    if taken:
        memory.last_rebalance = now


def _pool_counts(spec: PolicySpec, plan: _Plan) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {p.name: [] for p in spec.pools}
    for w in sorted(plan.workers):
        pool = plan.workers[w].pool
        if pool in out and w not in plan.removing:
            out[pool].append(w)
    return out


def _slo_breached(spec: PolicySpec, observed: ObservedState) -> bool | None:
    """True/False, or None when a targeted latency was not measured."""
    slo = spec.slo
    checks = [
        (slo.ttft_p99_ms, observed.ttft_p99_ms),
        (slo.itl_p99_ms, observed.itl_p99_ms),
    ]
    known = [(t, v) for t, v in checks if t is not None and v is not None]
    if any(v > t for t, v in known):
        return True
    if len(known) < sum(t is not None for t, _ in checks):
        return None
    return False


def _scale_workers(
    spec: PolicySpec,
    observed: ObservedState,
    plan: _Plan,
    memory: _Memory,
    now: float,
    actions: list[Action],
    starved: int,
    evicted: int,
) -> None:
    """Rules 6 and 7."""
    pools = _pool_counts(spec, plan)
    scaled_up = False

    def can_scale_up(p: PoolSpec) -> bool:
        return _cooled(memory.pool_last_up.get(p.name), now, p.scale_up_cooldown_s)

    def scale_up(p: PoolSpec, count: int, reason: str) -> None:
        nonlocal scaled_up
        actions.append(Action("add_worker", pool=p.name, count=count, reason=reason))
        memory.pool_last_up[p.name] = now
        memory.low_util_since.pop(p.name, None)
        scaled_up = True

    # Floors first: a pool below min_workers (e.g. a worker died) is refilled as is.
    for p in spec.pools:
        deficit = p.min_workers - len(pools[p.name])
        if deficit > 0 and can_scale_up(p):
            scale_up(p, deficit, f"{len(pools[p.name])} workers < min_workers {p.min_workers}")

    breached = _slo_breached(spec, observed)
    if breached is False or not spec.slo.enabled:
        memory.slo_breach_since = None
    elif breached and memory.slo_breach_since is None:
        memory.slo_breach_since = now
    slo_due = (
        memory.slo_breach_since is not None and now - memory.slo_breach_since >= spec.slo.window_s
    )
    # Slots freed by this interval's evictions arrive next interval: wait for them first.
    slots_due = starved > 0 and evicted == 0
    if (slo_due or slots_due) and not scaled_up:
        # First pool with room, in policy order. If it is cooling down, wait rather
        # than spill into the next pool while its new worker is still starting.
        pool = next((p for p in spec.pools if len(pools[p.name]) < p.max_workers), None)
        if pool is not None and can_scale_up(pool):
            room = pool.max_workers - len(pools[pool.name])
            if slo_due:
                reason = f"SLO breached for {_fmt(now - memory.slo_breach_since)}s"
                count = 1
            else:
                reason = f"{starved} hot/unplaced expert(s) found no free slot"
                count = min(room, max(1, math.ceil(starved / pool.slots_per_worker)))
            scale_up(pool, count, reason)
            if slo_due:
                memory.slo_breach_since = now  # a further worker needs a further full window

    # No scale-down while capacity is short in any sense.
    block = scaled_up or bool(breached) or starved > 0
    _scale_down(spec, plan, memory, now, actions, pools, block=block)


def _pool_utilization(
    spec: PolicySpec, p: PoolSpec, plan: _Plan, workers: list[str]
) -> tuple[float, float | None]:
    """(utilisation, load utilisation): the larger of slot use and load over capacity,
    and the load part alone (None when the pool does not set its capacity)."""
    members = set(workers)
    slots = sum(plan.workers[w].num_slots for w in workers)
    used = sum(1 for reps in plan.initial.values() for w in reps if w in members)
    util = used / slots if slots else 0.0
    if not p.tokens_per_s_per_worker:
        return util, None
    tokens = sum(
        plan.load.get(e, 0.0) / len(reps) * sum(1 for w in reps if w in members)
        for e, reps in plan.initial.items()
        if reps
    )
    load_util = tokens / spec.window_s / (p.tokens_per_s_per_worker * len(workers))
    return max(util, load_util), load_util


def _scale_down(
    spec: PolicySpec,
    plan: _Plan,
    memory: _Memory,
    now: float,
    actions: list[Action],
    pools: dict[str, list[str]],
    block: bool,
) -> None:
    """Rule 7: at most one worker per pool per interval."""
    for p in spec.pools:
        workers = pools[p.name]
        if not workers:
            memory.low_util_since.pop(p.name, None)
            continue
        util, load_util = _pool_utilization(spec, p, plan, workers)
        if util >= p.scale_down_utilization:
            memory.low_util_since.pop(p.name, None)
            continue
        since = memory.low_util_since.setdefault(p.name, now)
        if block or now - since < spec.window_s or len(workers) <= p.min_workers:
            continue
        n = len(workers)
        # Never remove a worker whose load the rest of its pool cannot carry. (The last
        # worker of a pool hands its replicas to other pools; the drain checks their slots.)
        if load_util is not None and n > 1 and load_util * n / (n - 1) > 1.0:
            continue
        last_scale = max(
            memory.pool_last_up.get(p.name, -math.inf),
            memory.pool_last_down.get(p.name, -math.inf),
        )
        if now - last_scale < p.scale_down_cooldown_s:
            continue
        # Least loaded first; a worker some action of this interval uses stays.
        for w in sorted(
            (w for w in workers if w not in plan.touched),
            key=lambda w: (plan.worker_load(w), plan.used[w], w),
        ):
            drain = _drain(plan, w, p.name)
            if drain is None:
                continue
            actions.extend(drain)
            actions.append(
                Action(
                    "remove_worker",
                    source=w,
                    pool=p.name,
                    reason=f"utilisation < {p.scale_down_utilization} for {_fmt(now - since)}s",
                )
            )
            memory.pool_last_down[p.name] = now
            memory.low_util_since[p.name] = now  # the next removal needs a full window again
            break


def _drain(plan: _Plan, w: str, pool: str) -> list[Action] | None:
    """Migrations that empty ``w`` (into its own pool first), or None if they don't fit."""
    plan.removing.add(w)
    touched = set(plan.touched)
    moves: list[tuple[LogicalExpert, str]] = []
    for e in sorted(e for e, reps in plan.placement.items() if w in reps):
        target = plan.best_target(e, prefer_pool=pool)
        if target is None:
            for e2, t2 in reversed(moves):  # undo: this worker stays
                plan.drop(e2, t2)
                plan.add(e2, w)
            plan.removing.discard(w)
            plan.touched = touched
            return None
        plan.drop(e, w)
        plan.add(e, target)
        moves.append((e, target))
    return [
        Action("migrate", e, source=w, target=t, reason=f"drain {w} before removal")
        for e, t in moves
    ]


__all__ = [
    "ObservedState",
    "PolicyState",
    "WorkerLike",
    "WorkerState",
    "decide",
    "layer_mean_load_per_replica",
]
