"""The operator's own loop, as its Deployment runs it, against an emulated API server.

Each test starts ``elasticmoe-operator`` (the console script the Helm chart's
Deployment runs: ``kopf run --standalone -m operators.elasticmoe_operator.main``)
as a process, logged in through a kubeconfig that points at kmock's
KubernetesEmulator (with the additions in :mod:`kube_emulator`). kopf discovers
the MoEDeployment resource, opens real watch streams and runs the handlers; the
tests change objects through the API like ``kubectl`` would and wait for what
the operator writes back. The same kmock server stands in for the controller's
admin API (``GET /admin/demand``), which the scale timer reads.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock as km
import kopf
import pytest
import pytest_asyncio
import yaml
from kube_emulator import ApiServerEmulator, serve_api

from operators.elasticmoe_operator import main
from operators.elasticmoe_operator.config import OperatorConfig

pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=ApiServerEmulator)]

REPO = Path(__file__).resolve().parents[1]
NS = "models"
NAME = "tiny-cpu"
DEPLOYMENTS = km.resource("elasticmoe.io", "v1alpha1", "moedeployments")
RAYCLUSTERS = km.resource("ray.io", "v1", "rayclusters")
CONFIGMAPS = km.resource("", "v1", "configmaps")
SERVICES = km.resource("", "v1", "services")
TIMEOUT_S = 90.0  # generous: the machine is shared and slow; tests never wait this long


def url(res: km.resource, namespace: str = NS, name: str | None = None) -> str:
    prefix = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
    return f"{prefix}/namespaces/{namespace}/{res.plural}" + (f"/{name}" if name else "")


def get(kmock: ApiServerEmulator, res: km.resource, name: str, namespace: str = NS) -> Any:
    key = (res, namespace, name)
    if key not in kmock.objects or kmock.objects[key].deleted:
        return None
    return copy.deepcopy(dict(kmock.objects[key].raw))


def conditions(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj or {}).get("status", {}).get("conditions", [])}


def example(name: str = NAME, namespace: str = NS) -> dict[str, Any]:
    cr = yaml.safe_load((REPO / "examples" / "k8s" / "moedeployment-cpu.yaml").read_text())
    cr["metadata"].update(name=name, namespace=namespace)
    return cr


def demand(desired: int, workers: int = 2) -> dict[str, Any]:
    return {
        "epoch": 5,
        "pools": {"cpu": {"workers": workers, "desired": desired}},
        "workers": [
            {"worker_id": f"w{i}", "pool": "cpu", "node": f"10.0.0.{i}", "healthy": True}
            for i in range(workers)
        ],
    }


def write_kubeconfig(tmp_path: Path, server: str) -> Path:
    """A kubeconfig like a developer's, pointing at the emulated API server."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": server}}],
                "users": [{"name": "operator", "user": {"token": "test-token"}}],
                "contexts": [
                    {"name": "kmock", "context": {"cluster": "kmock", "user": "operator"}}
                ],
                "current-context": "kmock",
            }
        )
    )
    return path


class Operator:
    """``elasticmoe-operator`` in a child process, logged in through a kubeconfig."""

    def __init__(self, tmp_path: Path, server: str, args: list[str]) -> None:
        self.log_path = tmp_path / f"operator-{len(list(tmp_path.glob('operator-*.log')))}.log"
        kubeconfig = write_kubeconfig(tmp_path, server)
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "KUBECONFIG"))
        }
        self.env.update(
            KUBECONFIG=str(kubeconfig),
            ELASTICMOE_OPERATOR_ADMIN_URL=server,
            ELASTICMOE_OPERATOR_SCALE_INTERVAL_S="0.5",
            ELASTICMOE_OPERATOR_RETRY_DELAY_S="0.5",
            ELASTICMOE_OPERATOR_ROLLOUT_DRAIN_S="0",
            PYTHONPATH=str(REPO),
        )
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Operator:
        script = Path(sys.executable).with_name("elasticmoe-operator")
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                str(script), *self.args, "--verbose",
                env=self.env, cwd=REPO, stdout=log, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        return self

    def log(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line[:400] for line in text[-lines:])

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self) -> int:
        """SIGTERM, as Kubernetes stops a pod; kopf shuts down gracefully."""
        assert self.proc is not None
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), TIMEOUT_S)

    async def kill(self) -> None:
        """SIGKILL: the pod dies mid-work (OOM, node loss)."""
        assert self.proc is not None
        self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), TIMEOUT_S)


