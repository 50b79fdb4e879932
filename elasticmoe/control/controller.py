"""The controller: sole owner of the expert map; runs zero-downtime changes.

A thin actor over four parts: the planner and the journaled steps
(:mod:`elasticmoe.core.protocol`, pure), recovery from a journal
(:func:`~elasticmoe.core.protocol.recover`, pure), the worker registry with
its lifecycle states and health cache (:mod:`elasticmoe.control.workers`),
and the one interface to other processes (:mod:`elasticmoe.control.cluster`:
Ray actors and gRPC, or an in-memory fake). ``status()`` reads caches only:
the health loop refreshes worker health and the engines' stats.

Every change (replicate, evict, migrate, add/remove worker, restore) is
planned by :func:`~elasticmoe.core.protocol.plan_action` and carried out by
:meth:`Controller._change`, which follows DESIGN.md's protocol:

1. load each new replica (peer-to-peer from a live replica, else from the
   checkpoint) and verify its checksum;
2. publish epoch N+1 (compare-and-set in the state store, then pushed to
   every engine, which switches at its next step boundary);
3. wait until no engine runs a step on an epoch <= N;
4. free the replicas (and workers) that N+1 dropped.

Each step is journaled in the state store before it is taken. A controller
restarted in the middle (Ray restarts the named actor) reads the journal and
finishes an operation that was published, or rolls back one that was not,
then unloads any orphan slot, so the map never points at nothing and no slot
is left behind.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from elasticmoe.control.cluster import (
    Cluster,
    ClusterError,
    RayCluster,
    WorkerLaunch,
    worker_actor_name,
)
from elasticmoe.control.deployment_config import DeploymentConfig, check_policy_pools
from elasticmoe.control.state import StateStore, StateStoreUnavailable, make_state_store
from elasticmoe.control.workers import Lifecycle, WorkerRecord, WorkerRegistry
from elasticmoe.core.actions import Action
from elasticmoe.core.decide import ObservedState, PolicyState, WorkerState, decide
from elasticmoe.core.expert_map import ExpertMap
from elasticmoe.core.experts import LogicalExpert, parse_expert
from elasticmoe.core.placement import initial_placement
from elasticmoe.core.policy import Policy, load_policy, policy_from_text
from elasticmoe.core.protocol import (
    Change,
    ClusterView,
    PlanRefused,
    Step,
    WorkerSlots,
    check_change,
    plan_action,
    recover,
)
from elasticmoe.model.config import load_config

logger = logging.getLogger(__name__)

_POLICY_KEY = "policy"  # state-store value: {"text": the policy set through the API}


class ControllerError(RuntimeError):
    """A scaling request cannot be carried out (the message says why)."""


class ChangesPausedError(ControllerError):
    """The state store is unreachable: serving goes on, changes wait for it."""


def _parse_expert(text: str | LogicalExpert | tuple) -> LogicalExpert:
    """:func:`~elasticmoe.core.experts.parse_expert`, raising :class:`ControllerError`."""
    try:
        return parse_expert(text)
    except ValueError as e:
        raise ControllerError(str(e)) from None


class Controller:
    """Owns the expert map and the worker registry (run as a named Ray actor)."""

    def __init__(
        self,
        config: dict[str, Any],
        fault: dict[str, Any] | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = DeploymentConfig(**config)
        self.fault = fault or {}
        # every effect on another process goes through this (a FakeCluster in unit tests)
        self.cluster: Cluster = cluster if cluster is not None else RayCluster()
        self.model = load_config(self.config.model)
        self.store: StateStore = make_state_store(self.config.state_store, self.config.name)
        self.lock = threading.RLock()
        self.expert_map: ExpertMap | None = None
        # every worker process: lifecycle (starting/spare/active) and the health cache
        self.registry = WorkerRegistry(self.config.pool)
        self.checksums: dict[LogicalExpert, str] = {}
        self.history: list[dict[str, Any]] = []  # finished operations, newest last
        self._needs_recovery = False
        self._op_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._op_seconds: collections.Counter[tuple[str, str]] = collections.Counter()
        self._load_samples: collections.deque[tuple[float, dict[LogicalExpert, float]]] = (
            collections.deque(maxlen=4096)
        )
        # engines' stats as last observed; the health and control loops refresh them, so
        # status() (and /health, /metrics behind it) never waits on an RPC
        self._engine_stats: list[dict[str, Any]] = []
        self._num_engines = 0
        self._stop = threading.Event()
        # per background loop: iterations, errors caught, the last one (status() shows them)
        self._loops: dict[str, dict[str, Any]] = {
            name: {"iterations": 0, "errors": 0, "last_error": None, "last_error_at": None}
            for name in ("health", "autoscaler", "spares")
        }
        # workers stopped while the store was down: their registry entries go once it is back
        self._unsynced_deletes: set[str] = set()
        self.instance = uuid.uuid4().hex  # changes when Ray restarts the actor
        self._recover()
        self.policy = self._stored_policy()
        if self.policy is None and self.config.policy:
            self.policy = load_policy(self.config.policy)
        self.policy_state = PolicyState()
        with contextlib.suppress(StateStoreUnavailable):
            stored_state = self.store.get_value("policy_state")
            if stored_state:
                self.policy_state = PolicyState.from_dict(stored_state)
        if self.policy is not None:
            threading.Thread(target=self._control_loop, name="autoscaler", daemon=True).start()
        threading.Thread(target=self._health_loop, name="health", daemon=True).start()

    # ------------------------------------------------------------------ state
    @property
    def all_experts(self) -> list[LogicalExpert]:
        """Every logical expert of the model."""
        return [
            LogicalExpert(layer, e)
            for layer in self.model.moe_layers
            for e in range(self.model.num_experts)
        ]

    def _recover(self) -> None:
        """Load the map and registry; finish or roll back half-done operations.

        Sets ``_needs_recovery`` until it got through: a store that goes away
        midway leaves the rest for the next :meth:`_check_store` (every change
        and every health-loop tick calls it), and no change runs before that.
        """
        self._needs_recovery = True
        try:
            stored = self.store.get_map()
            entries = self.store.get_workers()
            if stored is not None:
                self.expert_map = ExpertMap.from_dict(stored)
            elif self.store.is_memory:
                self._adopt()
            if entries or not self.registry.records:  # _adopt registered what runs
                self.registry.load(entries, self.expert_map.workers if self.expert_map else ())
            self._register_mapped_workers()
            open_ops = self.store.open_operations()
            # a new worker id must not name a worker the map, the registry or an open
            # change still refers to (its actor may still run under that name)
            self.registry.note_ids(self.expert_map.workers if self.expert_map else ())
            for op_id in open_ops:
                begin = next(
                    (x["data"] for x in self.store.journal_entries(op_id) if x["step"] == "begin"),
                    {},
                )
                self.registry.note_ids(
                    [*begin.get("add_workers", ()), *begin.get("remove_workers", ())]
                )
            for op_id in open_ops:
                self._resume(op_id)
            for wid in sorted(self._unsynced_deletes):  # stopped while the store was down
                self.store.delete_worker(wid)
                self.registry.forget(wid)
                self._unsynced_deletes.discard(wid)
        except StateStoreUnavailable as e:
            logger.warning("state store unreachable while recovering; retried once back: %s", e)
            return
        self._needs_recovery = False
        if self.expert_map is not None:
            self._reconcile_slots()

    def _register_mapped_workers(self) -> None:
        """Give a worker the map lists but the registry lost (its entry was written while
        the store was down) a record from the map and the config, and store it again."""
        m = self.expert_map
        for wid, address in sorted(m.workers.items()) if m else ():
            if wid in self.registry:
                continue
            logger.warning("worker %s is in the map but not the registry; re-registering", wid)
            record = self.registry.register(
                WorkerRecord(
                    worker_id=wid,
                    address=address,
                    num_slots=self.config.num_slots(len(self.all_experts)),
                    pool=self.config.pool,
                    actor=worker_actor_name(self.config.name, wid),
                )
            )
            self.store.put_worker(wid, record.to_entry())

    def _register(
        self, worker_id: str, info: dict[str, Any], spare: bool, pool: str | None = None
    ) -> None:
        """Record a started worker (its ``ExpertWorker.info()``) in the registry and store."""
        record = self.registry.register(
            WorkerRecord(
                worker_id=worker_id,
                address=info["address"],
                num_slots=info["num_slots"],
                pool=pool or self.config.pool,
                actor=worker_actor_name(self.config.name, worker_id),
                node_id=info.get("node_id"),
                node_ip=info.get("node_ip"),
                lifecycle=Lifecycle.SPARE if spare else Lifecycle.ACTIVE,
            )
        )
        self.store.put_worker(worker_id, record.to_entry())

    def _slots(self, worker: str) -> int:
        record = self.registry.get(worker)
        return record.num_slots if record else 0

    def _pool_of(self, worker: str) -> str:
        record = self.registry.get(worker)
        return record.pool if record else self.config.pool

    def _adopt(self) -> None:
        """After a restart that lost the in-memory store: take over what still runs.

        Engines hold the newest expert map; the detached worker actors hold the
        weights. Workers outside that map become spares; an operation that was
        half-done when the old controller died leaves orphan slots, which
        :meth:`_reconcile_slots` frees. (A Redis store keeps the journal and
        does better: it finishes or rolls back that operation.)
        """
        maps = self.cluster.engine_maps(self.config.name)
        if not maps:
            return  # a first start: bootstrap() publishes epoch 1
        newest = ExpertMap.from_dict(max(maps, key=lambda d: d["epoch"]))
        for wid, info in self.cluster.running_workers(self.config.name).items():
            self._register(wid, info, spare=wid not in newest.workers)
        self.store.put_map(newest.to_dict(), expected_epoch=None)
        self.expert_map = newest
        logger.warning(
            "state store was empty after a restart: adopted expert map epoch %d and %d workers",
            newest.epoch,
            len(self.registry.records),
        )
        self.history.append({"kind": "adopt", "result": "done", "epoch": newest.epoch})

    def _resume(self, op_id: str) -> None:
        """Finish or roll back an open change, as :func:`~elasticmoe.core.protocol.recover` says."""
        plan = recover(
            self.store.journal_entries(op_id), self.expert_map.epoch if self.expert_map else None
        )
        logger.info("resuming operation %s (%s): %s", op_id, plan.change.kind, plan.outcome)
        current = self.expert_map
        if plan.drain_epoch is not None:
            if current is not None:
                # the publish may have landed without reaching the engines (the store
                # went away first, or the old controller died right after it)
                self._push(current)
            self._drain(plan.drain_epoch)
        # What the map lists stays, whatever the journal says: a later change may have
        # put the same replica or worker back.
        self._unload(
            [(e, w) for e, w in plan.unload if current is None or w not in current.replicas_of(e)]
        )
        self._stop_workers(
            [w for w in plan.stop_workers if current is None or w not in current.workers]
        )
        result = "done" if plan.outcome == "finish" else "rolled_back"
        for step in plan.journal:
            if step is not Step.ROLLED_BACK:
                self.store.journal_append(op_id, step.value, {"recovered": True})
        self.store.journal_finish(op_id, result)
        self.history.append(
            {"op_id": op_id, "kind": plan.change.kind, "result": result, "recovered": True}
        )

    def _reconcile_slots(self) -> None:
        """Unload replicas a worker holds that the map does not list (orphans)."""
        assert self.expert_map is not None
        for worker in list(self.expert_map.workers):
            try:
                held = self.cluster.held(worker, self._address(worker))
            except (ClusterError, KeyError) as e:
                logger.warning("worker %s unreachable while reconciling: %s", worker, e)
                continue
            for expert, checksum in held.items():
                self.checksums.setdefault(expert, checksum)
            orphans = [e for e in held if e not in self.expert_map.experts_on(worker)]
            if orphans:
                logger.info("unloading orphan replicas on %s: %s", worker, orphans)
                self._unload([(e, worker) for e in orphans])

    # -------------------------------------------------------------- bootstrap
    def bootstrap(self) -> dict[str, Any]:
        """Start the initial workers and publish epoch 1 (no-op once a map exists)."""
        with self.lock:
            if self._needs_recovery:  # the store was down at start: recover first
                self._check_store()
            if self.expert_map is not None:
                if any(self._probe(w) for w in self.expert_map.workers):
                    return self.expert_map.to_dict()
                self._discard_stale_state()
            self._check_store()
            c = self.config
            counts = c.replica_counts(self.all_experts)
            # each pool's initial workers, with that pool's slots (an NPU and a GPU
            # worker hold different numbers of experts)
            pool_ids = {
                p.name: self.registry.new_ids(p.num_workers, Lifecycle.ACTIVE, p.name)
                for p in c.worker_pools()
            }
            worker_ids = [w for ids in pool_ids.values() for w in ids]
            slots = {
                w: c.num_slots(len(self.all_experts), pool, self._expert_bytes())
                for pool, ids in pool_ids.items()
                for w in ids
            }
            addresses: dict[str, str] = {}
            try:
                # a ValueError here is a bad configuration: it names the setting
                placement = initial_placement(self.all_experts, worker_ids, slots, counts)
                for pool, ids in pool_ids.items():
                    if ids:  # all pools or none: a failed pool stops the ones started
                        addresses.update(
                            self._start_workers(
                                {w: [e for e, ws in placement.items() if w in ws] for w in ids},
                                pool=pool,
                            )
                        )
            except BaseException:
                self._stop_workers(list(addresses))
                raise
            finally:
                self.registry.release(worker_ids)
            new_map = ExpertMap(1, placement, addresses)
            if not self.store.put_map(new_map.to_dict(), expected_epoch=None):
                raise ControllerError("another controller already published an expert map")
            self.expert_map = new_map
            self._replenish_spares()
            return new_map.to_dict()

    def _discard_stale_state(self) -> None:
        """Forget a stored map none of whose workers runs (the last run ended without a clean
        stop, and its workers went with its Ray cluster): a start begins fresh instead of
        serving from workers that are gone. Worker ids keep counting past the old ones."""
        assert self.expert_map is not None
        logger.warning(
            "the stored expert map (epoch %d) names workers %s, none of which runs: the last "
            "run did not stop cleanly; starting fresh",
            self.expert_map.epoch,
            sorted(self.expert_map.workers),
        )
        self._check_store()
        self.store.clear()
        self.history.append(
            {"kind": "discard_stale_state", "result": "done", "epoch": self.expert_map.epoch}
        )
        self.expert_map = None
        self.checksums.clear()
        for wid in list(self.registry):
            self.registry.forget(wid)

    def _start_workers(
        self,
        experts_by_worker: dict[str, list[LogicalExpert]],
        spare: bool = False,
        pool: str | None = None,
    ) -> dict[str, str]:
        """Start workers of ``pool`` (default: the first) with its Ray resources (all or
        none) and register them."""
        c = self.config
        p = c.get_pool(pool or c.pool)
        resources = dict(p.worker_resources)
        if p.device == "npu":
            resources.setdefault("NPU", 1)
        launch = WorkerLaunch(
            deployment=c.name,
            model=c.model,
            num_slots=c.num_slots(len(self.all_experts), p.name, self._expert_bytes()),
            device=p.device,
            dtype=c.resolved_dtype(self.model),
            num_cpus=p.worker_num_cpus,
            num_gpus=p.worker_num_gpus or (1 if p.device == "cuda" else 0),
            resources=resources,
            num_threads=c.worker_threads,
            port=c.worker_grpc_port,
            fault_injection=c.fault_injection,
            start_timeout_s=c.worker_start_timeout_s,
            background_priority=c.background_priority,
        )
        infos = self.cluster.start_workers(launch, experts_by_worker)
        addresses = {}
        for wid, info in infos.items():
            addresses[wid] = info["address"]
            for slot in info["slots"]:
                if slot:
                    self.checksums.setdefault(
                        LogicalExpert(slot["layer"], slot["expert"]), slot["checksum"]
                    )
            self._register(wid, info, spare, p.name)
        return addresses

    # --------------------------------------------------------------- queries
    def dtype(self) -> str:
        """The dtype workers and engines run in."""
        return self.config.resolved_dtype(self.model)

    def _expert_bytes(self) -> int:
        """Bytes of one expert's weights on a worker (gate, up and down projections, and
        their biases where the model has them: gpt_oss)."""
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[
            self.config.resolved_dtype(self.model)
        ]
        m = self.model
        hidden, inter = m.hidden_size, m.expert_intermediate_size
        biases = 2 * inter + hidden if m.expert_bias else 0
        return (3 * hidden * inter + biases) * itemsize

    def instance_id(self) -> str:
        """Differs after every restart of this actor."""
        return self.instance

    def state_store_url(self) -> str | None:
        """Where the state lives (None: in this actor's memory)."""
        return self.config.state_store

    def get_map(self) -> dict[str, Any] | None:
        """The current expert map (engines pull this as a fallback to pushes)."""
        return self.expert_map.to_dict() if self.expert_map else None

    def status(self) -> dict[str, Any]:
        """Workers, replicas, per-expert load and epoch (for `elasticmoe status`)."""
        m = self.expert_map
        load = self.expert_load()
        workers = []
        for wid, record in sorted(self.registry.records.items()):
            experts = m.experts_on(wid) if m else ()
            workers.append(
                {
                    "worker_id": wid,
                    "address": record.address,
                    "pool": record.pool,
                    "num_slots": record.num_slots,
                    "lifecycle": record.lifecycle.value,
                    "num_replicas": len(experts),
                    "load": sum(load.get(e, 0.0) / max(1, len(m.replicas_of(e))) for e in experts)
                    if m
                    else 0.0,
                    "healthy": self._healthy(wid),
                }
            )
        return {
            "epoch": m.epoch if m else None,
            "workers": workers,
            "replicas": {str(e): list(ws) for e, ws in sorted(m.replicas.items())} if m else {},
            "expert_load": {str(e): v for e, v in sorted(load.items())},
            "num_engines": self._num_engines,
            "spare_workers": self.registry.spares(),
            "operations": [
                {"kind": k, "result": r, "count": n, "seconds": round(self._op_seconds[k, r], 3)}
                for (k, r), n in sorted(self._op_counts.items())
            ],
            "redundancy": self.redundancy(),
            "autoscaler": self.policy.metadata.name if self.policy else None,
            # background loops: iterations, errors caught (each logged with its traceback)
            "loops": {name: dict(entry) for name, entry in self._loops.items()},
            "history": self.history[-20:],
        }

    def _healthy(self, worker: str) -> bool:
        """The health loop's last word on ``worker`` (no RPC here)."""
        return self.registry.healthy(worker)

    def _probe(self, worker: str) -> bool:
        try:
            return self.cluster.healthy(worker, self._address(worker))
        except KeyError:
            return False

    def probe_health(self) -> dict[str, bool]:
        """Health-check every worker now (outside the lock) and refresh the cache."""
        in_map = self.expert_map.workers if self.expert_map else ()
        result = {w: self._probe(w) for w in sorted({*in_map, *self.registry.spares()})}
        self.registry.record_health(result)
        return result

    def observe_engines(self) -> None:
        """Refresh the engines' stats (load, latency) that status() and decisions read."""
        self._engine_stats = self.cluster.engine_stats(self.config.name)
        self._num_engines = self.cluster.num_engines(self.config.name)

    def expert_load(self) -> dict[LogicalExpert, float]:
        """Tokens routed to each logical expert so far, summed over engines."""
        totals: dict[LogicalExpert, float] = {}
        for s in self._engine_stats:
            for row, layer in enumerate(self.model.moe_layers):
                for e, v in enumerate(s["expert_load"][row]):
                    key = LogicalExpert(layer, e)
                    totals[key] = totals.get(key, 0.0) + float(v)
        return totals

    # ------------------------------------------------------------ operations
    def replicate(self, expert: str, target: str | None = None) -> dict[str, Any]:
        """Add a replica of ``expert`` on ``target`` (default: least-used worker without it)."""
        return self._act(Action("replicate", expert=_parse_expert(expert), target=target))

    def evict(self, expert: str, worker: str) -> dict[str, Any]:
        """Drop the replica of ``expert`` on ``worker`` (never the last one)."""
        return self._act(Action("evict", expert=_parse_expert(expert), source=worker))

    def migrate(self, expert: str, source: str, target: str | None = None) -> dict[str, Any]:
        """Move the replica of ``expert`` from ``source`` to ``target``."""
        return self._act(
            Action("migrate", expert=_parse_expert(expert), source=source, target=target)
        )

    def _view(self) -> ClusterView:
        """The map and workers as the planner sees them (health from the cache)."""
        m = self._map()
        return ClusterView(
            epoch=m.epoch,
            placement=dict(m.replicas),
            workers={
                w: WorkerSlots(
                    self._slots(w),
                    self._healthy(w),
                    self._pool_of(w),
                )
                for w in m.workers
            },
            experts=frozenset(self.all_experts),
            max_workers=self.config.max_workers,
        )

    def _act(
        self, action: Action, new_worker_ids: list[str] = (), keep_off: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Plan ``action`` (pure, the same planner ``policy simulate`` uses), then run it."""
        with self.lock:
            if self._needs_recovery:  # plan on the map recovery leaves, not on the one before
                self._check_store()
            try:
                change = plan_action(self._view(), action, new_worker_ids, keep_off)
            except PlanRefused as e:
                raise ControllerError(str(e)) from None
            return self._change(change)

    def scale(self, expert: str, replicas: int) -> list[dict[str, Any]]:
        """Bring ``expert`` to exactly ``replicas`` replicas (replicate or evict)."""
        e = _parse_expert(expert)
        if replicas < 1:
            raise ControllerError(f"replicas={replicas}: an expert needs at least 1")
        results = []
        with self.lock:
            self._check_expert(e)
            if replicas > len(self._map().workers):
                raise ControllerError(
                    f"replicas={replicas} > {len(self._map().workers)} workers "
                    "(at most one replica per worker)"
                )
            while len(self._map().replicas_of(e)) < replicas:
                results.append(self.replicate(str(e)))
            while len(self._map().replicas_of(e)) > replicas:
                holders = self._map().replicas_of(e)
                busiest = max(holders, key=lambda w: len(self._map().experts_on(w)))
                results.append(self.evict(str(e), busiest))
        return results

    def add_worker(self, count: int = 1, pool: str | None = None) -> dict[str, Any]:
        """Start ``count`` empty workers in ``pool`` (spares first) and add them to the map.

        ``pool`` is one of the deployment's pools; None: the first with room for them.
        """
        with self.lock:
            if count < 1:
                raise ControllerError(f"count={count}: add at least one worker")
            if len(self._map().workers) + count > self.config.max_workers:
                raise ControllerError(
                    f"adding {count} worker(s) would exceed max_workers={self.config.max_workers}"
                )
            pool = self._pool_with_room(count, pool)
            ids = self.registry.take_spares(count, pool)
            fresh = self.registry.new_ids(count - len(ids), Lifecycle.ACTIVE, pool)
            try:
                return self._act(Action("add_worker", pool=pool, count=count), ids + fresh)
            finally:
                self.registry.release(fresh)
                threading.Thread(target=self._replenish_spares, daemon=True).start()

    def _pool_with_room(self, count: int, pool: str | None) -> str:
        """``pool`` if it can take ``count`` more workers (None: the first pool that can),
        else :class:`ControllerError` naming the limit."""
        in_map = self.expert_map.workers if self.expert_map else {}
        pools = self.config.worker_pools()
        if pool is not None:
            try:
                pools = [self.config.get_pool(pool)]
            except ValueError as e:
                raise ControllerError(str(e)) from None
        for p in pools:
            if sum(1 for w in in_map if self._pool_of(w) == p.name) + count <= p.max_workers:
                return p.name
        raise ControllerError(
            f"adding {count} worker(s) would exceed max_workers of pool(s) "
            f"{', '.join(f'{p.name}={p.max_workers}' for p in pools)}"
        )

    def remove_worker(self, worker: str, keep_off: Iterable[str] = ()) -> dict[str, Any]:
        """Move every replica off ``worker``, then stop it.

        Replicas that must move go to live workers not in ``keep_off`` (workers
        about to be drained too).
        """
        return self._act(Action("remove_worker", source=worker), keep_off=keep_off)

    def drain(self, workers: Iterable[str] = (), nodes: Iterable[str] = ()) -> dict[str, Any]:
        """Move every replica off these workers (and the workers on these nodes), then stop them.

        A node is named by its Ray node id or IP. Used before a Kubernetes
        worker group shrinks: the pods go only after their experts moved.
        """
        with self.lock:
            m = self._map()
            nodes = set(nodes)
            wanted = set(workers)
            spares = set(self.registry.spares())
            unknown = sorted(w for w in wanted if w not in m.workers and w not in spares)
            if unknown:
                raise ControllerError(f"no worker(s) {unknown}; workers: {sorted(m.workers)}")
            for w, record in self.registry.records.items():
                if nodes & {record.node_id, record.node_ip}:
                    wanted.add(w)
            spares = sorted(w for w in wanted if w in spares)
            active = sorted(w for w in wanted if w in m.workers)
            if active and len(active) >= len(m.workers):
                raise ControllerError(
                    f"draining {active} would leave no worker; add workers elsewhere first"
                )
            drained = []
            for w in active:
                self.remove_worker(w, keep_off=set(active) - set(drained) - {w})
                drained.append(w)
            self._stop_workers(spares)
            return {"drained": drained + spares, "epoch": self._map().epoch}

    def demand(self) -> dict[str, Any]:
        """Workers per pool now and wanted (the Kubernetes operator sizes node groups by it).

        Lock-free on purpose: an ``add_worker`` waiting for a node holds the lock,
        and the operator must read this demand to create that node.
        """
        m = self.expert_map
        in_map = list(m.workers) if m else []
        records = dict(self.registry.records)  # a snapshot: this runs without the lock
        # every worker process: in the map, joining it, or spare
        workers = [
            {
                "worker_id": w,
                "pool": records[w].pool if w in records else self.config.pool,
                "node": records[w].node_ip if w in records else None,
                "node_id": records[w].node_id if w in records else None,
                "spare": w in records and records[w].lifecycle is Lifecycle.SPARE,
                "healthy": self.registry.misses(w) == 0,
            }
            for w in [*in_map, *(w for w in records if w not in set(in_map))]
        ]
        pools: dict[str, dict[str, int]] = {
            p.name: {"workers": 0, "desired": 0} for p in self.config.worker_pools()
        }
        for entry in workers:
            pool = pools.setdefault(entry["pool"], {"workers": 0, "desired": 0})
            pool["workers"] += 1
        configured = {p.name for p in self.config.worker_pools()}
        for name, pool in pools.items():
            if name not in configured:  # a stored worker of a pool no longer configured
                pool["desired"] = pool["workers"]
                continue
            # the first pool keeps the spares, and at least one worker without a policy
            floor = self.policy_min_workers(name)
            if name == self.config.pool:
                floor = self.config.spare_workers + (floor or 1)
            pool["desired"] = max(
                pool["workers"] + self.registry.num_starting(pool=name), floor or 0
            )
        return {"epoch": m.epoch if m else None, "pools": pools, "workers": workers}

    def policy_min_workers(self, pool: str | None = None) -> int | None:
        """The policy's floor for ``pool`` (default: the first; None without a policy)."""
        if self.policy is None:
            return None
        for p in self.policy.spec.pools:
            if p.name == (pool or self.config.pool):
                return p.min_workers
        return None

    def min_replicas(self) -> dict[LogicalExpert, int]:
        """Replicas every expert must keep: the policy's minimum, else the configured counts."""
        counts = self.config.replica_counts(self.all_experts)
        if self.policy is not None:
            floor = self.policy.spec.experts.min_replicas
            counts = {e: floor for e in counts}
        workers = len(self._map().workers) if self.expert_map else 1
        return {e: min(n, workers) for e, n in counts.items()}

    def redundancy(self, probe: bool = False) -> dict[str, Any]:
        """Experts below their minimum replica count (``full`` when none).

        Counts the replicas in the map (the health loop takes a worker out after
        two missed checks); with ``probe``, only those on workers that answer a
        health check now.
        """
        if self.expert_map is None:
            return {"full": False, "below_min": [], "missing": [], "workers": 0}
        m = self.expert_map
        floor = self.min_replicas()
        dead = {w for w in m.workers if not self._probe(w)} if probe else set()
        below, missing = [], []
        for e, n in sorted(floor.items()):
            live = [w for w in m.replicas_of(e) if w not in dead]
            if not live:
                missing.append(str(e))
            if len(live) < n:
                below.append(str(e))
        return {
            "full": not below,
            "below_min": below,
            "missing": missing,
            "workers": len(m.workers) - len(dead),
        }

    def restore_redundancy(
        self, replace_workers: int = 0, pools: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """Start ``replace_workers`` workers (within max_workers; each in the pool ``pools``
        names for it, the one the dead worker was in, else the first with room), then
        replicate every expert below its minimum replica count (after a worker died)."""
        results = []
        with self.lock:
            room = self.config.max_workers - len(self._map().workers)
            count = min(replace_workers, room)
            wanted = list(pools)[:count]
            for pool in sorted(set(wanted), key=wanted.index):
                try:
                    results.append(self.add_worker(wanted.count(pool), pool))
                except ControllerError as err:  # that pool is full: the first with room
                    logger.warning("cannot replace workers in pool %s: %s", pool, err)
                    results.append(self.add_worker(wanted.count(pool)))
            if count - len(wanted) > 0:
                results.append(self.add_worker(count - len(wanted)))
            for e, n in sorted(self.min_replicas().items()):
                missing = n - len(self._map().replicas_of(e))
                for _ in range(missing):
                    try:
                        if self._map().replicas_of(e):
                            results.append(self.replicate(str(e)))
                        else:
                            results.append(self.restore(str(e)))
                    except ControllerError as err:
                        logger.warning("cannot restore redundancy of %s: %s", e, err)
                        break
        return results

    def restore(self, expert: str) -> dict[str, Any]:
        """Bring back an expert that lost every replica (from the checkpoint)."""
        return self._act(Action("restore", expert=_parse_expert(expert)))

    def apply(self, actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Carry out autoscaler actions in order; a failed one is reported, not raised."""
        results = []
        for data in actions:
            a = Action.from_dict(data)
            try:
                if a.kind == "replicate":
                    results.append(self.replicate(str(a.expert), a.target))
                elif a.kind == "evict":
                    results.append(self.evict(str(a.expert), a.source))
                elif a.kind == "migrate":
                    results.append(self.migrate(str(a.expert), a.source, a.target))
                elif a.kind == "add_worker":
                    results.append(self.add_worker(a.count, a.pool))
                elif a.kind == "remove_worker":
                    results.append(self.remove_worker(a.source))
                elif a.kind == "restore":
                    results.append(self.restore(str(a.expert)))
            except ControllerError as err:
                results.append({"kind": a.kind, "result": "rejected", "error": str(err)})
        return results

    # ------------------------------------------------------- the protocol
    def _change(self, change: Change) -> dict[str, Any]:
        """Run one zero-downtime change (steps: :mod:`elasticmoe.core.protocol`)."""
        self._check_store()
        m = self._map()
        kind, add, remove = change.kind, change.add, change.remove
        add_workers, remove_workers = change.add_workers, change.remove_workers
        op_id = f"{kind}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        self.store.journal_append(op_id, Step.BEGIN.value, change.to_journal())
        self._fault("begin")
        loaded: list[tuple[LogicalExpert, str]] = []
        try:
            workers = dict(m.workers)
            warm = {w: self.registry.records[w].address for w in add_workers if w in self.registry}
            workers.update(warm)
            cold = [w for w in add_workers if w not in warm]
            if cold:
                workers.update(self._start_workers({w: [] for w in cold}, pool=change.pool))
            for expert, worker in add:
                self._load(expert, worker, workers, exclude=[w for e2, w in remove if e2 == expert])
                loaded.append((expert, worker))
            self.store.journal_append(op_id, Step.LOADED.value, {})
            self._fault("loaded")
            for w in remove_workers:
                workers.pop(w, None)
            try:
                check_change(self._view(), change)  # the last word, right before publishing
            except PlanRefused as e:
                raise ControllerError(str(e)) from None
            new_map = m.with_changes(add=add, remove=remove, workers=workers)
            try:
                published = self.store.put_map(new_map.to_dict(), expected_epoch=m.epoch)
            except StateStoreUnavailable as e:
                # the write may or may not have landed: leave the operation open;
                # it is finished or rolled back from the journal once the store is back
                self._needs_recovery = True
                raise ChangesPausedError(
                    f"state store lost while publishing epoch {new_map.epoch}: {e}"
                ) from e
            if not published:
                raise ControllerError(
                    f"epoch {m.epoch} is stale: another controller changed the map"
                )
        except ChangesPausedError:
            raise
        except BaseException as e:
            self._unload(loaded)
            self._stop_workers(add_workers)
            try:
                self.store.journal_finish(op_id, "rolled_back")
            except StateStoreUnavailable:
                # still open in the journal: resolved (rolled back) from it before any
                # other change, by this controller once the store is back or the next one
                self._needs_recovery = True
            self.history.append(
                {"op_id": op_id, "kind": kind, "result": "rolled_back", "error": str(e)}
            )
            self._op_counts[kind, "rolled_back"] += 1
            self._op_seconds[kind, "rolled_back"] += time.monotonic() - started
            if isinstance(e, StateStoreUnavailable):
                raise ChangesPausedError(f"state store unreachable, change rolled back: {e}") from e
            raise
        # Epoch N+1 is the stored map: from here the change can only be finished.
        # Nothing below needs the store to go on; a journal write that fails leaves
        # the operation open, and recovery finishes it from the journal (the stored
        # epoch says it was published), before any other change runs.
        self.expert_map = new_map
        self._push(new_map)
        journaled = self._journal_quietly(op_id, Step.PUBLISHED.value, {"epoch": new_map.epoch})
        self._fault("published")
        self._drain(m.epoch)
        self._unload(remove)
        self._stop_workers(remove_workers)
        for w in add_workers:
            record = self.registry.get(w)
            if record is not None:  # a spare that joined is stored as active from now on
                record.lifecycle = Lifecycle.ACTIVE
                # best effort: a stored entry of a worker in the map reads as active anyway
                with contextlib.suppress(StateStoreUnavailable):
                    self.store.put_worker(w, record.to_entry())
        journaled = journaled and self._journal_quietly(op_id, Step.DONE.value, {})
        if journaled:
            try:
                self.store.journal_finish(op_id, "done")
            except StateStoreUnavailable as e:
                logger.warning("could not mark %s done (store down): %s", op_id, e)
                journaled = False
        if not journaled:
            self._needs_recovery = True
        result = {
            "op_id": op_id,
            "kind": kind,
            "result": "done",
            "epoch": new_map.epoch,
            "add": [[str(e), w] for e, w in add],
            "remove": [[str(e), w] for e, w in remove],
            "add_workers": list(add_workers),
            "remove_workers": list(remove_workers),
            "seconds": round(time.monotonic() - started, 3),
        }
        if not journaled:
            result["journal"] = "pending"  # finished in the journal once the store is back
        self.history.append(result)
        self._op_counts[kind, "done"] += 1
        self._op_seconds[kind, "done"] += result["seconds"]
        return result

    def _journal_quietly(self, op_id: str, step: str, data: dict[str, Any]) -> bool:
        """Journal a step after the publish; False (logged) if the store is down."""
        try:
            self.store.journal_append(op_id, step, data)
        except StateStoreUnavailable as e:
            logger.warning("could not journal %s of %s (store down): %s", step, op_id, e)
            return False
        return True

    def _load(
        self,
        expert: LogicalExpert,
        worker: str,
        workers: dict[str, str],
        exclude: Iterable[str] = (),
    ) -> None:
        """Load a replica peer-to-peer from a live replica (else the checkpoint); verify it."""
        m = self._map()
        # Copies come only from live replicas in the current map, and only of experts
        # whose checksum was recorded (the worker verifies the copy against it).
        peers = [w for w in m.replicas_of(expert) if w != worker and self._healthy(w)]
        if expert not in self.checksums:
            peers = []
        peers.sort(key=lambda w: w in set(exclude))  # a replica that stays is the best source
        sources = [workers[p] for p in peers] + ["checkpoint"]
        last_error = None
        for source in sources:
            try:
                checksum = self.cluster.load(
                    worker,
                    self._address(worker, workers.get(worker)),
                    expert,
                    source,
                    self.config.rpc_timeout_s,
                    checksum=self.checksums.get(expert),
                )
            except ClusterError as e:
                last_error = str(e)
                logger.warning(
                    "loading %s on %s from %s failed: %s", expert, worker, source, last_error
                )
                continue
            known = self.checksums.setdefault(expert, checksum)
            if checksum != known:
                self._unload([(expert, worker)])
                raise ControllerError(
                    f"replica of {expert} on {worker} has checksum {checksum[:12]}, "
                    f"expected {known[:12]}"
                )
            return
        raise ControllerError(f"could not load expert {expert} on {worker}: {last_error}")

    def _unload(self, replicas: Iterable[tuple[LogicalExpert, str]]) -> None:
        by_worker: dict[str, list[LogicalExpert]] = {}
        for e, w in replicas:
            by_worker.setdefault(w, []).append(e)
        for worker, experts in by_worker.items():
            try:
                self.cluster.unload(
                    worker, self._address(worker), experts, self.config.rpc_timeout_s
                )
            except (ClusterError, KeyError) as e:  # a dead worker holds nothing anyway
                logger.info("unload on %s skipped: %s", worker, e)

    def _stop_workers(self, worker_ids: Iterable[str]) -> None:
        for wid in worker_ids:
            self.cluster.stop_worker(self.config.name, wid)
            self.registry.forget(wid)
            try:
                self.store.delete_worker(wid)
                self._unsynced_deletes.discard(wid)
            except StateStoreUnavailable:
                logger.warning("could not drop %s from the registry (store down)", wid)
                self._unsynced_deletes.add(wid)
                self._needs_recovery = True  # recovery drops it once the store is back

    def _push(self, new_map: ExpertMap) -> None:
        """Push the new map to every engine (the one channel; engines pull as the fallback)."""
        self.cluster.push_map(self.config.name, new_map.to_dict())

    def _drain(self, old_epoch: int) -> None:
        """Wait until no engine runs a step on an epoch <= ``old_epoch``."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        while True:
            active = self.cluster.active_epochs(self.config.name)
            if not any(a is not None and a <= old_epoch for a in active):
                return
            if time.monotonic() >= deadline:
                logger.warning("drain of epoch %d timed out; freeing anyway", old_epoch)
                return
            time.sleep(0.01)

    # --------------------------------------------------------------- helpers
    def _address(self, worker: str, address: str | None = None) -> str:
        """Where ``worker``'s gRPC service listens (KeyError: unknown worker)."""
        address = (
            address
            or (self.expert_map.workers.get(worker) if self.expert_map else None)
            or (self.registry.records[worker].address if worker in self.registry else None)
        )
        if address is None:
            raise KeyError(worker)
        return address

    def _map(self) -> ExpertMap:
        if self.expert_map is None:
            raise ControllerError("no expert map yet: call bootstrap first")
        return self.expert_map

    def _check_expert(self, e: LogicalExpert) -> None:
        if e not in set(self.all_experts):
            raise ControllerError(
                f"expert {e} does not exist: MoE layers {list(self.model.moe_layers)}, "
                f"experts 0..{self.model.num_experts - 1}"
            )

    def _check_store(self) -> None:
        try:
            ok = self.store.ping()
        except StateStoreUnavailable as e:
            raise ChangesPausedError(f"state store unreachable; changes are paused: {e}") from e
        if not ok:
            raise ChangesPausedError("state store unreachable; changes are paused")
        if self._needs_recovery:
            self._recover()  # finishes or rolls back what the journal left open
            if self._needs_recovery:
                raise ChangesPausedError(
                    "state store went away while recovering; changes are paused"
                )

    def _fault(self, step: str) -> None:
        """Test/chaos hook: die right after journaling ``step`` when configured to.

        ``once_file`` makes it fire once: Ray restarts the actor with the same
        arguments, and the restarted controller must recover, not crash again.
        """
        if self.fault.get("crash_after") != step:
            return
        once = self.fault.get("once_file")
        if once:
            if os.path.exists(once):
                return
            with open(once, "w") as f:
                f.write(step)
        logger.error("fault injection: controller exits after step %r", step)
        os._exit(1)

    def shutdown(self) -> None:
        """A clean stop: the loops, every worker, then this deployment's stored state.

        The caller kills engines and the controller. The workers are gone, so a
        stored map (and registry, journal, API-set policy) would only mislead the
        next start: it is cleared, and the next start with the same name begins
        fresh from its config. A crash leaves the state for recovery.
        """
        self._stop.set()
        with self.lock:
            self._stop_workers(list(self.registry))
            try:
                self.store.clear()
            except StateStoreUnavailable as e:
                logger.error(
                    "clean stop could not clear the state of deployment %r at %s: %s. "
                    "The next start would find a map of stopped workers: delete the keys "
                    "'elasticmoe:%s:*' in Redis before starting it again",
                    self.config.name,
                    self.store.url,
                    e,
                    self.config.name,
                )
            self.expert_map = None

    # ------------------------------------------------------------ autoscaling
    def set_policy(self, text: str) -> dict[str, Any]:
        """Validate and apply an autoscaling policy (YAML/JSON text); starts the loop."""
        policy = policy_from_text(text)
        try:
            check_policy_pools(self.config, [p.name for p in policy.spec.pools], "(set_policy)")
        except ValueError as e:
            raise ControllerError(str(e)) from None
        try:
            # stored first: a policy set here must outlive a controller restart
            self.store.put_value(_POLICY_KEY, {"text": text})
        except StateStoreUnavailable as e:
            raise ChangesPausedError(
                f"state store unreachable, changes are paused; the policy was not applied: {e}"
            ) from e
        started = self.policy is not None
        self.policy = policy
        if not started:
            threading.Thread(target=self._control_loop, name="autoscaler", daemon=True).start()
        return {"policy": policy.metadata.name, "interval_s": policy.spec.interval_s}

    def _stored_policy(self) -> Policy | None:
        """The policy last set through :meth:`set_policy`, if the store has one."""
        try:
            stored = self.store.get_value(_POLICY_KEY)
        except StateStoreUnavailable as e:
            logger.warning("state store unreachable; using the configured policy: %s", e)
            return None
        if not stored:
            return None
        try:
            policy = policy_from_text(stored["text"])
        except (KeyError, TypeError, ValueError) as e:
            logger.error("stored policy is invalid, using the configured one: %s", e)
            return None
        logger.info("using the policy %r set through the API", policy.metadata.name)
        return policy

    def _replenish_spares(self) -> None:
        """Keep ``spare_workers`` started, empty workers ready for a fast add_worker."""
        with self.lock:
            have = len(self.registry.spares()) + self.registry.num_starting(Lifecycle.SPARE)
            missing = self.config.spare_workers - have
            if missing <= 0 or self._stop.is_set():
                return
            ids = self.registry.new_ids(missing, Lifecycle.SPARE)
        # started outside the lock: a process start takes seconds and must not
        # hold up scaling operations meanwhile
        try:
            self._start_workers({w: [] for w in ids}, spare=True)  # registers them as spares
            if self._stop.is_set():  # a clean stop came meanwhile: leave nothing behind
                with self.lock:
                    self._stop_workers([w for w in ids if w in self.registry])
        except Exception as e:  # best effort, in its own thread: counted, retried next time
            self._loop_failed("spares", e)
        finally:
            with self.lock:
                self.registry.release(ids)

    def _sample_load(self, now: float) -> None:
        totals = self.expert_load()
        self._load_samples.append((now, totals))

    def window_load(self, window_s: float, now: float | None = None) -> dict[LogicalExpert, float]:
        """Tokens per logical expert routed during the last ``window_s`` seconds."""
        now = time.time() if now is None else now
        if not self._load_samples:
            return {}
        latest = self._load_samples[-1][1]
        base: dict[LogicalExpert, float] = {}
        for t, totals in self._load_samples:
            if t >= now - window_s:
                break
            base = totals
        return {e: v - base.get(e, 0.0) for e, v in latest.items()}

    def _latency_p99(self) -> tuple[float | None, float | None]:
        ttft, itl = [], []
        for s in self._engine_stats:
            if s.get("ttft_p99_ms") is not None:
                ttft.append(s["ttft_p99_ms"])
            if s.get("itl_p99_ms") is not None:
                itl.append(s["itl_p99_ms"])
        return (max(ttft) if ttft else None, max(itl) if itl else None)

    def check_workers(self) -> list[str]:
        """Replace workers that failed two health checks in a row.

        The dead worker leaves the map (its sole replicas are restored from the
        checkpoint on live workers), a replacement starts (a spare if ready),
        and every expert is replicated back to its minimum replica count.
        """
        self.probe_health()
        pools = {w: self._pool_of(w) for w in self._map().workers}
        removed = self._remove_dead_workers()
        if removed or not self.redundancy()["full"]:
            self.restore_redundancy(replace_workers=len(removed), pools=[pools[w] for w in removed])
        return removed

    def _remove_dead_workers(self) -> list[str]:
        # A spare that stopped answering (or a registry entry of a worker stopped while the
        # store was down) is forgotten; _replenish_spares starts a new one.
        dead_spares = [w for w in self.registry.spares() if self.registry.misses(w) >= 2]
        if dead_spares:
            logger.warning("spare worker(s) %s are dead; forgetting them", dead_spares)
            with self.lock:
                self._stop_workers(dead_spares)
            threading.Thread(target=self._replenish_spares, daemon=True).start()
        removed = []
        for w in list(self._map().workers):
            if self.registry.misses(w) >= 2 and len(self._map().workers) > 1:
                logger.warning("worker %s is dead; moving its experts", w)
                try:
                    self.remove_worker(w)
                    removed.append(w)
                except ControllerError as e:
                    logger.error("could not replace dead worker %s: %s", w, e)
        return removed

    def autoscale_once(self, now: float | None = None) -> list[dict[str, Any]]:
        """One control-loop tick: observe, decide (pure), carry out the actions."""
        assert self.policy is not None, "no autoscaling policy configured"
        now = time.time() if now is None else now
        self.observe_engines()
        self._sample_load(now)
        with self.lock:
            m = self._map()
            ttft, itl = self._latency_p99()
            observed = ObservedState(
                load=self.window_load(self.policy.spec.window_s, now),
                placement=dict(m.replicas),
                workers=[
                    WorkerState(w, self._pool_of(w), self._slots(w), self._healthy(w))
                    for w in m.workers
                ],
                ttft_p99_ms=ttft,
                itl_p99_ms=itl,
            )
            actions, self.policy_state = decide(self.policy, observed, now, self.policy_state)
            with contextlib.suppress(StateStoreUnavailable):
                self.store.put_value("policy_state", self.policy_state.to_dict())
            results = self.apply([a.to_dict() for a in actions])
        for a, r in zip(actions, results, strict=False):
            logger.info("autoscaler: %s -> %s", a, r.get("result"))
        return results

    def _loop_failed(self, loop: str, error: BaseException, paused: bool = False) -> None:
        """Count an iteration of ``loop`` that raised; the loop goes on with the next.

        A paused change (the store is down) is expected and logged as a warning;
        anything else is a bug or an outage worth a traceback.
        """
        entry = self._loops[loop]
        entry["errors"] += 1
        entry["last_error"] = f"{type(error).__name__}: {error}"
        entry["last_error_at"] = time.time()
        if paused:
            logger.warning("%s loop: changes paused: %s", loop, error)
        else:
            logger.exception("%s loop iteration failed; the loop goes on", loop)

    def _health_tick(self, last_reconcile: float) -> float:
        """One health-loop iteration; returns when slots were last reconciled."""
        try:
            self.observe_engines()
        except Exception as e:  # counted and logged; worker health must be checked anyway
            self._loop_failed("health", e)
        if self._needs_recovery:
            try:
                with self.lock:  # a change left open by a store outage is finished here
                    self._check_store()
            except ChangesPausedError as e:  # still down: health is checked all the same
                self._loop_failed("health", e, paused=True)
        if self.expert_map is not None:
            self.check_workers()
            if time.monotonic() - last_reconcile > 30:
                last_reconcile = time.monotonic()
                with self.lock:  # no operation is half-done while it is held
                    self._reconcile_slots()
        return last_reconcile

    def _health_loop(self) -> None:
        """Always on: replace dead workers, whether or not a policy is set; finish a change a
        store outage left open; every 30 s, free slots no map lists (a load that finished
        after its operation was rolled back). An iteration that raises is counted in
        ``status()["loops"]`` and logged; the loop never dies of it."""
        last_reconcile = time.monotonic()
        while not self._stop.wait(self.config.health_check_s):
            self._loops["health"]["iterations"] += 1
            try:
                last_reconcile = self._health_tick(last_reconcile)
            except ChangesPausedError as e:
                self._loop_failed("health", e, paused=True)
            except Exception as e:  # the loop must survive any one iteration
                self._loop_failed("health", e)

    def _control_loop(self) -> None:
        """The autoscaler: one :meth:`autoscale_once` per policy interval, for good."""
        while self.policy is not None and not self._stop.wait(self.policy.spec.interval_s):
            self._loops["autoscaler"]["iterations"] += 1
            try:
                if self.expert_map is not None:
                    self.autoscale_once()
            except ChangesPausedError as e:
                self._loop_failed("autoscaler", e, paused=True)
            except Exception as e:  # the loop must survive any one iteration
                self._loop_failed("autoscaler", e)
