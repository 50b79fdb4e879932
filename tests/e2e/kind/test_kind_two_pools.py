"""End-to-end on kind: one MoEDeployment with two pools, each a KubeRay worker group.

Two CPU pools stand for two accelerator types (``cpu-a`` and ``cpu-b``, as a GPU and
an NPU pool would be): the operator renders one worker group per pool, KubeRay
starts pods in both, and the controller reports both pools in ``/admin/demand``.
Run through ``tests/e2e/kind/run.sh``; skipped where there is no kind cluster.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kind_cluster import REPO, deployed, kubectl, needs_kind, wait_for

pytestmark = needs_kind

NAME = "tiny-two-pools"
POOLS = ("cpu-a", "cpu-b")


def two_pool_deployment() -> dict[str, Any]:
    """The CPU example with its pool split in two, and a policy that names both."""
    cr = yaml.safe_load((REPO / "examples" / "k8s" / "moedeployment-cpu.yaml").read_text())
    cr["metadata"]["name"] = NAME
    cr["spec"]["image"] = os.environ.get("ELASTICMOE_IMAGE", cr["spec"]["image"])
    (pool,) = cr["spec"]["pools"]
    cr["spec"]["pools"] = [
        {**pool, "name": name, "minWorkers": 1, "maxWorkers": 2} for name in POOLS
    ]
    policy = yaml.safe_load((REPO / "examples" / "policies" / "default-cpu.yaml").read_text())
    policy["metadata"]["name"] = NAME
    (policy_pool,) = policy["spec"]["pools"]
    policy["spec"]["pools"] = [
        {**policy_pool, "name": name, "min_workers": 1, "max_workers": 2} for name in POOLS
    ]
    cr["spec"]["autoscaling"] = {"policy": policy}
    return cr


def pods(pool: str) -> list[dict[str, Any]]:
    selector = f"ray.io/cluster={NAME},ray.io/group={pool}"
    return json.loads(kubectl("get", "pods", "-l", selector, "-o", "json"))["items"]


@pytest.fixture(scope="module")
def admin() -> Iterator[str]:
    with deployed(two_pool_deployment()) as url:
        yield url


def test_one_worker_group_per_pool(admin):
    rc = json.loads(kubectl("get", "raycluster", NAME, "-o", "json"))
    assert [g["groupName"] for g in rc["spec"]["workerGroupSpecs"]] == list(POOLS)


def test_both_worker_groups_get_running_pods(admin):
    for pool in POOLS:
        wait_for(
            f"a running pod in {pool}",
            lambda pool=pool: any(p["status"].get("phase") == "Running" for p in pods(pool)),
        )


def test_both_pools_in_status(admin):
    status = json.loads(kubectl("get", "moedeployment", NAME, "-o", "json"))["status"]
    assert set(status["pools"]) == set(POOLS)
    assert all(status["pools"][p]["replicas"] >= 1 for p in POOLS)


def test_experts_on_both_pools(admin):
    import httpx

    def demand() -> dict[str, Any] | None:
        body = httpx.get(f"{admin}/admin/demand", timeout=10).json()
        pools = body.get("pools", {})
        return body if all(pools.get(p, {}).get("workers", 0) >= 1 for p in POOLS) else None

    body = wait_for("workers of both pools in /admin/demand", demand, timeout_s=600)
    workers_by_pool = {
        p: {w["worker_id"] for w in body["workers"] if w["pool"] == p} for p in POOLS
    }
    status = httpx.get(f"{admin}/admin/status", timeout=10).json()
    replicas = {w["worker_id"]: w["num_replicas"] for w in status["workers"]}
    for pool, workers in workers_by_pool.items():
        assert sum(replicas.get(w, 0) for w in workers) > 0, f"no experts on pool {pool}"
