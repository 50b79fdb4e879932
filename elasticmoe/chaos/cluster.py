"""A multi-node Ray cluster on this machine, for chaos drills and their tests.

Each node is a real raylet (``ray.cluster_utils.Cluster``); removing one is a
real node loss. Every node binds 127.0.0.1, so no traffic leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

from elasticmoe.control.cluster import NAMESPACE, ray_node_starts, retry_ray_start

__all__ = ["DRILL_DEPLOYMENT", "drill", "local_cluster", "node_remover"]

_LOCAL = {"node_ip_address": "127.0.0.1", "object_store_memory": 96 * 1024 * 1024}
# the GCS declares a silent node dead after 3 missed 1 s health checks (default 5 x 3 s)
_FAST_NODE_FAILURE = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


@contextlib.contextmanager
def local_cluster(num_nodes: int = 3, cpus_per_node: int = 4) -> Iterator[Any]:
    """Start ``num_nodes`` Ray nodes (a head and workers), connect this process, yield the
    ``Cluster``; disconnect and stop every node at the end."""
    import ray

    # a raylet gives up on its node's agents after 30 s by default: too short on a busy machine
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    cluster = _start_cluster(num_nodes, cpus_per_node)
    try:
        # ray.init turns a 127.0.0.1 address into this machine's outward IP, where
        # nothing of this cluster listens; keep it on the loopback address
        with mock.patch.object(ray._private.services, "resolve_ip_for_localhost", str):
            ray.init(
                address=cluster.address,
                namespace=NAMESPACE,
                log_to_driver=False,
                _node_ip_address="127.0.0.1",
            )
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _start_cluster(num_nodes: int, cpus_per_node: int) -> Any:
    """A started ``Cluster`` of ``num_nodes`` nodes, the whole start retried when a node's
    start timed out (``retry_ray_start``: that happens on a loaded machine)."""
    from ray.cluster_utils import Cluster

    def start() -> Any:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": cpus_per_node,
                "include_dashboard": False,
                "_system_config": _FAST_NODE_FAILURE,
                **_LOCAL,
            },
        )
        try:
            for _ in range(num_nodes - 1):
                cluster.add_node(num_cpus=cpus_per_node, **_LOCAL)
            cluster.wait_for_nodes()
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    return retry_ray_start(start, "Ray cluster")


def node_remover(cluster: Any, replace_cpus: int = 0) -> Callable[[str], None]:
    """``remove_node(node_id)`` for :class:`~elasticmoe.chaos.faults.FaultInjector`: stops
    that node's raylet; with ``replace_cpus``, then adds a fresh node with that many CPUs
    (what a cloud autoscaler would do)."""

    def remove(node_id: str) -> None:
        node = next((n for n in cluster.worker_nodes if n.node_id == node_id), None)
        if node is None:
            raise ValueError(f"no removable node {node_id} in this cluster")
        cluster.remove_node(node, allow_graceful=False)
        if replace_cpus:
            with ray_node_starts():
                cluster.add_node(num_cpus=replace_cpus, **_LOCAL)

    return remove


DRILL_DEPLOYMENT: dict[str, Any] = {
    "name": "chaos",
    "num_workers": 3,
    "replicas_per_expert": 2,
    "num_engines": 2,
    "spare_workers": 1,
    "fault_injection": True,
    "health_check_s": 0.5,
}


@contextlib.contextmanager
def drill(
    model: str,
    *,
    redis: Any = None,
    num_nodes: int = 3,
    cpus_per_node: int = 4,
    **config: Any,
) -> Iterator[Any]:
    """A deployment on a local ``num_nodes``-node cluster, ready for every scenario; yields
    its :class:`~elasticmoe.chaos.faults.FaultInjector`.

    3 workers with every expert on 2 of them, a spare worker, 2 engines, fault
    injection on, health checks every 0.5 s (:data:`DRILL_DEPLOYMENT`; ``config``
    overrides). ``redis`` (a server with ``url``, ``stop()`` and ``start()``) becomes
    the state store and the Redis outage's target.
    """
    from elasticmoe.chaos.faults import FaultInjector
    from elasticmoe.control.deployment import Deployment, DeploymentConfig

    settings = {**DRILL_DEPLOYMENT, **config}
    if redis is not None:
        settings["state_store"] = redis.url
    with local_cluster(num_nodes, cpus_per_node) as cluster:
        deployment = Deployment(DeploymentConfig(model=model, **settings), progress=False)
        deployment.start()
        try:
            yield FaultInjector(
                settings["name"], remove_node=node_remover(cluster, cpus_per_node), redis=redis
            )
        finally:
            deployment.shutdown()
