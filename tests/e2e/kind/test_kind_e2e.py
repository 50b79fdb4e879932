"""End-to-end on kind: the CPU example serves, and losing a worker pod loses no request.

Run through ``tests/e2e/kind/run.sh`` (it creates the cluster and installs KubeRay and
the chart, then sets ``ELASTICMOE_E2E_KIND=1``). Skipped everywhere else: the
development machines and CI have no Docker, so no kind cluster.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.kind,
    pytest.mark.skipif(
        os.environ.get("ELASTICMOE_E2E_KIND") != "1" or shutil.which("kubectl") is None,
        reason="needs a kind cluster with KubeRay and the chart: run tests/e2e/kind/run.sh "
        "(no Docker on this machine)",
    ),
]

REPO = Path(__file__).resolve().parents[3]
NS = os.environ.get("ELASTICMOE_E2E_NAMESPACE", "elasticmoe")
NAME = "tiny-cpu"
WORKERS = f"ray.io/cluster={NAME},ray.io/group=cpu"


def kubectl(*args: str, input: str | None = None) -> str:
    return subprocess.run(
        ["kubectl", "-n", NS, *args], input=input, text=True, check=True, capture_output=True
    ).stdout


def wait_for(what: str, check, timeout_s: float = 900.0, every_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
        except subprocess.CalledProcessError:
            result = None
        if result:
            return result
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    cr = yaml.safe_load((REPO / "examples" / "k8s" / "moedeployment-cpu.yaml").read_text())
    cr["spec"]["image"] = os.environ.get("ELASTICMOE_IMAGE", cr["spec"]["image"])
    kubectl("apply", "-f", "-", input=yaml.safe_dump(cr))
    try:
        wait_for(
            "MoEDeployment Ready",
            lambda: kubectl(
                "get", "moedeployment", NAME, "-o",
                'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
            ) == "True",
        )  # fmt: skip
        port = free_port()
        forward = subprocess.Popen(
            ["kubectl", "-n", NS, "port-forward", f"svc/{NAME}-head-svc", f"{port}:8000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            import httpx

            wait_for("/health", lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200)
            yield url
        finally:
            forward.terminate()
            forward.wait(timeout=30)
    finally:
        kubectl("delete", "moedeployment", NAME, "--wait=true", "--timeout=300s")


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
