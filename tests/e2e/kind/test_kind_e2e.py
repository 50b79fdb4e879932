"""End-to-end on kind: the CPU example serves, and losing a worker pod loses no request.

Run through ``tests/e2e/kind/run.sh`` (it creates the cluster and installs KubeRay and
the chart, then sets ``ELASTICMOE_E2E_KIND=1``). Skipped everywhere else: the
development machines and CI have no Docker, so no kind cluster.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from collections.abc import Iterator

import pytest
import yaml
from kind_cluster import REPO, deployed, kubectl, needs_kind, wait_for

pytestmark = needs_kind

NAME = "tiny-cpu"
WORKERS = f"ray.io/cluster={NAME},ray.io/group=cpu"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    cr = yaml.safe_load((REPO / "examples" / "k8s" / "moedeployment-cpu.yaml").read_text())
    cr["spec"]["image"] = os.environ.get("ELASTICMOE_IMAGE", cr["spec"]["image"])
    with deployed(cr) as url:
        yield url


def complete(url: str, i: int) -> int:
    import httpx

    resp = httpx.post(
        f"{url}/v1/completions",
        json={"model": "default", "prompt": f"request {i}:", "max_tokens": 16},
        timeout=120,
    )
    return resp.status_code


def test_requests_are_served(endpoint):
    assert complete(endpoint, 0) == 200


def test_deleting_a_worker_pod_mid_load_loses_no_request(endpoint):
    pods = json.loads(kubectl("get", "pods", "-l", WORKERS, "-o", "json"))["items"]
    assert pods, "no worker pods"
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(complete, endpoint, i) for i in range(200)]
        time.sleep(5)
        kubectl("delete", "pod", pods[0]["metadata"]["name"], "--wait=false")
        statuses = [f.result() for f in futures]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    # The operator keeps the group within bounds and KubeRay replaces the pod.
    wait_for(
        "worker pods back",
        lambda: len(json.loads(kubectl("get", "pods", "-l", WORKERS, "-o", "json"))["items"]) >= 2,
    )
