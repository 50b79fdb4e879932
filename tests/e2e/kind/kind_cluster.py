"""Helpers shared by the kind suites: kubectl in the suite's namespace, polling, port-forward."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
NS = os.environ.get("ELASTICMOE_E2E_NAMESPACE", "elasticmoe")

needs_kind = [
    pytest.mark.kind,
    pytest.mark.skipif(
        os.environ.get("ELASTICMOE_E2E_KIND") != "1" or shutil.which("kubectl") is None,
        reason="needs a kind cluster with KubeRay and the chart: run tests/e2e/kind/run.sh "
        "(no Docker on this machine)",
    ),
]


def kubectl(*args: str, input: str | None = None) -> str:
    return subprocess.run(
        ["kubectl", "-n", NS, *args], input=input, text=True, check=True, capture_output=True
    ).stdout


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 900.0, every_s: float = 5.0):
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


@contextmanager
def port_forward(service: str, remote_port: int = 8000) -> Iterator[str]:
    """``kubectl port-forward svc/<service>``; yields the local base URL once /health answers."""
    import httpx

    port = free_port()
    forward = subprocess.Popen(
        ["kubectl", "-n", NS, "port-forward", f"svc/{service}", f"{port}:{remote_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for("/health", lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200)
        yield url
    finally:
        forward.terminate()
        forward.wait(timeout=30)


@contextmanager
def deployed(cr: dict[str, Any]) -> Iterator[str]:
    """Apply a MoEDeployment, wait until it is Ready, yield its forwarded Serve URL, and
    delete it afterwards (waiting for its children to go)."""
    import yaml

    name = cr["metadata"]["name"]
    kubectl("apply", "-f", "-", input=yaml.safe_dump(cr))
    try:
        wait_for(
            "MoEDeployment Ready",
            lambda: kubectl(
                "get", "moedeployment", name, "-o",
                'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
            ) == "True",
        )  # fmt: skip
        with port_forward(f"{name}-head-svc") as url:
            yield url
    finally:
        kubectl("delete", "moedeployment", name, "--wait=true", "--timeout=300s")
