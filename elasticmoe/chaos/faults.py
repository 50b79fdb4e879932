"""Faults a drill can inject into a running deployment, found by its name on Ray.

:class:`FaultInjector` kills expert workers, engines, the controller or a
whole node, slows a worker's gRPC calls, and takes the state store's Redis
away. Killing uses Ray (``ray.kill`` on the named actors); slowing uses the
workers' fault interceptor (the deployment must run with
``fault_injection: true``).

Two faults depend on what runs the cluster, so they are pluggable:

- **node loss**: in a test on ``ray.cluster_utils.Cluster`` pass
  ``remove_node`` (it stops the node's raylet: a real node loss). Without it
  the injector kills every actor of the deployment on that node, which is
  what a lost node does to elasticmoe.
- **Redis outage**: pass ``redis`` (anything with ``stop()`` and ``start()``,
  e.g. a process you started). Without it, :class:`RedisPause` pauses the
  deployment's Redis with ``CLIENT PAUSE``: its clients time out as if it
  were down, and nothing is lost.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

from elasticmoe.control.cluster import (
    CONTROLLER_NAME,
    ENGINE_PREFIX,
    NAMESPACE,
    worker_actor_name,
)

logger = logging.getLogger(__name__)

__all__ = ["FaultInjector", "RedisControl", "RedisPause"]


class RedisControl(Protocol):
    """Takes the state store's Redis away and brings it back."""

    def stop(self) -> None: ...

    def start(self) -> None: ...


class RedisPause:
    """A Redis outage by ``CLIENT PAUSE``: every client's commands stall until :meth:`start`.

    The store's clients time out (1 s) and report the store unavailable, as if
    the server were down; the data stays.
    """

    def __init__(self, url: str, max_pause_s: float = 600.0) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.max_pause_s = max_pause_s

    def stop(self) -> None:
        self.client.execute_command("CLIENT", "PAUSE", int(self.max_pause_s * 1000), "ALL")

    def start(self) -> None:
        self.client.execute_command("CLIENT", "UNPAUSE")


def _actors_on(node_id: str) -> list[str]:
    """Names of the live named actors on a node (from the GCS: no dashboard needed)."""
    import ray._private.state

    return [
        a["Name"]
        for a in ray._private.state.actors().values()
        if a.get("Name") and a["State"] == "ALIVE" and a["Address"]["NodeID"] == node_id
    ]