@pytest_asyncio.fixture
async def api(kmock: ApiServerEmulator) -> AsyncIterator[ApiServerEmulator]:
    """The emulated API server with the CRD, the chart's CPU policy and a canned demand."""
    serve_api(kmock, namespaces=(NS, "other"))
    policy = (REPO / "examples" / "policies" / "default-cpu.yaml").read_text()
    for ns in (NS, "other"):
        kmock.objects[CONFIGMAPS, ns, "elasticmoe-policy-default-cpu"] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "elasticmoe-policy-default-cpu", "namespace": ns},
            "data": {"policy.yaml": policy},
        }
    yield kmock


@pytest.fixture
def admin(api: ApiServerEmulator) -> dict[str, Any]:
    """What ``GET /admin/demand`` answers (change ``admin["demand"]`` to change it)."""
    state = {"demand": demand(2)}
    api["get /admin/demand"] << (lambda: state["demand"])
    api["put /admin/policy"] << {"policy": "default-cpu", "interval_s": 30}
    return state


@pytest_asyncio.fixture
async def operators(api: ApiServerEmulator, admin: dict[str, Any], tmp_path: Path):
    """Start operators with given args; every one still running is stopped at the end."""
    started: list[Operator] = []
    server = str(api.url).rstrip("/")

    async def start(*args: str) -> Operator:
        op = await Operator(tmp_path, server, list(args or ["--all-namespaces"])).start()
        started.append(op)
        return op

    yield start
    for op in started:
        if op.alive:
            await op.stop()


