"""The one interface between the controller and the processes it runs.

The controller decides (with :mod:`elasticmoe.core`) and journals; everything
it does to other processes goes through a :class:`Cluster`:

- expert workers as processes: start, stop, list the ones still running;
- expert workers over gRPC: health, which replicas they hold, load, unload;
- engines: push a map, read their maps, active epochs and stats.

:class:`RayCluster` is the real one (Ray actors, gRPC to the workers).
:class:`FakeCluster` keeps the same state in memory, for tests of the
controller without Ray and for anything that wants a cluster without processes.
Names of the Ray actors live here too, since only this module creates them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from unittest import mock

from elasticmoe.core.experts import LogicalExpert

logger = logging.getLogger(__name__)
T = TypeVar("T")

NAMESPACE = "elasticmoe"
CONTROLLER_NAME = "elasticmoe-controller"
ENGINE_PREFIX = "elasticmoe-engine-"


def worker_actor_name(deployment: str, worker_id: str) -> str:
    """The detached Ray actor name of one expert worker."""
    return f"elasticmoe-worker-{deployment}-{worker_id}"


def start_local_ray(attempts: int = 3, **init_kwargs: Any) -> None:
    """``ray.init(address="local", **init_kwargs)``: a new Ray instance on this machine,
    its start retried as :func:`retry_ray_start` says."""
    import ray

    retry_ray_start(
        lambda: ray.init(address="local", **init_kwargs), "Ray", attempts, undo=ray.shutdown
    )


def retry_ray_start(
    start: Callable[[], T],
    what: str,
    attempts: int = 3,
    undo: Callable[[], object] | None = None,
) -> T:
    """``start()``, tried again (up to ``attempts`` times in all, ``undo()`` before each
    retry) when it failed while one of Ray's nodes came up (see :func:`ray_node_starts`);
    any other error (bad arguments) is raised at once."""
    for attempt in range(1, attempts + 1):
        with ray_node_starts() as failed_starts:
            try:
                return start()
            except Exception as e:
                if not failed_starts or attempt == attempts:
                    raise
                logger.warning("%s did not start (try %d of %d): %s", what, attempt, attempts, e)
        if undo is not None:
            undo()
    raise ValueError(f"attempts={attempts}: must be at least 1")


@contextlib.contextmanager
def ray_node_starts() -> Iterator[list[BaseException]]:
    """Within this block, a Ray node that fails to start stops the processes it started;
    the block's list gathers those failures.

    Ray gives a new node's raylet a fixed 30 s to register with the GCS, and the GCS a
    bounded time to come up; on a loaded machine either can run out. The failed start
    would leave its GCS and raylet running: ``ray.init`` and ``Cluster.add_node`` drop
    the half-built node, so ``ray.shutdown`` and ``Cluster.shutdown`` cannot reach them.
    """
    from ray._private import node as ray_node

    failures: list[BaseException] = []

    class _NodeThatCleansUp(ray_node.Node):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                super().__init__(*args, **kwargs)
            except BaseException as e:
                failures.append(e)
                # the start's own error is the one to raise, whatever the clean-up meets
                with contextlib.suppress(Exception):
                    self.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
                raise

    with mock.patch.object(ray_node, "Node", _NodeThatCleansUp):
        yield failures


class ClusterError(RuntimeError):
    """A call to a worker or engine failed (the message says which and why)."""


@dataclass(frozen=True)
class WorkerLaunch:
    """How to start expert workers (from the deployment config)."""

    deployment: str
    model: str
    num_slots: int
    device: str = "cpu"
    dtype: str = "float32"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)
    num_threads: int | None = None
    port: int = 0  # every worker's gRPC port; 0: any free one
    fault_injection: bool = False
    start_timeout_s: float = 120.0
    # loads, copies and the process start-up run below serving (elasticmoe.experts.priority)
    background_priority: str = "idle"


class Cluster(Protocol):
    """What the controller may do to other processes."""

    # -- workers as processes
    def start_workers(
        self, launch: WorkerLaunch, experts_by_worker: Mapping[str, Sequence[LogicalExpert]]
    ) -> dict[str, dict[str, Any]]:
        """Start workers holding these experts; ``ExpertWorker.info()`` per worker.

        All or nothing: on any failure every worker of the call is stopped and
        the error is raised.
        """
        ...

    def stop_worker(self, deployment: str, worker_id: str) -> None:
        """Stop a worker (no error if it is gone)."""
        ...

    def running_workers(self, deployment: str) -> dict[str, dict[str, Any]]:
        """``info()`` of every worker process of ``deployment`` that answers."""
        ...

    # -- workers over gRPC
    def healthy(self, worker_id: str, address: str) -> bool:
        """Whether the worker answers a health check now."""
        ...

    def held(self, worker_id: str, address: str) -> dict[LogicalExpert, str]:
        """Replicas the worker holds, with their checksums; ClusterError if unreachable."""
        ...

    def load(
        self,
        worker_id: str,
        address: str,
        expert: LogicalExpert,
        source: str,
        timeout_s: float,
        checksum: str | None = None,
    ) -> str:
        """Load ``expert`` from ``source`` (a peer's address or "checkpoint"); its checksum.

        A peer copy is verified by the worker against ``checksum``, the one the
        controller recorded when the expert was first loaded."""
        ...

    def unload(
        self, worker_id: str, address: str, experts: Sequence[LogicalExpert], timeout_s: float
    ) -> None:
        """Free these replicas; ClusterError if the worker is unreachable."""
        ...

    def forget(self, worker_id: str) -> None:
        """Drop any connection to a stopped worker."""
        ...

    # -- engines
    def num_engines(self, deployment: str) -> int:
        """Engines of ``deployment`` now."""
        ...

    def engine_maps(self, deployment: str) -> list[dict[str, Any]]:
        """The expert map each live engine holds (engines without one are left out)."""
        ...

    def push_map(self, deployment: str, map_dict: dict[str, Any]) -> None:
        """Give every engine the new map (one that misses it pulls it later)."""
        ...

    def active_epochs(self, deployment: str) -> list[int | None]:
        """The epoch each live engine runs a step on (None: no step running)."""
        ...

    def engine_stats(self, deployment: str) -> list[dict[str, Any]]:
        """``stats()`` of every live engine."""
        ...


# ---------------------------------------------------------------------------
# Ray and gRPC


class RayCluster:
    """The real cluster: Ray actors for processes, gRPC for the worker service."""

    def __init__(self) -> None:
        from elasticmoe.experts.rpc import StubCache

        self._stubs = StubCache()

    # -- workers as processes
    def start_workers(
        self, launch: WorkerLaunch, experts_by_worker: Mapping[str, Sequence[LogicalExpert]]
    ) -> dict[str, dict[str, Any]]:
        import ray

        from elasticmoe.experts.worker import ExpertWorker

        cls = ExpertWorker.remote_class(
            num_cpus=launch.num_cpus, num_gpus=launch.num_gpus, resources=dict(launch.resources)
        )
        handles = {}
        for wid in experts_by_worker:
            handles[wid] = cls.options(
                name=worker_actor_name(launch.deployment, wid),
                namespace=NAMESPACE,
                lifetime="detached",  # they outlive a controller restart
                # one node's loss takes as few replicas as possible
                scheduling_strategy="SPREAD",
                runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
            ).remote(
                wid,
                launch.model,
                launch.num_slots,
                device=launch.device,
                dtype=launch.dtype,
                num_threads=launch.num_threads,
                port=launch.port,
                fault_injection=launch.fault_injection,
                background_priority=launch.background_priority,
            )
        refs = {
            handles[w].start.remote([tuple(e) for e in es]): w
            for w, es in experts_by_worker.items()
        }
        infos = {}
        try:
            for ref, wid in refs.items():
                infos[wid] = ray.get(ref, timeout=launch.start_timeout_s)
        except BaseException:
            for handle in handles.values():
                ray.kill(handle)
            raise
        return infos

    def stop_worker(self, deployment: str, worker_id: str) -> None:
        import ray

        with contextlib.suppress(ValueError):  # already gone
            ray.kill(ray.get_actor(worker_actor_name(deployment, worker_id), namespace=NAMESPACE))
        self.forget(worker_id)

    def running_workers(self, deployment: str) -> dict[str, dict[str, Any]]:
        import ray

        prefix = worker_actor_name(deployment, "")
        infos = {}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry.get("namespace") != NAMESPACE or not entry["name"].startswith(prefix):
                continue
            wid = entry["name"][len(prefix) :]
            try:
                infos[wid] = ray.get(
                    ray.get_actor(entry["name"], namespace=NAMESPACE).info.remote(), timeout=30
                )
            except (ray.exceptions.RayError, ValueError) as e:  # died, hung, or gone since listed
                logger.warning("worker %s did not answer: %s", wid, e)
        return infos

    # -- workers over gRPC
    def healthy(self, worker_id: str, address: str) -> bool:
        import grpc

        from elasticmoe._proto.elasticmoe.v1 import expert_pb2

        try:
            self._stubs.get(worker_id, address).Health(expert_pb2.HealthRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False

    def held(self, worker_id: str, address: str) -> dict[LogicalExpert, str]:
        import grpc

        from elasticmoe._proto.elasticmoe.v1 import expert_pb2

        try:
            stats = self._stubs.get(worker_id, address).Stats(expert_pb2.StatsRequest(), timeout=5)
        except grpc.RpcError as e:
            raise ClusterError(f"worker {worker_id}: {e.code().name}: {e.details()}") from None
        return {LogicalExpert(i.layer, i.expert): i.checksum for i in stats.experts}

    def load(
        self,
        worker_id: str,
        address: str,
        expert: LogicalExpert,
        source: str,
        timeout_s: float,
        checksum: str | None = None,
    ) -> str:
        import grpc

        from elasticmoe._proto.elasticmoe.v1 import expert_pb2

        try:
            resp = self._stubs.get(worker_id, address).LoadExperts(
                expert_pb2.LoadExpertsRequest(
                    experts=[expert_pb2.ExpertRef(layer=expert.layer, expert=expert.expert)],
                    source=source,
                    checksums=[checksum] if checksum and source != "checkpoint" else [],
                ),
                timeout=timeout_s,
            )
        except grpc.RpcError as e:
            raise ClusterError(f"{e.code().name}: {e.details()}") from None
        return resp.experts[0].checksum

    def unload(
        self, worker_id: str, address: str, experts: Sequence[LogicalExpert], timeout_s: float
    ) -> None:
        import grpc

        from elasticmoe._proto.elasticmoe.v1 import expert_pb2

        try:
            self._stubs.get(worker_id, address).UnloadExperts(
                expert_pb2.UnloadExpertsRequest(
                    experts=[expert_pb2.ExpertRef(layer=e.layer, expert=e.expert) for e in experts]
                ),
                timeout=timeout_s,
            )
        except grpc.RpcError as e:
            raise ClusterError(f"worker {worker_id}: {e.code().name}: {e.details()}") from None

    def forget(self, worker_id: str) -> None:
        self._stubs.drop(worker_id)

    # -- engines
    def _engines(self, deployment: str) -> list[Any]:
        import ray

        handles = []
        for name in ray.util.list_named_actors(all_namespaces=True):
            if isinstance(name, dict):
                if name.get("namespace") != NAMESPACE:
                    continue
                name = name["name"]
            if name.startswith(ENGINE_PREFIX + deployment + "-"):
                with contextlib.suppress(ValueError):  # died since listed
                    handles.append(ray.get_actor(name, namespace=NAMESPACE))
        return handles

    def _ask_all(self, deployment: str, method: str, *args: Any, timeout: float) -> list[Any]:
        """``method`` on every engine; engines that fail or time out are left out."""
        import ray

        refs = [getattr(e, method).remote(*args) for e in self._engines(deployment)]
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=timeout))
            except ray.exceptions.RayError as e:  # a dead or hung engine has nothing to say
                logger.info("engine %s failed: %s", method, e)
        return out

    def num_engines(self, deployment: str) -> int:
        return len(self._engines(deployment))

    def engine_maps(self, deployment: str) -> list[dict[str, Any]]:
        return [m for m in self._ask_all(deployment, "current_map", timeout=30) if m]

    def push_map(self, deployment: str, map_dict: dict[str, Any]) -> None:
        import ray

        refs = [e.update_map.remote(map_dict) for e in self._engines(deployment)]
        for ref in refs:
            try:
                ray.get(ref, timeout=10)
            except ray.exceptions.RayError as e:  # a dead or slow engine pulls the map later
                logger.warning("pushing epoch %s failed: %s", map_dict.get("epoch"), e)

    def active_epochs(self, deployment: str) -> list[int | None]:
        return self._ask_all(deployment, "active_epoch", timeout=5)

    def engine_stats(self, deployment: str) -> list[dict[str, Any]]:
        return self._ask_all(deployment, "stats", timeout=5)


# ---------------------------------------------------------------------------
# In memory


@dataclass
class FakeWorker:
    """One simulated worker process."""

    address: str
    num_slots: int
    held: dict[LogicalExpert, str] = field(default_factory=dict)
    alive: bool = True
    node_id: str = "node-0"
    launch: WorkerLaunch | None = None  # how it was started (its pool's resources)


@dataclass
class FakeEngine:
    """One simulated engine: its map and the epoch of the step it runs."""

    map_dict: dict[str, Any] | None = None
    active_epoch: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    alive: bool = True


def fake_checksum(expert: LogicalExpert) -> str:
    """The checksum a fake replica of ``expert`` has (stable per expert, like real weights)."""
    return f"sum-{expert.layer}-{expert.expert}"


class FakeCluster:
    """The cluster in memory: workers are dicts, engines are records, nothing runs.

    Tests drive failures directly: ``kill(worker)`` makes a worker stop
    answering; ``corrupt[expert] = "x"`` makes loads of ``expert`` return a wrong
    checksum; ``failing_loads`` lists (worker, source) pairs whose loads fail.
    """

    def __init__(self, engines: int = 1) -> None:
        self.workers: dict[str, FakeWorker] = {}
        self.engines = [FakeEngine() for _ in range(engines)]
        self.corrupt: dict[LogicalExpert, str] = {}
        self.failing_loads: set[tuple[str, str]] = set()
        self.calls: list[tuple[str, ...]] = []  # what the controller did, in order
        self.health_checks = 0
        self._port = 50000

    # -- test controls
    def kill(self, worker_id: str) -> None:
        """The worker stops answering (its process died)."""
        self.workers[worker_id].alive = False

    def _worker(self, worker_id: str) -> FakeWorker:
        w = self.workers.get(worker_id)
        if w is None or not w.alive:
            raise ClusterError(f"worker {worker_id}: UNAVAILABLE: not running")
        return w

    # -- workers as processes
    def start_workers(
        self, launch: WorkerLaunch, experts_by_worker: Mapping[str, Sequence[LogicalExpert]]
    ) -> dict[str, dict[str, Any]]:
        infos = {}
        for wid, experts in experts_by_worker.items():
            if len(experts) > launch.num_slots:
                for started in infos:
                    del self.workers[started]
                raise ClusterError(f"worker {wid}: {len(experts)} experts > {launch.num_slots}")
            self._port += 1
            self.workers[wid] = FakeWorker(
                f"127.0.0.1:{self._port}",
                launch.num_slots,
                {e: fake_checksum(e) for e in experts},
                launch=launch,
            )
            self.calls.append(("start", wid))
            infos[wid] = self._info(wid)
        return infos

    def _info(self, wid: str) -> dict[str, Any]:
        w = self.workers[wid]
        return {
            "worker_id": wid,
            "address": w.address,
            "node_id": w.node_id,
            "node_ip": "127.0.0.1",
            "num_slots": w.num_slots,
            "slots": [
                {"layer": e.layer, "expert": e.expert, "checksum": c} for e, c in w.held.items()
            ],
        }

    def stop_worker(self, deployment: str, worker_id: str) -> None:
        self.calls.append(("stop", worker_id))
        self.workers.pop(worker_id, None)

    def running_workers(self, deployment: str) -> dict[str, dict[str, Any]]:
        return {w: self._info(w) for w, spec in self.workers.items() if spec.alive}

    # -- workers over "gRPC"
    def healthy(self, worker_id: str, address: str) -> bool:
        self.health_checks += 1
        w = self.workers.get(worker_id)
        return w is not None and w.alive and w.address == address

    def held(self, worker_id: str, address: str) -> dict[LogicalExpert, str]:
        return dict(self._worker(worker_id).held)

    def load(
        self,
        worker_id: str,
        address: str,
        expert: LogicalExpert,
        source: str,
        timeout_s: float,
        checksum: str | None = None,
    ) -> str:
        w = self._worker(worker_id)
        if source != "checkpoint" and not checksum:
            raise ClusterError("INVALID_ARGUMENT: a copy from a peer needs the recorded checksum")
        if (worker_id, source) in self.failing_loads:
            raise ClusterError(f"UNAVAILABLE: load from {source} failed")
        if source != "checkpoint" and not any(
            p.alive and p.address == source and expert in p.held for p in self.workers.values()
        ):
            raise ClusterError(f"NOT_FOUND: {source} holds no replica of {expert}")
        if expert not in w.held and len(w.held) >= w.num_slots:
            raise ClusterError(f"RESOURCE_EXHAUSTED: worker {worker_id} has no free slot")
        w.held[expert] = self.corrupt.get(expert, fake_checksum(expert))
        self.calls.append(("load", worker_id, str(expert), source))
        return w.held[expert]

    def unload(
        self, worker_id: str, address: str, experts: Sequence[LogicalExpert], timeout_s: float
    ) -> None:
        w = self._worker(worker_id)
        for e in experts:
            w.held.pop(e, None)
        self.calls.append(("unload", worker_id, *sorted(str(e) for e in experts)))

    def forget(self, worker_id: str) -> None:
        pass

    # -- engines
    def _live(self) -> Iterable[FakeEngine]:
        return (e for e in self.engines if e.alive)

    def num_engines(self, deployment: str) -> int:
        return sum(1 for _ in self._live())

    def engine_maps(self, deployment: str) -> list[dict[str, Any]]:
        return [e.map_dict for e in self._live() if e.map_dict]

    def push_map(self, deployment: str, map_dict: dict[str, Any]) -> None:
        self.calls.append(("push", str(map_dict["epoch"])))
        for e in self._live():
            e.map_dict = map_dict

    def active_epochs(self, deployment: str) -> list[int | None]:
        return [e.active_epoch for e in self._live()]

    def engine_stats(self, deployment: str) -> list[dict[str, Any]]:
        return [e.stats for e in self._live() if e.stats]