class FaultInjector:
    """Inject faults into deployment ``name`` on the connected Ray cluster."""

    def __init__(
        self,
        name: str = "default",
        *,
        remove_node: Callable[[str], None] | None = None,
        redis: RedisControl | None = None,
        seed: int = 0,
    ) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("connect to the deployment's Ray cluster first (ray.init)")
        self.name = name
        self.remove_node = remove_node
        self.redis = redis
        self.rng = random.Random(seed)

    # ------------------------------------------------------------ lookups
    @property
    def controller(self) -> Any:
        import ray

        return ray.get_actor(f"{CONTROLLER_NAME}-{self.name}", namespace=NAMESPACE)

    def call(self, method: str, *args: Any, timeout: float = 120.0) -> Any:
        """A controller method's result (raises while the controller is down)."""
        import ray

        return ray.get(getattr(self.controller, method).remote(*args), timeout=timeout)

    def engine_names(self) -> list[str]:
        """Ray actor names of the deployment's engines, in index order."""
        import ray

        prefix = f"{ENGINE_PREFIX}{self.name}-"
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == NAMESPACE and a["name"].startswith(prefix)
        ]
        return sorted(names, key=lambda n: int(n.rsplit("-", 1)[1]))

    def engines(self) -> list[Any]:
        """Handles of the deployment's engines."""
        import ray

        return [ray.get_actor(n, namespace=NAMESPACE) for n in self.engine_names()]

    def workers(self) -> list[dict[str, Any]]:
        """The workers in the expert map: id, node, health (from the controller)."""
        return [w for w in self.call("demand")["workers"] if not w["spare"]]

    def worker(self, worker_id: str) -> Any:
        import ray

        return ray.get_actor(worker_actor_name(self.name, worker_id), namespace=NAMESPACE)

    # ------------------------------------------------------------- faults
    def kill_worker(self, worker_id: str | None = None) -> str:
        """Kill an expert worker (a random one by default); returns its id."""
        import ray

        if worker_id is None:
            worker_id = self.rng.choice(sorted(w["worker_id"] for w in self.workers()))
        ray.kill(self.worker(worker_id), no_restart=True)
        logger.warning("chaos: killed worker %s", worker_id)
        return worker_id

    def kill_engine(self, index: int | None = None) -> str:
        """Kill an engine; Ray restarts it, and it pulls the current map. Returns its name."""
        import ray

        names = self.engine_names()
        name = names[index] if index is not None else self.rng.choice(names)
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=False)
        logger.warning("chaos: killed engine %s", name)
        return name

    def kill_controller(self) -> None:
        """Kill the controller; Ray restarts it and it recovers from the state store."""
        import ray

        ray.kill(self.controller, no_restart=False)
        logger.warning("chaos: killed the controller")

    def slow_worker(
        self, worker_id: str | None = None, delay_ms: float = 200.0, load_delay_ms: float = 0.0
    ) -> str:
        """Delay a worker's Forward (and LoadExperts) calls; returns its id."""
        import ray

        if worker_id is None:
            worker_id = self.rng.choice(sorted(w["worker_id"] for w in self.workers()))
        ray.get(
            self.worker(worker_id).set_fault.remote(delay_ms=delay_ms, load_delay_ms=load_delay_ms)
        )
        return worker_id

    def clear_faults(self) -> None:
        """Undo :meth:`slow_worker` on every worker."""
        import ray

        for w in self.workers():
            with contextlib.suppress(Exception):
                ray.get(self.worker(w["worker_id"]).set_fault.remote(), timeout=10)

    def pick_node(self) -> str:
        """The node (other than this driver's) that holds the most workers."""
        import ray

        head = ray.get_runtime_context().get_node_id()
        counts: dict[str, int] = {}
        for w in self.workers():
            if w.get("node_id") and w["node_id"] != head:
                counts[w["node_id"]] = counts.get(w["node_id"], 0) + 1
        if not counts:
            raise RuntimeError("no worker runs on a node other than the driver's")
        return max(sorted(counts), key=counts.get)

    def actors_on(self, node_id: str) -> set[str]:
        """Engines (by actor name) and ``"controller"`` if they run on ``node_id``."""
        controller = f"{CONTROLLER_NAME}-{self.name}"
        names = set()
        for name in _actors_on(node_id):
            if name == controller:
                names.add("controller")
            elif name.startswith(f"{ENGINE_PREFIX}{self.name}-"):
                names.add(name)
        return names

    def lose_node(self, node_id: str | None = None) -> str:
        """Lose a node (default :meth:`pick_node`); returns its node id."""
        node_id = node_id or self.pick_node()
        if self.remove_node is not None:
            self.remove_node(node_id)
        else:
            self._kill_actors_on(node_id)
        logger.warning("chaos: lost node %s", node_id)
        return node_id

    def _kill_actors_on(self, node_id: str) -> None:
        import ray

        prefixes = (f"{ENGINE_PREFIX}{self.name}-", worker_actor_name(self.name, ""))
        for name in _actors_on(node_id):
            if name.startswith(prefixes):
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=False)

    def stop_redis(self) -> None:
        """Take the state store's Redis away."""
        self._redis().stop()
        logger.warning("chaos: Redis stopped")

    def start_redis(self) -> None:
        """Bring the state store's Redis back."""
        self._redis().start()
        logger.warning("chaos: Redis back")

    def _redis(self) -> RedisControl:
        if self.redis is None:
            url = self.call("state_store_url")
            if not url or not str(url).startswith("redis"):
                raise RuntimeError(
                    "this deployment keeps its state in memory; the Redis scenario needs "
                    "state_store: redis://... in its config"
                )
            self.redis = RedisPause(url)
        return self.redis

    # ------------------------------------------------------------- health
    def instances(self) -> dict[str, str]:
        """Instance ids of the controller and every engine (they change on a restart)."""
        import ray

        out = {"controller": self.call("instance_id", timeout=10)}
        for name, engine in zip(self.engine_names(), self.engines(), strict=True):
            out[name] = ray.get(engine.ready.remote(), timeout=10)["instance"]
        return out

    def healthy(
        self,
        baseline_workers: int,
        gone: frozenset[str] = frozenset(),
        restarted: dict[str, str] | None = None,
    ) -> bool:
        """Whether the deployment is whole again after a fault.

        Every expert has its minimum replicas on live workers, ``baseline_workers``
        workers are live, none of ``gone`` (dead workers) is still in the map, and
        the controller and every engine answer, as new instances where
        ``restarted`` names their old instance ids.
        """
        import ray

        try:
            r = self.call("redundancy", True, timeout=10)
            if not r["full"] or r["workers"] < baseline_workers:
                return False
            if gone and gone & {w["worker_id"] for w in self.workers()}:
                return False
            now = self.instances()
        except (ray.exceptions.RayError, ValueError) as e:  # down, restarting, or an actor
            # gone since it was listed: not whole yet; anything else is a bug and raises
            logger.debug("deployment not whole yet: %s", e)
            return False
        return not any(now.get(k) == v for k, v in (restarted or {}).items())

    def wait_healthy(
        self,
        baseline_workers: int,
        timeout: float = 120.0,
        gone: frozenset[str] = frozenset(),
        restarted: dict[str, str] | None = None,
    ) -> float | None:
        """Seconds until :meth:`healthy` (None if not within ``timeout``)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.healthy(baseline_workers, gone, restarted):
                return time.monotonic() - start
            time.sleep(0.2)
        return None