async def until(what: str, check: Callable[[], Any], op: Operator) -> Any:
    """Poll ``check`` until it is truthy; fail with the operator's log on timeout or exit."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT_S
    while True:
        result = check()
        if result:
            return result
        if not op.alive:
            raise AssertionError(f"operator exited while waiting for {what}:\n{op.log()}")
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{op.log()}")
        await asyncio.sleep(0.05)


async def create(kmock: ApiServerEmulator, cr: dict[str, Any]) -> None:
    ns = cr["metadata"]["namespace"]
    resp = await kmock.post(url(DEPLOYMENTS, ns), json=cr)
    assert resp.status in (200, 201), await resp.text()


async def merge_patch(kmock: ApiServerEmulator, res: km.resource, name: str, patch: Any) -> None:
    resp = await kmock.patch(
        url(res, name=name), json=patch, headers={"Content-Type": "application/merge-patch+json"}
    )
    assert resp.status == 200, await resp.text()


def writes(kmock: ApiServerEmulator, method: str, res: km.resource) -> int:
    """How many requests of ``method`` reached ``res`` (whatever their answer)."""
    return sum(1 for r in kmock if r.method.value == method and r.resource == res)


def created(kmock: ApiServerEmulator, res: km.resource, name: str) -> int:
    """How many times the object came into being (a delete-and-recreate counts twice)."""
    history = list(kmock.objects[res, NS, name].history)
    return sum(
        1 for prev, cur in zip([None, *history], history, strict=False) if prev is None and cur
    )


def handled(kmock: ApiServerEmulator, name: str = NAME, namespace: str = NS) -> bool:
    """kopf has recorded the spec it last handled (it is done with the object for now)."""
    cr = get(kmock, DEPLOYMENTS, name, namespace) or {}
    annotations = cr.get("metadata", {}).get("annotations", {})
    return "elasticmoe.io/last-handled-configuration" in annotations


async def test_create_scale_change_delete(api, admin, operators):
    """One deployment's life, and a broken one next to it, under one operator."""
    op = await operators()
    await create(api, example())
    broken = example("broken")
    broken["spec"]["pools"][0]["accelerator"] = "nvidia.com/gpux"
    await create(api, broken)

    def reconciled(generation: int) -> Any:
        cr = get(api, DEPLOYMENTS, NAME)
        ready = conditions(cr).get("Ready")
        return cr if ready and cr["status"].get("observedGeneration") == generation else None

    cr = await until("the first reconcile's status", lambda: reconciled(1), op)
    assert cr["metadata"]["finalizers"] == [main.FINALIZER]
    assert cr["status"]["rayCluster"] == NAME and cr["status"]["pools"]["cpu"]["replicas"] == 2
    ready = conditions(cr)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "RayClusterStarting")
    rc = get(api, RAYCLUSTERS, NAME)
    assert rc["metadata"]["ownerReferences"][0]["uid"] == cr["metadata"]["uid"]
    assert [g["groupName"] for g in rc["spec"]["workerGroupSpecs"]] == ["cpu"]
    assert "serve.yaml" in get(api, CONFIGMAPS, f"{NAME}-serve-config")["data"]

    # A bad spec: Ready=False naming the field, no children, no retries (PermanentError).
    ready = await until(
        "Ready=False on the broken one",
        lambda: conditions(get(api, DEPLOYMENTS, "broken")).get("Ready"),
        op,
    )
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["message"].startswith("spec.pools[0].accelerator: 'nvidia.com/gpux'")
    assert get(api, RAYCLUSTERS, "broken") is None

    # KubeRay's part: the cluster comes up. The controller asks for 3 workers: the scale
    # timer grows the group and reports the demand's epoch.
    await merge_patch(api, RAYCLUSTERS, NAME, {"status": {"state": "ready"}})
    admin["demand"] = demand(3)

    def replicas() -> int:
        return get(api, RAYCLUSTERS, NAME)["spec"]["workerGroupSpecs"][0]["replicas"]

    await until("the worker group grown to 3", lambda: replicas() == 3, op)
    cr = await until(
        "status from the scale timer",
        lambda: (c := get(api, DEPLOYMENTS, NAME)) and c["status"].get("epoch") == 5 and c,
        op,
    )
    await until(
        "Ready=True",
        lambda: conditions(get(api, DEPLOYMENTS, NAME))["Ready"]["status"] == "True",
        op,
    )

    # The policy the spec names reached the running deployment once; an edit of the
    # referenced ConfigMap reaches it too, and the change settles.
    policy_cm = "elasticmoe-policy-default-cpu"
    first = get(api, CONFIGMAPS, policy_cm)["data"]["policy.yaml"]
    await until(
        "the policy pushed",
        lambda: get(api, DEPLOYMENTS, NAME)["status"].get("appliedPolicy"),
        op,
    )
    assert [r.data["policy"] for r in api["put /admin/policy"]][:1] == [first]
    edited = first.replace("interval_s: 15", "interval_s: 20")
    assert edited != first
    await merge_patch(api, CONFIGMAPS, policy_cm, {"data": {"policy.yaml": edited}})
    await until(
        "the edited policy pushed",
        lambda: [r.data["policy"] for r in api["put /admin/policy"]][-1] == edited,
        op,
    )
    await until(
        "Progressing=False",
        lambda: (
            conditions(get(api, DEPLOYMENTS, NAME)).get("Progressing", {}).get("status") == "False"
        ),
        op,
    )
    assert len({r.data["policy"] for r in api["put /admin/policy"]}) == 2

    # A spec change (the API server bumps the generation) reaches the RayCluster; the
    # replicas the timer chose stay.
    pool = {**example()["spec"]["pools"][0], "maxWorkers": 6}
    await merge_patch(api, DEPLOYMENTS, NAME, {"spec": {"pools": [pool]}})
    await until("the change's status", lambda: reconciled(2), op)
    group = get(api, RAYCLUSTERS, NAME)["spec"]["workerGroupSpecs"][0]
    assert group["maxReplicas"] == 6 and group["replicas"] == 3
    assert created(api, RAYCLUSTERS, NAME) == 1
    assert created(api, CONFIGMAPS, f"{NAME}-serve-config") == 1

    # Delete: the children go, then the finalizer, then the object.
    for name in (NAME, "broken"):
        resp = await api.delete(url(DEPLOYMENTS, name=name))
        assert resp.status == 200, await resp.text()
    await until("the MoEDeployment gone", lambda: get(api, DEPLOYMENTS, NAME) is None, op)
    await until("the broken one gone", lambda: get(api, DEPLOYMENTS, "broken") is None, op)
    assert get(api, RAYCLUSTERS, NAME) is None
    assert get(api, CONFIGMAPS, f"{NAME}-serve-config") is None
    assert writes(api, "POST", RAYCLUSTERS) == 1
    assert await op.stop() == 0, op.log()


