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

from operators.elasticmoe_operator import handlers, render, rollout
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


POLICY_ACCEPTED = {"policy": "default-cpu", "interval_s": 15}


async def scaled_setup(kmock, ctx, replicas: int, policy_answer: bool = True) -> dict[str, Any]:
    """A ready RayCluster with ``replicas`` running worker pods (``policy_answer``:
    ``PUT /admin/policy`` accepts; else the test registers its own answer)."""
    cr = cpu_setup(kmock)
    await handlers.reconcile(cr, ctx)
    rc = get(kmock, RAYCLUSTERS, "tiny-cpu")
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = replicas
    rc["status"] = {"state": "ready"}
    put(kmock, RAYCLUSTERS, rc)
    for i in range(replicas):
        put(kmock, PODS, worker_pod(f"tiny-cpu-cpu-{i}", f"10.0.0.{i}", f"2026-01-01T00:0{i}:00Z"))
    if policy_answer:
        kmock["put /admin/policy"] << POLICY_ACCEPTED
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


# ------------------------------------------------- changes reach the running deployment
def admin_answers(kmock: km.KubernetesEmulator, route: str, first: Any) -> dict[str, Any]:
    """``route`` answers ``state["answer"]`` (an int: that HTTP status with an error)."""
    state = {"answer": first}

    def answer() -> Any:
        a = state["answer"]
        # Always a status: kmock keeps the last one it served on the reaction.
        if isinstance(a, int):
            return km.Response(status=a, payload={"error": {"message": f"answer {a}"}})
        return km.Response(status=200, payload=a)

    kmock[route] << answer
    return state


def policy_puts(kmock: km.KubernetesEmulator) -> list[str]:
    """The policy texts the operator sent, in order."""
    return [r.data["policy"] for r in kmock["put /admin/policy"]]


def cpu_policy(interval_s: int) -> str:
    text = (REPO / "examples" / "policies" / "default-cpu.yaml").read_text()
    doc = yaml.safe_load(text)
    doc["spec"]["interval_s"] = interval_s
    return yaml.safe_dump(doc, sort_keys=False)


async def ready_setup(kmock, ctx, replicas: int = 2) -> dict[str, Any]:
    """A running deployment whose policy has been pushed once."""
    cr = await scaled_setup(kmock, ctx, replicas)
    nodes = [f"10.0.0.{i}" for i in range(replicas)]
    kmock["get /admin/demand"] << demand(replicas, nodes)
    await handlers.scale(cr, ctx)
    return get(kmock, DEPLOYMENTS, "tiny-cpu")


