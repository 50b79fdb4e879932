"""The operator's handlers against kopf's ``kmock`` API server.

``kmock``'s KubernetesEmulator keeps objects in memory and serves them over
real HTTP, so the handlers' Kubernetes client does real create/get/patch/
delete calls. No cluster and no elasticmoe Serve app run here, so the same
kmock server also stands in for the controller's admin API
(``GET /admin/demand``, ``POST /admin/drain``) with canned answers in the
shape of the contract; the tests then check what the operator asked for.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import kmock as km
import kopf
import pytest
import pytest_asyncio
import yaml

from operators.elasticmoe_operator import handlers, render
from operators.elasticmoe_operator.config import OperatorConfig
from operators.elasticmoe_operator.kube import KubeClient

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parents[1]
NS = "models"
DEPLOYMENTS = km.resource("elasticmoe.io", "v1alpha1", "moedeployments")
RAYCLUSTERS = km.resource("ray.io", "v1", "rayclusters")
CONFIGMAPS = km.resource("", "v1", "configmaps")
SECRETS = km.resource("", "v1", "secrets")
PODS = km.resource("", "v1", "pods")
PVCS = km.resource("", "v1", "persistentvolumeclaims")


def example(kind: str) -> dict[str, Any]:
    cr = yaml.safe_load((REPO / "examples" / "k8s" / f"moedeployment-{kind}.yaml").read_text())
    cr["metadata"].update(namespace=NS, uid=f"uid-{kind}", generation=1)
    return cr


@pytest_asyncio.fixture
async def ctx(kmock: km.KubernetesEmulator):
    for res, kind in (
        (DEPLOYMENTS, "MoEDeployment"),
        (RAYCLUSTERS, "RayCluster"),
        (CONFIGMAPS, "ConfigMap"),
        (SECRETS, "Secret"),
        (PODS, "Pod"),
        (PVCS, "PersistentVolumeClaim"),
    ):
        kmock.resources[res] = km.ResourceInfo(kind=kind, namespaced=True, subresources={"status"})
    url = str(kmock.url).rstrip("/")
    kube = KubeClient(kopf.ConnectionInfo(server=url))
    config = OperatorConfig(admin_url=url, retry_delay_s=7)
    context = handlers.OperatorContext(kube=kube, config=config, now=lambda: "2026-01-01T00:00:00Z")
    yield context
    await kube.aclose()


def put(kmock: km.KubernetesEmulator, res: km.resource, obj: dict[str, Any]) -> None:
    kmock.objects[res, obj["metadata"].get("namespace", NS), obj["metadata"]["name"]] = obj


def get(kmock: km.KubernetesEmulator, res: km.resource, name: str) -> dict[str, Any] | None:
    key = (res, NS, name)
    if key not in kmock.objects or kmock.objects[key].deleted:
        return None
    return copy.deepcopy(dict(kmock.objects[key].raw))


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


def cpu_setup(kmock: km.KubernetesEmulator) -> dict[str, Any]:
    cr = example("cpu")
    put(kmock, DEPLOYMENTS, cr)
    policy = (REPO / "examples" / "policies" / "default-cpu.yaml").read_text()
    put(kmock, CONFIGMAPS, {"metadata": {"name": "elasticmoe-policy-default-cpu", "namespace": NS},
                            "data": {"policy.yaml": policy}})  # fmt: skip
    return cr


async def test_create_makes_raycluster_and_sets_status(kmock, ctx):
    cr = cpu_setup(kmock)
    await handlers.reconcile(cr, ctx)
    rc = get(kmock, RAYCLUSTERS, "tiny-cpu")
    assert rc is not None and rc["kind"] == "RayCluster"
    assert rc["metadata"]["ownerReferences"][0]["uid"] == "uid-cpu"
    assert [g["groupName"] for g in rc["spec"]["workerGroupSpecs"]] == ["cpu"]
    cm = get(kmock, CONFIGMAPS, "tiny-cpu-serve-config")
    assert "serve.yaml" in cm["data"]
    status = get(kmock, DEPLOYMENTS, "tiny-cpu")["status"]
    assert status["rayCluster"] == "tiny-cpu" and status["observedGeneration"] == 1
    assert status["pools"]["cpu"]["replicas"] == 2
    assert conditions({"status": status})["Ready"]["status"] == "False"  # KubeRay not ready yet


async def test_spec_change_patches_raycluster_and_keeps_replicas(kmock, ctx):
    cr = cpu_setup(kmock)
    await handlers.reconcile(cr, ctx)
    # The scale loop had grown the group to 3 meanwhile.
    rc = get(kmock, RAYCLUSTERS, "tiny-cpu")
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = 3
    put(kmock, RAYCLUSTERS, rc)
    cr["spec"]["image"] = "ghcr.io/elasticmoe/elasticmoe:0.2.0"
    cr["spec"]["pools"][0]["maxWorkers"] = 6
    cr["metadata"]["generation"] = 2
    await handlers.reconcile(cr, ctx)
    assert len(kmock[km.method.PATCH, RAYCLUSTERS]) == 1
    rc = get(kmock, RAYCLUSTERS, "tiny-cpu")
    group = rc["spec"]["workerGroupSpecs"][0]
    assert group["maxReplicas"] == 6 and group["replicas"] == 3
    assert group["template"]["spec"]["containers"][0]["image"].endswith(":0.2.0")
    assert get(kmock, DEPLOYMENTS, "tiny-cpu")["status"]["observedGeneration"] == 2


async def test_bad_spec_is_permanent_error_with_condition(kmock, ctx):
    cr = example("gpu")
    cr["spec"]["pools"][0]["accelerator"] = "nvidia.com/gpux"
    put(kmock, DEPLOYMENTS, cr)
    with pytest.raises(kopf.PermanentError, match=r"spec\.pools\[0\]\.accelerator"):
        await handlers.reconcile(cr, ctx)
    ready = conditions(get(kmock, DEPLOYMENTS, "mixtral-gpu"))["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert ready["message"].startswith("spec.pools[0].accelerator: 'nvidia.com/gpux'")
    assert get(kmock, RAYCLUSTERS, "mixtral-gpu") is None


async def test_missing_dependency_is_temporary_error(kmock, ctx):
    cr = example("gpu")  # needs PVC "models", Secrets and the policy ConfigMap
    put(kmock, DEPLOYMENTS, cr)
    with pytest.raises(kopf.TemporaryError, match="policyConfigMap") as err:
        await handlers.reconcile(cr, ctx)
    assert err.value.delay == 7
    policy = (REPO / "examples" / "policies" / "default.yaml").read_text()
    put(kmock, CONFIGMAPS, {"metadata": {"name": "elasticmoe-policy-default", "namespace": NS},
                            "data": {"policy.yaml": policy}})  # fmt: skip
    with pytest.raises(kopf.TemporaryError, match="apiKeySecret"):
        await handlers.reconcile(cr, ctx)
    secret = {"api-key": base64.b64encode(b"sk-test").decode()}
    put(kmock, SECRETS, {"metadata": {"name": "elasticmoe-api-key", "namespace": NS},
                         "data": secret})  # fmt: skip
    put(kmock, SECRETS, {"metadata": {"name": "elasticmoe-redis", "namespace": NS},
                         "data": {"redis-password": base64.b64encode(b"pw").decode()}})  # fmt: skip
    with pytest.raises(kopf.TemporaryError, match="PersistentVolumeClaim 'models'"):
        await handlers.reconcile(cr, ctx)
    put(kmock, PVCS, {"metadata": {"name": "models", "namespace": NS}, "spec": {}})
    await handlers.reconcile(cr, ctx)
    assert get(kmock, RAYCLUSTERS, "mixtral-gpu") is not None


def worker_pod(name: str, ip: str, created: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS, "creationTimestamp": created,
                     "labels": {"ray.io/cluster": "tiny-cpu", "ray.io/group": "cpu"}},
        "status": {"phase": "Running", "podIP": ip},
    }  # fmt: skip


def demand(desired: int, nodes: list[str], epoch: int = 3) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "pools": {"cpu": {"workers": len(nodes), "desired": desired}},
        "workers": [
            {"worker_id": f"w{i}", "pool": "cpu", "node": ip, "healthy": True}
            for i, ip in enumerate(nodes)
        ],
    }


async def scaled_setup(kmock, ctx, replicas: int) -> dict[str, Any]:
    cr = cpu_setup(kmock)
    await handlers.reconcile(cr, ctx)
    rc = get(kmock, RAYCLUSTERS, "tiny-cpu")
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = replicas
    rc["status"] = {"state": "ready"}
    put(kmock, RAYCLUSTERS, rc)
    for i in range(replicas):
        put(kmock, PODS, worker_pod(f"tiny-cpu-cpu-{i}", f"10.0.0.{i}", f"2026-01-01T00:0{i}:00Z"))
    return get(kmock, DEPLOYMENTS, "tiny-cpu")


async def test_demand_scales_up_within_max(kmock, ctx):
    cr = await scaled_setup(kmock, ctx, 2)
    kmock["get /admin/demand"] << demand(9, ["10.0.0.0", "10.0.0.1"])
    await handlers.scale(cr, ctx)
    group = get(kmock, RAYCLUSTERS, "tiny-cpu")["spec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 4  # maxWorkers
    assert len(kmock["post /admin/drain"]) == 0
    status = get(kmock, DEPLOYMENTS, "tiny-cpu")["status"]
    assert status["epoch"] == 3 and status["pools"]["cpu"]["desired"] == 4
    assert conditions({"status": status})["Scaling"]["status"] == "True"
    assert conditions({"status": status})["Ready"]["status"] == "True"


async def test_shrink_drains_first_then_patches(kmock, ctx):
    cr = await scaled_setup(kmock, ctx, 4)
    nodes = [f"10.0.0.{i}" for i in range(4)]
    kmock["get /admin/demand"] << demand(2, nodes)
    kmock["post /admin/drain"] << {"drained": ["w3", "w2"], "epoch": 4}
    await handlers.scale(cr, ctx)
    (drain,) = list(kmock["post /admin/drain"])
    assert drain.data == {"nodes": ["10.0.0.3", "10.0.0.2"]}  # newest pods first
    # The drain came before the RayCluster patch.
    requests = [(r.method.value, r.url.path) for r in kmock]
    drained_at = requests.index(("POST", "/admin/drain"))
    patched_at = requests.index(("PATCH", f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/tiny-cpu"))
    assert drained_at < patched_at
    group = get(kmock, RAYCLUSTERS, "tiny-cpu")["spec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 2
    assert group["scaleStrategy"] == {"workersToDelete": ["tiny-cpu-cpu-3", "tiny-cpu-cpu-2"]}


async def test_refused_drain_keeps_pods(kmock, ctx):
    cr = await scaled_setup(kmock, ctx, 3)
    kmock["get /admin/demand"] << demand(2, ["10.0.0.0", "10.0.0.1", "10.0.0.2"])
    kmock["post /admin/drain"] << 409 << {"error": {"message": "changes are paused"}}
    await handlers.scale(cr, ctx)
    assert len(kmock["post /admin/drain"]) == 1
    group = get(kmock, RAYCLUSTERS, "tiny-cpu")["spec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 3 and "scaleStrategy" not in group
    degraded = conditions(get(kmock, DEPLOYMENTS, "tiny-cpu"))["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "DrainRefused"
    assert "changes are paused" in degraded["message"]


async def test_demand_never_below_min(kmock, ctx):
    cr = await scaled_setup(kmock, ctx, 2)
    kmock["get /admin/demand"] << demand(0, ["10.0.0.0", "10.0.0.1"])
    await handlers.scale(cr, ctx)
    assert len(kmock["post /admin/drain"]) == 0
    group = get(kmock, RAYCLUSTERS, "tiny-cpu")["spec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 2


async def test_unreachable_admin_api_is_temporary(kmock, ctx):
    cr = await scaled_setup(kmock, ctx, 2)
    kmock["get /admin/demand"] << 503 << {"error": {"message": "starting"}}
    with pytest.raises(kopf.TemporaryError, match="admin API"):
        await handlers.scale(cr, ctx)
    ready = conditions(get(kmock, DEPLOYMENTS, "tiny-cpu"))["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "AdminUnreachable"


async def test_delete_cleans_up_children(kmock, ctx):
    cr = cpu_setup(kmock)
    await handlers.reconcile(cr, ctx)
    assert get(kmock, RAYCLUSTERS, "tiny-cpu") is not None
    await handlers.delete(cr, ctx)
    assert get(kmock, RAYCLUSTERS, "tiny-cpu") is None
    assert get(kmock, CONFIGMAPS, "tiny-cpu-serve-config") is None
    await handlers.delete(cr, ctx)  # already gone: no error
    assert render.config_map_name("tiny-cpu") == "tiny-cpu-serve-config"