async def test_checkpoint_change_rolls_out_without_restarting_the_head(api, admin, operators):
    """A new checkpoint: a second RayCluster, the Service switched, the old one deleted."""
    from operators.elasticmoe_operator import rollout

    health = {"answer": km.Response(status=503, payload={"status": "starting"})}
    api["get /health"] << (lambda: health["answer"])
    op = await operators()
    await create(api, example())
    await until("the RayCluster", lambda: get(api, RAYCLUSTERS, NAME), op)
    await merge_patch(api, RAYCLUSTERS, NAME, {"status": {"state": "ready"}})
    await until(
        "Progressing=False",
        lambda: (
            conditions(get(api, DEPLOYMENTS, NAME)).get("Progressing", {}).get("status") == "False"
        ),
        op,
    )
    old_head = get(api, RAYCLUSTERS, NAME)["spec"]["headGroupSpec"]

    spec = example()["spec"]
    spec["model"]["checkpoint"] = {"uri": "file:///models/v2"}
    await merge_patch(api, DEPLOYMENTS, NAME, {"spec": {"model": spec["model"]}})
    target = f"{NAME}-{rollout.checkpoint_hash(spec)}"
    await until("the new RayCluster", lambda: get(api, RAYCLUSTERS, target), op)
    await merge_patch(api, RAYCLUSTERS, target, {"status": {"state": "ready"}})
    await until(
        "the rollout waiting for /health",
        lambda: (
            (get(api, DEPLOYMENTS, NAME)["status"].get("rollout") or {}).get("phase") == "Verifying"
        ),
        op,
    )
    assert get(api, SERVICES, NAME)["spec"]["selector"]["ray.io/cluster"] == NAME
    assert get(api, RAYCLUSTERS, NAME)["spec"]["headGroupSpec"] == old_head  # untouched

    health["answer"] = km.Response(status=200, payload={"status": "ok"})
    await until("the old RayCluster gone", lambda: get(api, RAYCLUSTERS, NAME) is None, op)
    assert get(api, SERVICES, NAME)["spec"]["selector"]["ray.io/cluster"] == target
    cr = await until(
        "the rollout settled",
        lambda: (
            (c := get(api, DEPLOYMENTS, NAME))
            and "rollout" not in c["status"]
            and conditions(c)["Progressing"]["status"] == "False"
            and c
        ),
        op,
    )
    assert cr["status"]["rayCluster"] == target
    assert created(api, RAYCLUSTERS, target) == 1
    resp = await api.delete(url(DEPLOYMENTS, name=NAME))
    assert resp.status == 200, await resp.text()
    await until("the MoEDeployment gone", lambda: get(api, DEPLOYMENTS, NAME) is None, op)
    assert get(api, RAYCLUSTERS, target) is None and get(api, SERVICES, NAME) is None
    assert await op.stop() == 0, op.log()


