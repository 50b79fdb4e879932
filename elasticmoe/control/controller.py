"""The controller: sole owner of the expert map; runs zero-downtime changes.

Every change (replicate, evict, migrate, add/remove worker, restore) goes
through :meth:`Controller._change`, which follows DESIGN.md's protocol:

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

import grpc

from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc
from elasticmoe.autoscale.decide import ObservedState, PolicyState, WorkerState, decide
from elasticmoe.autoscale.policy import load_policy, policy_from_text
from elasticmoe.control.actions import Action
from elasticmoe.control.deployment_config import DeploymentConfig
from elasticmoe.control.placement import initial_placement
from elasticmoe.control.state import StateStore, StateStoreUnavailable, make_state_store
from elasticmoe.experts.weights import LogicalExpert
from elasticmoe.model.config import load_config
from elasticmoe.router.expert_map import ExpertMap
from elasticmoe.router.router import GRPC_OPTIONS

logger = logging.getLogger(__name__)

NAMESPACE = "elasticmoe"
CONTROLLER_NAME = "elasticmoe-controller"
ENGINE_PREFIX = "elasticmoe-engine-"
WORKER_PREFIX = "elasticmoe-worker-"


def worker_actor_name(deployment: str, worker_id: str) -> str:
    """Ray actor name of a deployment's expert worker."""
    return f"{WORKER_PREFIX}{deployment}-{worker_id}"


class ControllerError(RuntimeError):
    """A scaling request cannot be carried out (the message says why)."""


class ChangesPausedError(ControllerError):
    """The state store is unreachable: serving goes on, changes wait for it."""


def parse_expert(text: str | LogicalExpert | tuple) -> LogicalExpert:
    """``"3:5"`` (layer:expert) or a tuple -> :class:`LogicalExpert`."""
    if isinstance(text, tuple):
        return LogicalExpert(int(text[0]), int(text[1]))
    try:
        layer, expert = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise ControllerError(f"expert {text!r}: expected 'layer:expert', e.g. '0:3'") from None
    return LogicalExpert(layer, expert)