async def test_policy_configmap_change_is_pushed_once(kmock, ctx):
    cr = await ready_setup(kmock, ctx)
    first = (REPO / "examples" / "policies" / "default-cpu.yaml").read_text()
    assert policy_puts(kmock) == [first]  # the running deployment gets what the spec names
    assert cr["status"]["appliedPolicy"] == handlers.policy_hash(first)
    await handlers.scale(cr, ctx)
    assert len(policy_puts(kmock)) == 1  # applied already: not sent again

    # The user edits the referenced ConfigMap: the next pass pushes the new text.
    cm = get(kmock, CONFIGMAPS, "elasticmoe-policy-default-cpu")
    cm["data"]["policy.yaml"] = cpu_policy(7)
    put(kmock, CONFIGMAPS, cm)
    await handlers.scale(cr, ctx)
    assert policy_puts(kmock)[1:] == [cpu_policy(7)]
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert cr["status"]["appliedPolicy"] == handlers.policy_hash(cpu_policy(7))
    progressing = conditions(cr)["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("False", "Applied")
    await handlers.scale(cr, ctx)
    assert len(policy_puts(kmock)) == 2


async def test_inline_policy_change_updates_configmap_and_is_pushed_on_reconcile(kmock, ctx):
    cr = await ready_setup(kmock, ctx)
    del cr["spec"]["autoscaling"]["policyConfigMap"]
    cr["spec"]["autoscaling"]["policy"] = yaml.safe_load(cpu_policy(9))
    cr["metadata"]["generation"] = 2
    await handlers.reconcile(cr, ctx)  # no scale tick in between
    text = get(kmock, CONFIGMAPS, "tiny-cpu-serve-config")["data"]["policy.yaml"]
    assert yaml.safe_load(text)["spec"]["interval_s"] == 9  # a restarted head reads it
    assert policy_puts(kmock)[-1] == text  # and the running one has it now
    status = get(kmock, DEPLOYMENTS, "tiny-cpu")["status"]
    assert status["appliedPolicy"] == handlers.policy_hash(text)
    assert status["observedGeneration"] == 2
    assert conditions({"status": status})["Progressing"]["status"] == "False"


async def test_policy_push_failure_is_retried(kmock, ctx):
    answers = admin_answers(kmock, "put /admin/policy", 503)
    cr = await scaled_setup(kmock, ctx, 2, policy_answer=False)
    kmock["get /admin/demand"] << demand(2, ["10.0.0.0", "10.0.0.1"])
    with pytest.raises(kopf.TemporaryError, match="policy not pushed") as err:
        await handlers.scale(cr, ctx)
    assert err.value.delay == 7
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert "appliedPolicy" not in cr["status"]
    progressing = conditions(cr)["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("True", "PolicyPending")
    assert "HTTP 503" in progressing["message"]
    assert conditions(cr)["Degraded"]["status"] == "False"

    answers["answer"] = POLICY_ACCEPTED
    await handlers.scale(cr, ctx)
    assert len(policy_puts(kmock)) == 2
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert "appliedPolicy" in cr["status"]
    assert conditions(cr)["Progressing"]["status"] == "False"


async def test_refused_policy_is_degraded_and_not_resent_until_it_changes(kmock, ctx):
    answers = admin_answers(kmock, "put /admin/policy", 400)
    cr = await scaled_setup(kmock, ctx, 2, policy_answer=False)
    kmock["get /admin/demand"] << demand(2, ["10.0.0.0", "10.0.0.1"])
    await handlers.scale(cr, ctx)  # a refusal is an answer: no TemporaryError
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    degraded = conditions(cr)["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "PolicyRefused")
    assert "answer 400" in degraded["message"]
    assert conditions(cr)["Progressing"]["status"] == "False"  # nothing more to do
    await handlers.scale(cr, ctx)
    assert len(policy_puts(kmock)) == 1
    assert conditions(get(kmock, DEPLOYMENTS, "tiny-cpu"))["Degraded"]["reason"] == "PolicyRefused"

    # A new policy text is tried again; accepted, the deployment is no longer degraded.
    answers["answer"] = POLICY_ACCEPTED
    cm = get(kmock, CONFIGMAPS, "elasticmoe-policy-default-cpu")
    cm["data"]["policy.yaml"] = cpu_policy(7)
    put(kmock, CONFIGMAPS, cm)
    await handlers.scale(cr, ctx)
    assert policy_puts(kmock)[1:] == [cpu_policy(7)]
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert "policyRefused" not in cr["status"]
    assert conditions(cr)["Degraded"]["status"] == "False"


async def test_invalid_policy_configmap_is_not_sent(kmock, ctx):
    cr = await ready_setup(kmock, ctx)
    cm = get(kmock, CONFIGMAPS, "elasticmoe-policy-default-cpu")
    cm["data"]["policy.yaml"] = cpu_policy(7).replace("- name: cpu", "- name: gpu")
    put(kmock, CONFIGMAPS, cm)
    await handlers.scale(cr, ctx)
    assert len(policy_puts(kmock)) == 1  # only the first, valid one
    degraded = conditions(get(kmock, DEPLOYMENTS, "tiny-cpu"))["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "PolicyRefused"
    assert "spec.autoscaling.policyConfigMap.spec.pools[0]" in degraded["message"]


def with_pool(kmock: km.KubernetesEmulator, cr: dict[str, Any], **bounds: int) -> dict[str, Any]:
    """``cr`` as the user changed it (stored): the cpu pool's new bounds, next generation."""
    cr = copy.deepcopy(cr)
    cr["spec"]["pools"][0].update(bounds)
    cr["metadata"]["generation"] = cr["metadata"].get("generation", 1) + 1
    put(kmock, DEPLOYMENTS, cr)
    return cr


async def test_raised_min_workers_grows_the_group_on_reconcile(kmock, ctx):
    cr = await ready_setup(kmock, ctx, 2)
    await handlers.reconcile(with_pool(kmock, cr, minWorkers=3), ctx)
    group = get(kmock, RAYCLUSTERS, "tiny-cpu")["spec"]["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (3, 3, 4)
    assert len(kmock["post /admin/drain"]) == 0
    status = get(kmock, DEPLOYMENTS, "tiny-cpu")["status"]
    assert status["observedGeneration"] == 2 and status["pools"]["cpu"]["minWorkers"] == 3


async def test_lowered_max_workers_drains_then_shrinks_on_reconcile(kmock, ctx):
    cr = await ready_setup(kmock, ctx, 4)
    kmock["post /admin/drain"] << {"drained": ["w3", "w2"], "epoch": 4}
    await handlers.reconcile(with_pool(kmock, cr, maxWorkers=2), ctx)
    (drain,) = list(kmock["post /admin/drain"])
    assert drain.data == {"nodes": ["10.0.0.3", "10.0.0.2"]}
    # KubeRay never saw maxReplicas below the pods it had before the drain was done.
    patches = [r.data for r in kmock[km.method.PATCH, RAYCLUSTERS]]
    for patch in patches:
        (g,) = patch["spec"]["workerGroupSpecs"]
        assert g["maxReplicas"] >= g["replicas"]
        assert g["replicas"] == 4 or g.get("scaleStrategy", {}).get("workersToDelete")
    group = get(kmock, RAYCLUSTERS, "tiny-cpu")["spec"]["workerGroupSpecs"][0]
    assert (group["replicas"], group["maxReplicas"]) == (2, 2)
    assert group["scaleStrategy"] == {"workersToDelete": ["tiny-cpu-cpu-3", "tiny-cpu-cpu-2"]}
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert cr["status"]["pools"]["cpu"]["maxWorkers"] == 2
    assert conditions(cr)["Progressing"]["status"] == "False"


async def test_lowered_max_workers_waits_for_a_refused_drain(kmock, ctx):
    cr = await ready_setup(kmock, ctx, 4)
    drain = admin_answers(kmock, "post /admin/drain", 409)
    changed = with_pool(kmock, cr, maxWorkers=2)
    await handlers.reconcile(changed, ctx)
    group = get(kmock, RAYCLUSTERS, "tiny-cpu")["spec"]["workerGroupSpecs"][0]
    assert (group["replicas"], group["maxReplicas"]) == (4, 4) and "scaleStrategy" not in group
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    progressing = conditions(cr)["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("True", "PoolBoundsPending")
    assert "cpu 4>2" in progressing["message"]
    assert conditions(cr)["Degraded"]["reason"] == "DrainRefused"

    # The next scale tick, with the drain accepted, finishes the change.
    drain["answer"] = {"drained": ["w3", "w2"], "epoch": 4}
    await handlers.scale(cr, ctx)
    group = get(kmock, RAYCLUSTERS, "tiny-cpu")["spec"]["workerGroupSpecs"][0]
    assert (group["replicas"], group["maxReplicas"]) == (2, 2)
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert conditions(cr)["Progressing"]["status"] == "False"
    assert conditions(cr)["Degraded"]["status"] == "False"


async def test_progressing_follows_a_change_until_it_settles(kmock, ctx):
    cr = cpu_setup(kmock)
    await handlers.reconcile(cr, ctx)
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    progressing = conditions(cr)["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("True", "RayClusterStarting")
    assert conditions(cr)["Ready"]["status"] == "False"

    # KubeRay brings the cluster up; the scale pass pushes the policy: settled.
    rc = get(kmock, RAYCLUSTERS, "tiny-cpu")
    rc["status"] = {"state": "ready"}
    put(kmock, RAYCLUSTERS, rc)
    for i in range(2):
        put(kmock, PODS, worker_pod(f"tiny-cpu-cpu-{i}", f"10.0.0.{i}", f"2026-01-01T00:0{i}:00Z"))
    kmock["get /admin/demand"] << demand(2, ["10.0.0.0", "10.0.0.1"])
    answers = admin_answers(kmock, "put /admin/policy", POLICY_ACCEPTED)
    await handlers.scale(cr, ctx)
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert conditions(cr)["Progressing"]["status"] == "False"
    assert conditions(cr)["Ready"]["status"] == "True"

    # A spec change KubeRay has not acted on yet (its observedGeneration lags) is
    # progressing; a policy the admin API cannot take yet too.
    answers["answer"] = 503
    rc = get(kmock, RAYCLUSTERS, "tiny-cpu")
    rc["metadata"]["generation"] = 2
    rc["status"] = {"state": "ready", "observedGeneration": 1}
    put(kmock, RAYCLUSTERS, rc)
    cm = get(kmock, CONFIGMAPS, "elasticmoe-policy-default-cpu")
    cm["data"]["policy.yaml"] = cpu_policy(7)
    put(kmock, CONFIGMAPS, cm)
    with pytest.raises(kopf.TemporaryError):
        await handlers.scale(cr, ctx)
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    progressing = conditions(cr)["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("True", "RayClusterStarting")
    assert "policy not pushed yet" in progressing["message"]

    answers["answer"] = POLICY_ACCEPTED
    rc["status"]["observedGeneration"] = 2
    put(kmock, RAYCLUSTERS, rc)
    await handlers.scale(cr, ctx)
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert conditions(cr)["Progressing"]["status"] == "False"
    assert cr["status"]["appliedPolicy"] == handlers.policy_hash(cpu_policy(7))


# ------------------------------------------------------------ checkpoint rollout
SERVICES = km.resource("", "v1", "services")


def requests_of(kmock: km.KubernetesEmulator) -> list[tuple[str, str]]:
    return [(r.method.value, r.url.path) for r in kmock]


async def test_new_checkpoint_rolls_out_blue_green(kmock, ctx):
    cr = await ready_setup(kmock, ctx, 2)
    svc = get(kmock, SERVICES, "tiny-cpu")
    assert svc["spec"]["selector"] == {"ray.io/cluster": "tiny-cpu", "ray.io/node-type": "head"}
    assert cr["status"]["endpoint"] == f"http://tiny-cpu.{NS}.svc:8000/v1"
    old_rc = get(kmock, RAYCLUSTERS, "tiny-cpu")
    old_cm = get(kmock, CONFIGMAPS, "tiny-cpu-serve-config")
    health = admin_answers(kmock, "get /health", 503)

    cr = copy.deepcopy(cr)
    cr["spec"]["model"]["checkpoint"] = {"uri": "file:///models/v2"}
    cr["metadata"]["generation"] = 2
    put(kmock, DEPLOYMENTS, cr)
    target = f"tiny-cpu-{rollout.checkpoint_hash(cr['spec'])}"

    # 1. The new RayCluster comes up next to the running one, which is left alone.
    with pytest.raises(kopf.TemporaryError, match=f"RayCluster {target}"):
        await handlers.reconcile(cr, ctx)
    new_rc = get(kmock, RAYCLUSTERS, target)
    new_cm = get(kmock, CONFIGMAPS, f"{target}-serve-config")
    serve = yaml.safe_load(new_cm["data"]["serve.yaml"])
    assert serve["model"] == "/models/v2" and serve["name"] == target
    volumes = new_rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": f"{target}-serve-config"}} in volumes
    assert new_rc["metadata"]["ownerReferences"][0]["uid"] == "uid-cpu"
    assert get(kmock, RAYCLUSTERS, "tiny-cpu")["spec"] == old_rc["spec"]
    assert get(kmock, CONFIGMAPS, "tiny-cpu-serve-config")["data"] == old_cm["data"]
    assert get(kmock, SERVICES, "tiny-cpu")["spec"]["selector"]["ray.io/cluster"] == "tiny-cpu"
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert cr["status"]["rayCluster"] == "tiny-cpu"
    assert cr["status"]["rollout"]["phase"] == "Starting"
    progressing = conditions(cr)["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("True", "RolloutStarting")
    assert conditions(cr)["Ready"]["status"] == "True"  # the old one still serves

    # 2. Ready, but its /health does not answer 200 yet: still no switch.
    new_rc["status"] = {"state": "ready"}
    put(kmock, RAYCLUSTERS, new_rc)
    with pytest.raises(kopf.TemporaryError, match="/health"):
        await handlers.reconcile(cr, ctx)
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert conditions(cr)["Progressing"]["reason"] == "RolloutVerifying"
    assert get(kmock, SERVICES, "tiny-cpu")["spec"]["selector"]["ray.io/cluster"] == "tiny-cpu"

    # 3. Healthy: the Service moves to the new head; the old one drains for a while.
    health["answer"] = {"status": "ok", "engines": 1}
    with pytest.raises(kopf.TemporaryError, match="drains") as err:
        await handlers.reconcile(cr, ctx)
    assert err.value.delay == 30
    assert get(kmock, SERVICES, "tiny-cpu")["spec"]["selector"]["ray.io/cluster"] == target
    assert get(kmock, RAYCLUSTERS, "tiny-cpu") is not None  # still finishing its requests
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert cr["status"]["rayCluster"] == target
    assert cr["status"]["endpoint"] == f"http://tiny-cpu.{NS}.svc:8000/v1"  # unchanged for users
    assert cr["status"]["rollout"]["phase"] == "Draining"
    assert conditions(cr)["Progressing"]["reason"] == "RolloutDraining"
    assert "appliedPolicy" in cr["status"]  # pushed again, to the new deployment

    # 4. After the drain time the old RayCluster and its ConfigMap go.
    ctx.now = lambda: "2026-01-01T00:00:31Z"
    await handlers.reconcile(cr, ctx)
    assert get(kmock, RAYCLUSTERS, "tiny-cpu") is None
    assert get(kmock, CONFIGMAPS, "tiny-cpu-serve-config") is None
    assert get(kmock, RAYCLUSTERS, target) is not None
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert "rollout" not in cr["status"]
    assert conditions(cr)["Progressing"]["status"] == "False"

    # The order: new cluster healthy, then the switch, then the old one deleted.
    reqs = requests_of(kmock)
    healthy_at = max(i for i, r in enumerate(reqs) if r == ("GET", "/health"))
    switched_at = min(
        i
        for i, r in enumerate(reqs)
        if r == ("PATCH", f"/api/v1/namespaces/{NS}/services/tiny-cpu") and i > healthy_at
    )
    deleted_at = reqs.index(("DELETE", f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/tiny-cpu"))
    assert healthy_at < switched_at < deleted_at

    # The scale timer now sizes the new cluster.
    before = len(requests_of(kmock))
    await handlers.scale(cr, ctx)
    assert ("GET", f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/{target}") in requests_of(kmock)[
        before:
    ]
    await handlers.delete(cr, ctx)
    assert get(kmock, RAYCLUSTERS, target) is None and get(kmock, SERVICES, "tiny-cpu") is None


async def test_another_checkpoint_mid_rollout_replaces_the_new_cluster(kmock, ctx):
    cr = await ready_setup(kmock, ctx, 3)
    targets = []
    for generation, uri in ((2, "file:///models/v2"), (3, "file:///models/v3")):
        cr = copy.deepcopy(get(kmock, DEPLOYMENTS, "tiny-cpu"))
        cr["spec"]["model"]["checkpoint"] = {"uri": uri}
        cr["metadata"]["generation"] = generation
        put(kmock, DEPLOYMENTS, cr)
        targets.append(f"tiny-cpu-{rollout.checkpoint_hash(cr['spec'])}")
        with pytest.raises(kopf.TemporaryError):
            await handlers.reconcile(cr, ctx)
    assert get(kmock, RAYCLUSTERS, targets[0]) is None  # never took traffic: gone
    assert get(kmock, CONFIGMAPS, f"{targets[0]}-serve-config") is None
    new_rc = get(kmock, RAYCLUSTERS, targets[1])
    # It starts as large as the running cluster, which it replaces.
    assert new_rc["spec"]["workerGroupSpecs"][0]["replicas"] == 3
    status = get(kmock, DEPLOYMENTS, "tiny-cpu")["status"]
    assert status["rollout"]["target"] == targets[1] and status["rayCluster"] == "tiny-cpu"
    assert get(kmock, RAYCLUSTERS, "tiny-cpu") is not None


async def test_checkpoint_reverted_mid_rollout_drops_the_new_cluster(kmock, ctx):
    cr = await ready_setup(kmock, ctx, 2)
    original = copy.deepcopy(cr["spec"])
    cr = copy.deepcopy(cr)
    cr["spec"]["model"]["checkpoint"] = {"uri": "file:///models/v2"}
    cr["metadata"]["generation"] = 2
    put(kmock, DEPLOYMENTS, cr)
    target = f"tiny-cpu-{rollout.checkpoint_hash(cr['spec'])}"
    with pytest.raises(kopf.TemporaryError):
        await handlers.reconcile(cr, ctx)
    assert get(kmock, RAYCLUSTERS, target) is not None

    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    cr["spec"] = original
    cr["metadata"]["generation"] = 3
    put(kmock, DEPLOYMENTS, cr)
    await handlers.reconcile(cr, ctx)
    assert get(kmock, RAYCLUSTERS, target) is None
    assert get(kmock, CONFIGMAPS, f"{target}-serve-config") is None
    cr = get(kmock, DEPLOYMENTS, "tiny-cpu")
    assert cr["status"]["rayCluster"] == "tiny-cpu" and "rollout" not in cr["status"]
    assert conditions(cr)["Progressing"]["status"] == "False"