@pytest.mark.parametrize("change", ["create", "update"])
async def test_restart_mid_reconcile_finishes_without_duplicates(api, operators, change):
    """The operator dies between the ConfigMap write and the RayCluster write."""
    op = await operators()
    if change == "update":
        await create(api, example())
        await until("the RayCluster", lambda: get(api, RAYCLUSTERS, NAME), op)
        hold = api.hold(RAYCLUSTERS, km.action.UPDATE)
        await merge_patch(api, DEPLOYMENTS, NAME, {"spec": {"image": "elasticmoe:0.2.0"}})
    else:
        hold = api.hold(RAYCLUSTERS, km.action.CREATE)
        await create(api, example())
    await until("the RayCluster write in flight", hold.arrived.is_set, op)
    assert get(api, CONFIGMAPS, f"{NAME}-serve-config") is not None
    await op.kill()
    hold.drop()  # the dead operator's write is answered 503 and never lands

    op = await operators()

    def done() -> bool:
        rc = get(api, RAYCLUSTERS, NAME)
        if rc is None:
            return False
        image = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        return change == "create" or image == "elasticmoe:0.2.0"

    await until("the reconcile finished by the new operator", done, op)
    expected_generation = 2 if change == "update" else 1
    await until(
        "status of the finished reconcile",
        lambda: (
            get(api, DEPLOYMENTS, NAME).get("status", {}).get("observedGeneration")
            == expected_generation
        ),
        op,
    )
    await until("kopf done with it", lambda: handled(api), op)
    cr = get(api, DEPLOYMENTS, NAME)
    assert cr["metadata"]["finalizers"] == [main.FINALIZER]
    assert created(api, RAYCLUSTERS, NAME) == 1
    assert created(api, CONFIGMAPS, f"{NAME}-serve-config") == 1
    assert [k for k in api.objects if k[0] == RAYCLUSTERS] == [(RAYCLUSTERS, NS, NAME)]
    if change == "create":  # the dead operator's create was dropped, the new one's landed
        assert writes(api, "POST", RAYCLUSTERS) == 2

    resp = await api.delete(url(DEPLOYMENTS, name=NAME))
    assert resp.status == 200, await resp.text()
    await until("the MoEDeployment gone", lambda: get(api, DEPLOYMENTS, NAME) is None, op)
    assert get(api, RAYCLUSTERS, NAME) is None
    assert await op.stop() == 0, op.log()


async def test_namespaced_operator_serves_only_its_namespace(api, operators):
    """``--namespace=models``, as the chart runs with ``operator.watchNamespaces``."""
    op = await operators(f"--namespace={NS}")
    await create(api, example("elsewhere", "other"))
    await create(api, example())
    await until("the RayCluster in models", lambda: get(api, RAYCLUSTERS, NAME), op)
    await until("kopf done with it", lambda: handled(api), op)
    assert get(api, RAYCLUSTERS, "elsewhere", "other") is None
    assert "finalizers" not in get(api, DEPLOYMENTS, "elsewhere", "other")["metadata"]
    assert await op.stop() == 0, op.log()


async def test_kopf_operator_in_process(api, admin, tmp_path, monkeypatch):
    """``kopf.operator()`` in this process, as the issue first tried it, on the same server."""
    server = str(api.url).rstrip("/")
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path, server)))
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(var, raising=False)
    # main read its settings at import; the login handler builds the context from these.
    monkeypatch.setattr(main, "CONFIG", OperatorConfig(admin_url=server, retry_delay_s=0.5))
    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=kopf.get_default_registry(),  # where main's decorators registered
            standalone=True,
            clusterwide=True,
            stop_flag=stop,
        )
    )
    try:
        await create(api, example())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT_S
        while not (get(api, RAYCLUSTERS, NAME) and handled(api)):
            assert not task.done(), f"kopf.operator() ended: {task.exception()!r}"
            assert loop.time() < deadline, "timed out waiting for the RayCluster"
            await asyncio.sleep(0.05)
        assert any(r.params.get("watch") == "true" and r.resource == DEPLOYMENTS for r in api)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)