class Controller:
    """Owns the expert map and the worker registry (run as a named Ray actor)."""

    def __init__(self, config: dict[str, Any], fault: dict[str, Any] | None = None) -> None:
        self.config = DeploymentConfig(**config)
        self.fault = fault or {}
        self.model = load_config(self.config.model)
        self.store: StateStore = make_state_store(self.config.state_store, self.config.name)
        self.lock = threading.RLock()
        self.expert_map: ExpertMap | None = None
        self.workers: dict[str, dict[str, Any]] = {}  # worker id -> registry entry
        self.checksums: dict[LogicalExpert, str] = {}
        self._stubs: dict[str, tuple[str, Any]] = {}
        self._next_worker = 0
        self.history: list[dict[str, Any]] = []  # finished operations, newest last
        self._needs_recovery = False
        self.spares: list[str] = []  # started, empty workers outside the map
        self._spares_starting = 0
        self._workers_starting = 0
        self._op_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._op_seconds: collections.Counter[tuple[str, str]] = collections.Counter()
        self._load_samples: collections.deque[tuple[float, dict[LogicalExpert, float]]] = (
            collections.deque(maxlen=4096)
        )
        self._unhealthy: dict[str, int] = {}  # worker -> consecutive failed health checks
        self._stop = threading.Event()
        self.instance = uuid.uuid4().hex  # changes when Ray restarts the actor
        self._recover()
        self.policy = load_policy(self.config.policy) if self.config.policy else None
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
        """Load the map and registry; finish or roll back half-done operations."""
        try:
            stored = self.store.get_map()
            self.workers = self.store.get_workers()
        except StateStoreUnavailable:
            logger.warning("state store unreachable; recovering once it is back")
            self._needs_recovery = True
            return
        if stored is not None:
            self.expert_map = ExpertMap.from_dict(stored)
        elif self.store.is_memory:
            self._adopt()
        self._next_worker = self._first_free_worker_id()
        in_map = set(self.expert_map.workers) if self.expert_map else set()
        self.spares = sorted(
            w for w, e in self.workers.items() if e.get("spare") and w not in in_map
        )
        for op_id in self.store.open_operations():
            self._resume(op_id)
        if self.expert_map is not None:
            self._reconcile_slots()

    def _register(self, worker_id: str, info: dict[str, Any], spare: bool) -> None:
        """Record a started worker (its ``ExpertWorker.info()``) in the registry and store."""
        entry = {
            "address": info["address"],
            "node_id": info.get("node_id"),
            "node_ip": info.get("node_ip"),
            "num_slots": info["num_slots"],
            "pool": self.config.pool,
            "actor": worker_actor_name(self.config.name, worker_id),
            "started": time.time(),
            "spare": spare,
        }
        self.workers[worker_id] = entry
        self.store.put_worker(worker_id, entry)

    def _first_free_worker_id(self) -> int:
        ids = [int(w[1:]) for w in self.workers if w[1:].isdigit()]
        return max(ids, default=-1) + 1

    def _adopt(self) -> None:
        """After a restart that lost the in-memory store: take over what still runs.

        Engines hold the newest expert map; the detached worker actors hold the
        weights. Workers outside that map become spares; an operation that was
        half-done when the old controller died leaves orphan slots, which
        :meth:`_reconcile_slots` frees. (A Redis store keeps the journal and
        does better: it finishes or rolls back that operation.)
        """
        import ray

        maps = []
        for engine in self._engines():
            try:
                current = ray.get(engine.current_map.remote(), timeout=30)
            except Exception as e:  # a dead engine knows nothing
                logger.info("engine did not answer while adopting: %s", e)
                continue
            if current:
                maps.append(current)
        if not maps:
            return  # a first start: bootstrap() publishes epoch 1
        newest = ExpertMap.from_dict(max(maps, key=lambda d: d["epoch"]))
        prefix = worker_actor_name(self.config.name, "")
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry.get("namespace") != NAMESPACE or not entry["name"].startswith(prefix):
                continue
            wid = entry["name"][len(prefix) :]
            try:
                info = ray.get(
                    ray.get_actor(entry["name"], namespace=NAMESPACE).info.remote(), timeout=30
                )
            except Exception as e:
                logger.warning("worker %s did not answer while adopting: %s", wid, e)
                continue
            self._register(wid, info, spare=wid not in newest.workers)
        self._next_worker = self._first_free_worker_id()
        self.spares = sorted(w for w in self.workers if w not in newest.workers)
        self.store.put_map(newest.to_dict(), expected_epoch=None)
        self.expert_map = newest
        logger.warning(
            "state store was empty after a restart: adopted expert map epoch %d and %d workers",
            newest.epoch,
            len(self.workers),
        )
        self.history.append({"kind": "adopt", "result": "done", "epoch": newest.epoch})

    def _resume(self, op_id: str) -> None:
        entries = self.store.journal_entries(op_id)
        begin = next(e["data"] for e in entries if e["step"] == "begin")
        steps = [e["step"] for e in entries]
        adds = [(parse_expert(e), w) for e, w in begin["add"]]
        removes = [(parse_expert(e), w) for e, w in begin["remove"]]
        published = "published" in steps or (
            self.expert_map is not None and self.expert_map.epoch > begin["epoch"]
        )
        if published:
            logger.info("resuming operation %s (%s): finishing", op_id, begin["kind"])
            self._drain(begin["epoch"])
            self._unload(removes)
            self._stop_workers(begin.get("remove_workers", []))
            self.store.journal_append(op_id, "done", {"recovered": True})
            self.store.journal_finish(op_id, "done")
        else:
            logger.info("resuming operation %s (%s): rolling back", op_id, begin["kind"])
            self._unload(adds)
            self._stop_workers(begin.get("add_workers", []))
            self.store.journal_finish(op_id, "rolled_back")
        self.history.append(
            {
                "op_id": op_id,
                "kind": begin["kind"],
                "result": "done" if published else "rolled_back",
                "recovered": True,
            }
        )

    def _reconcile_slots(self) -> None:
        """Unload replicas a worker holds that the map does not list (orphans)."""
        assert self.expert_map is not None
        for worker in list(self.expert_map.workers):
            try:
                held = {
                    LogicalExpert(i.layer, i.expert): i.checksum
                    for i in self._stub(worker).Stats(expert_pb2.StatsRequest(), timeout=5).experts
                }
            except grpc.RpcError as e:
                logger.warning("worker %s unreachable while reconciling: %s", worker, e.details())
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
            if self.expert_map is not None:
                return self.expert_map.to_dict()
            self._check_store()
            c = self.config
            counts = c.replica_counts(self.all_experts)
            worker_ids = [self._new_worker_id() for _ in range(c.num_workers)]
            placement = initial_placement(
                self.all_experts, worker_ids, c.num_slots(len(self.all_experts)), counts
            )
            addresses = self._start_workers(
                {w: [e for e, ws in placement.items() if w in ws] for w in worker_ids}
            )
            new_map = ExpertMap(1, placement, addresses)
            if not self.store.put_map(new_map.to_dict(), expected_epoch=None):
                raise ControllerError("another controller already published an expert map")
            self.expert_map = new_map
            self.store.publish_epoch(1)
            self._replenish_spares()
            return new_map.to_dict()

    def _new_worker_id(self) -> str:
        worker_id = f"w{self._next_worker}"
        self._next_worker += 1
        return worker_id

    def _start_workers(
        self, experts_by_worker: dict[str, list[LogicalExpert]], spare: bool = False
    ) -> dict[str, str]:
        """Start worker actors (detached: they outlive a controller restart)."""
        import ray

        from elasticmoe.experts.worker import ExpertWorker

        c = self.config
        resources = dict(c.worker_resources)
        if c.device == "npu":
            resources.setdefault("NPU", 1)
        cls = ExpertWorker.remote_class(
            num_cpus=c.worker_num_cpus,
            num_gpus=c.worker_num_gpus or (1 if c.device == "cuda" else 0),
            resources=resources,
        )
        num_slots = c.num_slots(len(self.all_experts))
        handles = {}
        for wid in experts_by_worker:
            handles[wid] = cls.options(
                name=worker_actor_name(c.name, wid),
                namespace=NAMESPACE,
                lifetime="detached",
                # one node's loss takes as few replicas as possible
                scheduling_strategy="SPREAD",
                runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
            ).remote(
                wid,
                c.model,
                num_slots,
                device=c.device,
                dtype=c.resolved_dtype(self.model),
                num_threads=c.worker_threads,
                port=c.worker_grpc_port,
                fault_injection=c.fault_injection,
            )
        refs = {
            handles[w].start.remote([tuple(e) for e in es]): w
            for w, es in experts_by_worker.items()
        }
        addresses = {}
        try:
            for ref, wid in refs.items():
                info = ray.get(ref, timeout=c.worker_start_timeout_s)
                addresses[wid] = info["address"]
                for slot in info["slots"]:
                    if slot:
                        self.checksums.setdefault(
                            LogicalExpert(slot["layer"], slot["expert"]), slot["checksum"]
                        )
                self._register(wid, info, spare)
        except BaseException:
            for wid, handle in handles.items():
                ray.kill(handle)
                self.workers.pop(wid, None)
            raise
        return addresses

    # --------------------------------------------------------------- queries
    def dtype(self) -> str:
        """The dtype workers and engines run in."""
        return self.config.resolved_dtype(self.model)

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
        for wid, entry in sorted(self.workers.items()):
            experts = m.experts_on(wid) if m else ()
            workers.append(
                {
                    "worker_id": wid,
                    "address": entry.get("address"),
                    "pool": entry.get("pool"),
                    "num_slots": entry.get("num_slots"),
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
            "num_engines": len(self._engines()),
            "spare_workers": list(self.spares),
            "operations": [
                {"kind": k, "result": r, "count": n, "seconds": round(self._op_seconds[k, r], 3)}
                for (k, r), n in sorted(self._op_counts.items())
            ],
            "redundancy": self.redundancy(),
            "autoscaler": self.policy.metadata.name if self.policy else None,
            "history": self.history[-20:],
        }

    def _healthy(self, worker: str) -> bool:
        try:
            self._stub(worker).Health(expert_pb2.HealthRequest(), timeout=1)
            return True
        except (grpc.RpcError, KeyError):
            return False

    def expert_load(self) -> dict[LogicalExpert, float]:
        """Tokens routed to each logical expert so far, summed over engines."""
        import ray

        totals: dict[LogicalExpert, float] = {}
        engines = self._engines()
        stats = []
        for engine in engines:
            try:
                stats.append(ray.get(engine.stats.remote(), timeout=5))
            except Exception as e:  # a dead engine has no load to report
                logger.info("engine stats failed: %s", e)
        for s in stats:
            for row, layer in enumerate(self.model.moe_layers):
                for e, v in enumerate(s["expert_load"][row]):
                    key = LogicalExpert(layer, e)
                    totals[key] = totals.get(key, 0.0) + float(v)
        return totals

    # ------------------------------------------------------------ operations
    def replicate(self, expert: str, target: str | None = None) -> dict[str, Any]:
        """Add a replica of ``expert`` on ``target`` (default: least-used worker without it)."""
        e = parse_expert(expert)
        with self.lock:
            m = self._map()
            self._check_expert(e)
            target = target or self._pick_target(e)
            if target in m.replicas_of(e):
                raise ControllerError(f"worker {target} already holds expert {e}")
            return self._change("replicate", add=[(e, target)])

    def evict(self, expert: str, worker: str) -> dict[str, Any]:
        """Drop the replica of ``expert`` on ``worker`` (never the last one)."""
        e = parse_expert(expert)
        with self.lock:
            m = self._map()
            if worker not in m.replicas_of(e):
                raise ControllerError(f"worker {worker} holds no replica of expert {e}")
            if len(m.replicas_of(e)) <= 1:
                raise ControllerError(
                    f"expert {e} has one replica; evicting it would lose the expert"
                )
            return self._change("evict", remove=[(e, worker)])

    def migrate(self, expert: str, source: str, target: str | None = None) -> dict[str, Any]:
        """Move the replica of ``expert`` from ``source`` to ``target``."""
        e = parse_expert(expert)
        with self.lock:
            m = self._map()
            if source not in m.replicas_of(e):
                raise ControllerError(f"worker {source} holds no replica of expert {e}")
            target = target or self._pick_target(e)
            if target in m.replicas_of(e):
                raise ControllerError(f"worker {target} already holds expert {e}")
            return self._change("migrate", add=[(e, target)], remove=[(e, source)])

    def scale(self, expert: str, replicas: int) -> list[dict[str, Any]]:
        """Bring ``expert`` to exactly ``replicas`` replicas (replicate or evict)."""
        e = parse_expert(expert)
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

    def add_worker(self, count: int = 1) -> dict[str, Any]:
        """Start ``count`` empty workers and add them to the map."""
        with self.lock:
            m = self._map()
            c = self.config
            if len(m.workers) + count > c.max_workers:
                raise ControllerError(
                    f"adding {count} worker(s) would exceed max_workers={c.max_workers}"
                )
            ids = [self.spares.pop(0) for _ in range(min(count, len(self.spares)))]
            ids += [self._new_worker_id() for _ in range(count - len(ids))]
            self._workers_starting += count
            try:
                return self._change("add_worker", add_workers=ids)
            finally:
                self._workers_starting -= count
                threading.Thread(target=self._replenish_spares, daemon=True).start()

    def remove_worker(self, worker: str, keep_off: Iterable[str] = ()) -> dict[str, Any]:
        """Move every replica off ``worker``, then stop it.

        Replicas that must move go to live workers not in ``keep_off`` (workers
        about to be drained too).
        """
        with self.lock:
            m = self._map()
            if worker not in m.workers:
                raise ControllerError(f"no worker {worker!r}; workers: {sorted(m.workers)}")
            if len(m.workers) <= 1:
                raise ControllerError("cannot remove the last worker")
            adds, removes = [], []
            planned: dict[str, int] = {}
            exclude = {worker, *keep_off}
            for e in m.experts_on(worker):
                removes.append((e, worker))
                live = [w for w in m.replicas_of(e) if w not in exclude]
                if not live:  # no copy stays: move it
                    target = self._pick_target(e, exclude=exclude, planned=planned)
                    planned[target] = planned.get(target, 0) + 1
                    adds.append((e, target))
            return self._change("remove_worker", add=adds, remove=removes, remove_workers=[worker])

    def drain(self, workers: Iterable[str] = (), nodes: Iterable[str] = ()) -> dict[str, Any]:
        """Move every replica off these workers (and the workers on these nodes), then stop them.

        A node is named by its Ray node id or IP. Used before a Kubernetes
        worker group shrinks: the pods go only after their experts moved.
        """
        with self.lock:
            m = self._map()
            nodes = set(nodes)
            wanted = set(workers)
            unknown = sorted(w for w in wanted if w not in m.workers and w not in self.spares)
            if unknown:
                raise ControllerError(f"no worker(s) {unknown}; workers: {sorted(m.workers)}")
            for w, entry in self.workers.items():
                if nodes & {entry.get("node_id"), entry.get("node_ip")}:
                    wanted.add(w)
            spares = sorted(w for w in wanted if w in self.spares)
            active = sorted(w for w in wanted if w in m.workers)
            if active and len(active) >= len(m.workers):
                raise ControllerError(
                    f"draining {active} would leave no worker; add workers elsewhere first"
                )
            drained = []
            for w in active:
                self.remove_worker(w, keep_off=set(active) - set(drained) - {w})
                drained.append(w)
            for w in spares:
                self.spares.remove(w)
            self._stop_workers(spares)
            return {"drained": drained + spares, "epoch": self._map().epoch}

    def demand(self) -> dict[str, Any]:
        """Workers per pool now and wanted (the Kubernetes operator sizes node groups by it).

        Lock-free on purpose: an ``add_worker`` waiting for a node holds the lock,
        and the operator must read this demand to create that node.
        """
        m = self.expert_map
        in_map = list(m.workers) if m else []
        workers = [
            {
                "worker_id": w,
                "pool": self.workers.get(w, {}).get("pool", self.config.pool),
                "node": self.workers.get(w, {}).get("node_ip"),
                "node_id": self.workers.get(w, {}).get("node_id"),
                "spare": w in self.spares,
                "healthy": self._unhealthy.get(w, 0) == 0,
            }
            for w in [*in_map, *self.spares]
        ]
        pools: dict[str, dict[str, int]] = {}
        for entry in workers:
            pool = pools.setdefault(entry["pool"], {"workers": 0, "desired": 0})
            pool["workers"] += 1
        own = pools.setdefault(self.config.pool, {"workers": 0, "desired": 0})
        own["desired"] = max(
            own["workers"] + self._spares_starting + self._workers_starting,
            self.config.spare_workers + (self.policy_min_workers() or 1),
        )
        for name, pool in pools.items():
            if name != self.config.pool:
                pool["desired"] = pool["workers"]
        return {"epoch": m.epoch if m else None, "pools": pools, "workers": workers}

    def policy_min_workers(self) -> int | None:
        """The policy's floor for this deployment's pool (None without a policy)."""
        if self.policy is None:
            return None
        for pool in self.policy.spec.pools:
            if pool.name == self.config.pool:
                return pool.min_workers
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
        dead = {w for w in m.workers if not self._healthy(w)} if probe else set()
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

    def restore_redundancy(self, replace_workers: int = 0) -> list[dict[str, Any]]:
        """Start ``replace_workers`` workers (within max_workers), then replicate every expert
        below its minimum replica count (after a worker died)."""
        results = []
        with self.lock:
            room = self.config.max_workers - len(self._map().workers)
            count = min(replace_workers, room)
            if count > 0:
                results.append(self.add_worker(count))
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
        e = parse_expert(expert)
        with self.lock:
            if self._map().replicas_of(e):
                raise ControllerError(f"expert {e} still has replicas; use replicate")
            return self._change("restore", add=[(e, self._pick_target(e))])

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
                    results.append(self.add_worker(a.count))
                elif a.kind == "remove_worker":
                    results.append(self.remove_worker(a.source))
                elif a.kind == "restore":
                    results.append(self.restore(str(a.expert)))
            except ControllerError as err:
                results.append({"kind": a.kind, "result": "rejected", "error": str(err)})
        return results

    # ------------------------------------------------------- the protocol
    def _change(
        self,
        kind: str,
        add: list[tuple[LogicalExpert, str]] = (),
        remove: list[tuple[LogicalExpert, str]] = (),
        add_workers: list[str] = (),
        remove_workers: list[str] = (),
    ) -> dict[str, Any]:
        """Run one zero-downtime change; see the module docstring."""
        self._check_store()
        m = self._map()
        op_id = f"{kind}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        self.store.journal_append(
            op_id,
            "begin",
            {
                "kind": kind,
                "epoch": m.epoch,
                "add": [[str(e), w] for e, w in add],
                "remove": [[str(e), w] for e, w in remove],
                "add_workers": list(add_workers),
                "remove_workers": list(remove_workers),
            },
        )
        self._fault("begin")
        loaded: list[tuple[LogicalExpert, str]] = []
        try:
            workers = dict(m.workers)
            warm = {w: self.workers[w]["address"] for w in add_workers if w in self.workers}
            workers.update(warm)
            cold = [w for w in add_workers if w not in warm]
            if cold:
                workers.update(self._start_workers({w: [] for w in cold}))
            for expert, worker in add:
                self._load(expert, worker, workers, exclude=[w for e2, w in remove if e2 == expert])
                loaded.append((expert, worker))
            self.store.journal_append(op_id, "loaded", {})
            self._fault("loaded")
            for w in remove_workers:
                workers.pop(w, None)
            new_map = m.with_changes(add=add, remove=remove, workers=workers)
            if new_map.missing(self.all_experts):
                raise ControllerError(
                    f"change would leave experts without a replica: "
                    f"{[str(e) for e in new_map.missing(self.all_experts)][:8]}"
                )
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
            # if the store is down, a restarted controller rolls it back from the journal
            with contextlib.suppress(StateStoreUnavailable):
                self.store.journal_finish(op_id, "rolled_back")
            self.history.append(
                {"op_id": op_id, "kind": kind, "result": "rolled_back", "error": str(e)}
            )
            self._op_counts[kind, "rolled_back"] += 1
            self._op_seconds[kind, "rolled_back"] += time.monotonic() - started
            if isinstance(e, StateStoreUnavailable):
                raise ChangesPausedError(f"state store unreachable, change rolled back: {e}") from e
            raise
        self.expert_map = new_map
        self._push(new_map)
        self.store.journal_append(op_id, "published", {"epoch": new_map.epoch})
        self._fault("published")
        self._drain(m.epoch)
        self._unload(remove)
        self._stop_workers(remove_workers)
        for w in add_workers:
            if self.workers.get(w, {}).get("spare"):
                self.workers[w]["spare"] = False
                self.store.put_worker(w, self.workers[w])
        self.store.journal_append(op_id, "done", {})
        self.store.journal_finish(op_id, "done")
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
        self.history.append(result)
        self._op_counts[kind, "done"] += 1
        self._op_seconds[kind, "done"] += result["seconds"]
        return result

    def _load(
        self,
        expert: LogicalExpert,
        worker: str,
        workers: dict[str, str],
        exclude: Iterable[str] = (),
    ) -> None:
        """Load a replica peer-to-peer from a live replica (else the checkpoint); verify it."""
        m = self._map()
        peers = [w for w in m.replicas_of(expert) if w != worker and self._healthy(w)]
        peers.sort(key=lambda w: w in set(exclude))  # a replica that stays is the best source
        sources = [workers[p] for p in peers] + ["checkpoint"]
        last_error = None
        for source in sources:
            try:
                resp = self._stub(worker, workers.get(worker)).LoadExperts(
                    expert_pb2.LoadExpertsRequest(
                        experts=[expert_pb2.ExpertRef(layer=expert.layer, expert=expert.expert)],
                        source=source,
                    ),
                    timeout=self.config.rpc_timeout_s,
                )
            except grpc.RpcError as e:
                last_error = f"{e.code().name}: {e.details()}"
                logger.warning(
                    "loading %s on %s from %s failed: %s", expert, worker, source, last_error
                )
                continue
            checksum = resp.experts[0].checksum
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
                self._stub(worker).UnloadExperts(
                    expert_pb2.UnloadExpertsRequest(
                        experts=[
                            expert_pb2.ExpertRef(layer=e.layer, expert=e.expert) for e in experts
                        ]
                    ),
                    timeout=self.config.rpc_timeout_s,
                )
            except (grpc.RpcError, KeyError) as e:  # a dead worker holds nothing anyway
                logger.info("unload on %s skipped: %s", worker, e)

    def _stop_workers(self, worker_ids: Iterable[str]) -> None:
        import ray

        for wid in worker_ids:
            with contextlib.suppress(ValueError):  # already gone
                ray.kill(
                    ray.get_actor(worker_actor_name(self.config.name, wid), namespace=NAMESPACE)
                )
            self.workers.pop(wid, None)
            self._stubs.pop(wid, None)
            try:
                self.store.delete_worker(wid)
            except StateStoreUnavailable:
                logger.warning("could not drop %s from the registry (store down)", wid)

    def _push(self, new_map: ExpertMap) -> None:
        """Push the new map to every engine and announce the epoch."""
        import ray

        refs = [e.update_map.remote(new_map.to_dict()) for e in self._engines()]
        for ref in refs:
            try:
                ray.get(ref, timeout=10)
            except Exception as e:  # a dead or slow engine pulls the map later
                logger.warning("pushing epoch %d failed: %s", new_map.epoch, e)
        try:
            self.store.publish_epoch(new_map.epoch)
        except StateStoreUnavailable as e:
            logger.warning("could not announce epoch %d: %s", new_map.epoch, e)

    def _drain(self, old_epoch: int) -> None:
        """Wait until no engine runs a step on an epoch <= ``old_epoch``."""
        import ray

        deadline = time.monotonic() + self.config.drain_timeout_s
        engines = self._engines()
        while engines and time.monotonic() < deadline:
            still = []
            for engine in engines:
                try:
                    active = ray.get(engine.active_epoch.remote(), timeout=5)
                except Exception:
                    continue  # a dead engine runs nothing
                if active is not None and active <= old_epoch:
                    still.append(engine)
            engines = still
            if engines:
                time.sleep(0.01)
        if engines:
            logger.warning("drain of epoch %d timed out; freeing anyway", old_epoch)

    # --------------------------------------------------------------- helpers
    def _engines(self) -> list[Any]:
        import ray

        handles = []
        for name in ray.util.list_named_actors(all_namespaces=True):
            if isinstance(name, dict):
                if name.get("namespace") != NAMESPACE:
                    continue
                name = name["name"]
            if name.startswith(ENGINE_PREFIX + self.config.name + "-"):
                with contextlib.suppress(ValueError):  # died since listed
                    handles.append(ray.get_actor(name, namespace=NAMESPACE))
        return handles

    def _stub(self, worker: str, address: str | None = None) -> Any:
        address = (
            address
            or (self.expert_map.workers.get(worker) if self.expert_map else None)
            or self.workers.get(worker, {}).get("address")
        )
        if address is None:
            raise KeyError(worker)
        cached = self._stubs.get(worker)
        if cached is None or cached[0] != address:
            channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
            cached = (address, expert_pb2_grpc.ExpertServiceStub(channel))
            self._stubs[worker] = cached
        return cached[1]

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
            self._needs_recovery = False
            self._recover()

    def _pick_target(
        self,
        e: LogicalExpert,
        exclude: set[str] = frozenset(),
        planned: dict[str, int] | None = None,
    ) -> str:
        """The worker with the most free slots that does not hold ``e``."""
        m = self._map()
        planned = planned or {}
        candidates = []
        for w in m.workers:
            if w in exclude or w in m.replicas_of(e) or not self._healthy(w):
                continue
            used = len(m.experts_on(w)) + planned.get(w, 0)
            slots = self.workers.get(w, {}).get("num_slots", 0)
            if used < slots:
                candidates.append((used - slots, w))
        if not candidates:
            raise ControllerError(f"no worker has a free slot for expert {e}; add a worker")
        return min(candidates)[1]

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
        """Stop the control loop and every worker (the caller kills engines and the controller)."""
        self._stop.set()
        with self.lock:
            self._stop_workers(list(self.workers))
            self.spares = []

    # ------------------------------------------------------------ autoscaling
    def set_policy(self, text: str) -> dict[str, Any]:
        """Validate and apply an autoscaling policy (YAML/JSON text); starts the loop."""
        policy = policy_from_text(text)
        pools = [p.name for p in policy.spec.pools]
        if self.config.pool not in pools:
            raise ControllerError(
                f"policy pools {pools} do not include this deployment's pool {self.config.pool!r}"
            )
        started = self.policy is not None
        self.policy = policy
        if not started:
            threading.Thread(target=self._control_loop, name="autoscaler", daemon=True).start()
        return {"policy": policy.metadata.name, "interval_s": policy.spec.interval_s}

    def _replenish_spares(self) -> None:
        """Keep ``spare_workers`` started, empty workers ready for a fast add_worker."""
        with self.lock:
            missing = self.config.spare_workers - len(self.spares) - self._spares_starting
            if missing <= 0 or self._stop.is_set():
                return
            ids = [self._new_worker_id() for _ in range(missing)]
            self._spares_starting += len(ids)
        # started outside the lock: a process start takes seconds and must not
        # hold up scaling operations meanwhile
        try:
            self._start_workers({w: [] for w in ids}, spare=True)
        except Exception as e:
            logger.warning("starting spare workers failed: %s", e)
            return
        finally:
            with self.lock:
                self._spares_starting -= len(ids)
        with self.lock:
            self.spares.extend(ids)

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
        import ray

        ttft, itl = [], []
        for engine in self._engines():
            try:
                s = ray.get(engine.stats.remote(), timeout=5)
            except Exception:
                continue
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
        removed = self._remove_dead_workers()
        if removed or not self.redundancy()["full"]:
            self.restore_redundancy(replace_workers=len(removed))
        return removed

    def _remove_dead_workers(self) -> list[str]:
        removed = []
        for w in list(self._map().workers):
            if self._healthy(w):
                self._unhealthy.pop(w, None)
                continue
            self._unhealthy[w] = self._unhealthy.get(w, 0) + 1
            if self._unhealthy[w] >= 2 and len(self._map().workers) > 1:
                logger.warning("worker %s is dead; moving its experts", w)
                try:
                    self.remove_worker(w)
                    removed.append(w)
                    self._unhealthy.pop(w, None)
                except ControllerError as e:
                    logger.error("could not replace dead worker %s: %s", w, e)
        return removed

    def autoscale_once(self, now: float | None = None) -> list[dict[str, Any]]:
        """One control-loop tick: observe, decide (pure), carry out the actions."""
        assert self.policy is not None, "no autoscaling policy configured"
        now = time.time() if now is None else now
        self._sample_load(now)
        with self.lock:
            m = self._map()
            ttft, itl = self._latency_p99()
            observed = ObservedState(
                load=self.window_load(self.policy.spec.window_s, now),
                placement=dict(m.replicas),
                workers=[
                    WorkerState(
                        w,
                        self.workers.get(w, {}).get("pool", self.config.pool),
                        self.workers.get(w, {}).get("num_slots", 0),
                        self._healthy(w),
                    )
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

    def _health_loop(self) -> None:
        """Always on: replace dead workers, whether or not a policy is set; every 30 s,
        free slots no map lists (a load that finished after its operation was rolled back)."""
        last_reconcile = time.monotonic()
        while not self._stop.wait(self.config.health_check_s):
            try:
                if self.expert_map is not None:
                    self.check_workers()
                    if time.monotonic() - last_reconcile > 30:
                        last_reconcile = time.monotonic()
                        with self.lock:  # no operation is half-done while it is held
                            self._reconcile_slots()
            except ChangesPausedError as e:
                logger.warning("worker replacement paused: %s", e)
            except Exception:
                logger.exception("health check failed")

    def _control_loop(self) -> None:
        assert self.policy is not None
        while not self._stop.wait(self.policy.spec.interval_s):
            try:
                if self.expert_map is None:
                    continue
                self.autoscale_once()
            except ChangesPausedError as e:
                logger.warning("autoscaler paused: %s", e)
            except Exception:
                logger.exception("autoscaler tick failed")
