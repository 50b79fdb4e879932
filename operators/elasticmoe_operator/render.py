"""Pure functions: a validated MoEDeployment spec in, Kubernetes objects (plain dicts) out.

Nothing here talks to Kubernetes or to the controller; :mod:`handlers` does
that and calls these. The objects follow KubeRay's ``ray.io/v1`` API
(``headGroupSpec``, ``workerGroupSpecs[].groupName/replicas/minReplicas/
maxReplicas/rayStartParams/template``, ``scaleStrategy.workersToDelete``,
``gcsFaultToleranceOptions``).

One expert worker runs per worker pod: a pool's ``devicesPerWorker``
accelerators go to the pod and are advertised to Ray, and the Serve config
asks that many per worker, so Ray places exactly one worker per pod. The
controller's worker counts are therefore pod counts, and draining a pod's IP
(the Ray node IP) drains exactly the worker that goes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from elasticmoe.serve.ingress import direct_ingress_environment
from operators.elasticmoe_operator import crd

RAY_API_VERSION = "ray.io/v1"
MANAGED_BY = "elasticmoe-operator"
LABEL_DEPLOYMENT = "elasticmoe.io/deployment"
LABEL_ROLE = "elasticmoe.io/role"  # engine (the head: controller + engines) | worker
LABEL_POOL = "elasticmoe.io/pool"
RAY_LABEL_CLUSTER = "ray.io/cluster"
RAY_LABEL_GROUP = "ray.io/group"

CONFIG_DIR = "/etc/elasticmoe"
SERVE_CONFIG_FILE = "serve.yaml"
POLICY_FILE = "policy.yaml"
POLICY_DIR = f"{CONFIG_DIR}/policy"
MODELS_DIR = "/models"
HOME_DIR = "/tmp/elasticmoe"
DEFAULT_PORT = 8000
METRICS_PORT = 8080
# Fixed Ray ports, so that the chart's NetworkPolicy can let worker pods talk Ray to
# each other on these while only engines (the head pod) reach the rest, where
# every expert worker's gRPC server listens. Keep in sync with helm values
# networkPolicy.rayPorts (a test checks).
RAY_PORTS: dict[str, int] = {
    "node-manager-port": 6380,
    "object-manager-port": 6381,
    "runtime-env-agent-port": 6382,
    "dashboard-agent-grpc-port": 6383,
    "dashboard-agent-listen-port": 52365,
    "metrics-export-port": METRICS_PORT,
    "min-worker-port": 10002,
    "max-worker-port": 10999,
}
GCS_PORT = 6379
# Every expert worker's gRPC server listens on this port (one worker per pod), so the
# NetworkPolicies can name it: engines and peer workers (weight copies) reach it.
# Keep in sync with helm values networkPolicy.expertGrpcPort (a test checks).
EXPERT_GRPC_PORT = 50051
# Pods run as this non-root user (Pod Security "restricted").
RUN_AS_USER = 1000
# /dev/shm (Ray's object store) when the pool or head does not say.
DEFAULT_SHARED_MEMORY = "2Gi"
# The Secret the operator creates per deployment (never overwritten): the token that
# authenticates Ray and elasticmoe's gRPC between the pods, and the admin API key
# (unless spec.serve.adminKeySecret names another).
AUTH_TOKEN_KEY = "cluster-token"
AUTH_ADMIN_KEY = "admin-api-key"

ACCELERATOR_TO_DEVICE = {"nvidia.com/gpu": "cuda", "huawei.com/Ascend910": "npu", "cpu": "cpu"}
# The Ray resource a pool's accelerator becomes. KubeRay maps nvidia.com/gpu limits
# to GPU itself but knows nothing about Ascend, so NPU is declared in rayStartParams.
POOL_RESOURCE_PREFIX = "elasticmoe.io/pool-"
ACCELERATOR_TO_RAY = {"nvidia.com/gpu": "GPU", "huawei.com/Ascend910": "NPU", "cpu": "CPU"}

Obj = dict[str, Any]


# ------------------------------------------------------------------ names
def raycluster_name(name: str) -> str:
    """The RayCluster of a MoEDeployment has the same name."""
    return name


def config_map_name(name: str) -> str:
    """The ConfigMap holding the rendered ``serve.yaml`` (and an inline policy)."""
    return f"{name}-serve-config"


def auth_secret_name(name: str) -> str:
    """The operator-created Secret with the cluster token and the admin API key."""
    return f"{name}-auth"


def admin_key_ref(name: str, spec: Obj) -> Obj:
    """Where the admin API key is: ``spec.serve.adminKeySecret``, else the auth Secret."""
    return spec.get("serve", {}).get("adminKeySecret") or {
        "name": auth_secret_name(name),
        "key": AUTH_ADMIN_KEY,
    }


def head_service_name(name: str) -> str:
    """KubeRay's head Service: ``<raycluster>-head-svc``."""
    return f"{raycluster_name(name)}-head-svc"


def serve_port(spec: Obj) -> int:
    """The HTTP port of the Serve app."""
    return int(spec.get("serve", {}).get("port", DEFAULT_PORT))


def admin_url(name: str, namespace: str, spec: Obj) -> str:
    """In-cluster base URL of the Serve app (OpenAI API and ``/admin``)."""
    return f"http://{head_service_name(name)}.{namespace}.svc:{serve_port(spec)}"


def labels(name: str, **extra: str) -> dict[str, str]:
    """Labels every child object carries."""
    return {
        "app.kubernetes.io/name": "elasticmoe",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_DEPLOYMENT: name,
        **extra,
    }


def owner_reference(owner: Obj) -> Obj:
    """An ownerReference to the MoEDeployment: its children go when it goes."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", crd.API_VERSION),
        "kind": owner.get("kind", crd.KIND),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(name: str, owner: Obj, obj_name: str, **extra_labels: str) -> Obj:
    return {
        "name": obj_name,
        "namespace": owner["metadata"]["namespace"],
        "labels": labels(name, **extra_labels),
        "ownerReferences": [owner_reference(owner)],
    }


# ------------------------------------------------------------- accelerators
def device_of(pool: Obj) -> str:
    """elasticmoe's device name for a pool (``cuda`` | ``npu`` | ``cpu``)."""
    return ACCELERATOR_TO_DEVICE[pool["accelerator"]]


def ray_resources(pool: Obj) -> dict[str, int]:
    """Ray resources one worker pod of ``pool`` advertises for its expert worker."""
    return {
        ACCELERATOR_TO_RAY[pool["accelerator"]]: int(pool["devicesPerWorker"]),
        pool_resource(pool["name"]): 1,
    }


def pool_resource(name: str) -> str:
    """The custom Ray resource a worker pod of pool ``name`` advertises (one: one worker
    per pod) and its worker asks for: two pools of the same device (two CPU pools, two
    GPU models) keep their workers on their own pods."""
    return f"{POOL_RESOURCE_PREFIX}{name}"


def _quoted_json(obj: Obj) -> str:
    """KubeRay's format for custom resources: a JSON object inside double quotes."""
    return '"' + json.dumps(obj).replace('"', '\\"') + '"'


def ray_start_params(pool: Obj) -> dict[str, str]:
    """``rayStartParams`` of a pool's worker group (all values are strings in KubeRay)."""
    n = int(pool["devicesPerWorker"])
    params = {k: str(v) for k, v in RAY_PORTS.items()}
    params["object-store-memory"] = str(
        object_store_bytes(pool.get("sharedMemory", DEFAULT_SHARED_MEMORY))
    )
    custom = {pool_resource(pool["name"]): 1}
    if pool["accelerator"] == "nvidia.com/gpu":
        params["num-gpus"] = str(n)
    elif pool["accelerator"] == "huawei.com/Ascend910":
        custom = {"NPU": n, **custom}
    else:
        params["num-cpus"] = str(n)
    params["resources"] = _quoted_json(custom)
    return params


def container_resources(pool: Obj) -> Obj:
    """Requests/limits of a worker container: the pool's plus its accelerators."""
    given = pool.get("resources", {})
    requests = dict(given.get("requests", {}))
    limits = dict(given.get("limits", {}))
    n = int(pool["devicesPerWorker"])
    if pool["accelerator"] == "cpu":
        requests.setdefault("cpu", str(n))
    else:
        # Extended resources: requests must equal limits.
        requests[pool["accelerator"]] = n
        limits[pool["accelerator"]] = n
        requests.setdefault("cpu", "2")
    requests.setdefault("memory", "8Gi")
    return _with_limits({"requests": requests, "limits": limits})


def _with_limits(resources: Obj) -> Obj:
    """A memory limit (the request, unless given): a runaway pod is killed, not its node."""
    limits = resources.setdefault("limits", {})
    limits.setdefault("memory", resources["requests"]["memory"])
    return resources


_QUANTITY_UNITS = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip


def quantity_bytes(quantity: str) -> int:
    """Bytes of a Kubernetes memory quantity such as ``2Gi`` or ``500M``."""
    import re

    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(|k|M|G|T|Ki|Mi|Gi|Ti)", str(quantity))
    if m is None:
        raise ValueError(f"{quantity!r} is not a memory quantity such as 2Gi or 512Mi")
    return int(float(m.group(1)) * _QUANTITY_UNITS[m.group(2)])


def object_store_bytes(shared_memory: str) -> int:
    """Ray's object store in a pod: 80% of its /dev/shm, leaving room for the rest."""
    return quantity_bytes(shared_memory) * 4 // 5


# ------------------------------------------------------------ serve config
def model_path(spec: Obj) -> str:
    """What ``ServeConfig.model`` is for the checkpoint location."""
    ckpt = spec["model"]["checkpoint"]
    if "pvc" in ckpt:
        sub = ckpt["pvc"].get("path", "").strip("/")
        return f"{MODELS_DIR}/{sub}" if sub else MODELS_DIR
    uri = ckpt["uri"]
    if uri.startswith("builtin:"):
        return uri.removeprefix("builtin:")
    return "/" + uri.removeprefix("file:///")


def policy_path(spec: Obj) -> str | None:
    """Where the head pod finds the autoscaling policy, if there is one."""
    auto = spec.get("autoscaling", {})
    if "policy" in auto:
        return f"{CONFIG_DIR}/{POLICY_FILE}"
    if "policyConfigMap" in auto:
        return f"{POLICY_DIR}/{auto['policyConfigMap'].get('key', POLICY_FILE)}"
    return None


def state_store_url(spec: Obj) -> str:
    """``ServeConfig.state_store`` (without the password, which comes from a Secret)."""
    store = spec.get("stateStore", {})
    if store.get("type") != "redis":
        return "memory://"
    redis = store["redis"]
    return f"redis://{redis['address']}/{redis.get('db', 0)}"


def initial_replicas(spec: Obj) -> dict[str, int]:
    """Worker pods per pool at creation: room for each pool's initial workers (the
    first pool's also for the spares)."""
    serve = spec.get("serve", {})
    out = {}
    for i, pool in enumerate(spec["pools"]):
        n = max(pool["minWorkers"], pool_num_workers(spec, i))
        if i == 0:
            n = max(n, pool_num_workers(spec, 0) + serve.get("spareWorkers", 0))
        out[pool["name"]] = min(n, pool["maxWorkers"])
    return out


def pool_num_workers(spec: Obj, index: int) -> int:
    """Workers the controller starts with in pool ``index``: its minWorkers (at least
    one in the first pool, so the deployment serves from the start)."""
    pool = spec["pools"][index]
    return min(max(1 if index == 0 else 0, pool["minWorkers"]), pool["maxWorkers"])


def num_workers(spec: Obj) -> int:
    """Workers the controller starts with, over all pools."""
    return sum(pool_num_workers(spec, i) for i in range(len(spec["pools"])))


def render_pool_config(spec: Obj, index: int) -> Obj:
    """One entry of the serve config's ``pools``: the pool's device, the Ray resources
    each of its workers asks for (what its pods advertise), and its worker counts."""
    pool = spec["pools"][index]
    device = device_of(pool)
    n = int(pool["devicesPerWorker"])
    out: Obj = {
        "name": pool["name"],
        "device": device,
        "num_workers": pool_num_workers(spec, index),
        "max_workers": pool["maxWorkers"],
        "worker_num_cpus": float(n) if device == "cpu" else 1.0,
        "worker_num_gpus": float(n) if device == "cuda" else 0.0,
        "worker_resources": {
            **({"NPU": float(n)} if device == "npu" else {}),
            pool_resource(pool["name"]): 1.0,
        },
    }
    if "slotsPerWorker" in pool:
        out["slots_per_worker"] = pool["slotsPerWorker"]
    if "expertMemory" in pool:
        out["expert_memory_gb"] = quantity_bytes(pool["expertMemory"]) / 2**30
    return out


def render_serve_config(name: str, spec: Obj) -> Obj:
    """The ``ServeConfig`` of ``elasticmoe serve`` in the head pod (keys it accepts)."""
    primary = spec["pools"][0]
    engines = spec.get("engines", {})
    serve = spec.get("serve", {})
    cfg: Obj = {
        "model": model_path(spec),
        "mode": "distributed",
        "name": name,
        # every pool, each with its own resources; the first gets the spares
        "pools": [render_pool_config(spec, i) for i in range(len(spec["pools"]))],
        "device": device_of(primary),  # the engines' device
        "num_engines": engines.get("replicas", 1),
        "engine_num_cpus": float(engines.get("cpus", 1)),
        "engine_num_gpus": float(engines.get("gpus", 0)),
        "engine": dict(engines.get("settings", {})),
        "router": dict(engines.get("router", {})),
        "ray_address": "auto",
        "state_store": state_store_url(spec),
        "policy": policy_path(spec),
        "host": "0.0.0.0",
        "port": serve_port(spec),
        # the front listens on the port itself: the head pod's Ray was started for it
        # (render_head_group puts Serve's direct-ingress variables on the container)
        "ingress": "direct",
        "worker_grpc_port": EXPERT_GRPC_PORT,
    }
    if spec["model"].get("name"):
        cfg["served_model_name"] = spec["model"]["name"]
    for key, target in (
        ("maxInFlight", "max_in_flight"),
        ("streamInterval", "stream_interval"),
        ("replicasPerExpert", "replicas_per_expert"),
        ("slotsPerWorker", "slots_per_worker"),
        ("spareWorkers", "spare_workers"),
        ("dtype", "dtype"),
    ):
        if key in serve:
            cfg[target] = serve[key]
    return cfg


def render_config_map(name: str, spec: Obj, owner: Obj) -> Obj:
    """The ConfigMap mounted at ``/etc/elasticmoe`` in the head pod."""
    data = {SERVE_CONFIG_FILE: yaml.safe_dump(render_serve_config(name, spec), sort_keys=False)}
    auto = spec.get("autoscaling", {})
    if "policy" in auto:
        data[POLICY_FILE] = yaml.safe_dump(auto["policy"], sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(name, owner, config_map_name(name)),
        "data": data,
    }


# ---------------------------------------------------------------- RayCluster
def _secret_env(env_name: str, ref: Obj) -> Obj:
    return {
        "name": env_name,
        "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}},
    }


def _common_volumes(spec: Obj, shared_memory: str) -> tuple[list[Obj], list[Obj]]:
    volumes: list[Obj] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shared_memory}},
    ]
    mounts: list[Obj] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    ckpt = spec["model"]["checkpoint"]
    if "pvc" in ckpt:
        volumes.append(
            {
                "name": "models",
                "persistentVolumeClaim": {"claimName": ckpt["pvc"]["claimName"], "readOnly": True},
            }
        )
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    return volumes, mounts


def _container_security() -> Obj:
    # The root filesystem stays read-only: Ray and elasticmoe write under /tmp (an
    # emptyDir) only; HOME points there.
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security() -> Obj:
    """Pod Security "restricted": non-root, the runtime's default seccomp profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _common_env(name: str) -> list[Obj]:
    """Every pod: its home on the writable /tmp, and the deployment's cluster token,
    which Ray's token authentication and elasticmoe's gRPC between pods both check."""
    token = {"name": auth_secret_name(name), "key": AUTH_TOKEN_KEY}
    return [
        {"name": "HOME", "value": HOME_DIR},
        {"name": "ELASTICMOE_HOME", "value": HOME_DIR},
        {"name": "RAY_AUTH_MODE", "value": "token"},
        # Ray starts worker processes (engines, HTTP front, expert workers) at nice 15
        # by default; in a serving pod they are the workload.
        {"name": "RAY_worker_niceness", "value": "0"},
        _secret_env("RAY_AUTH_TOKEN", token),
        _secret_env("ELASTICMOE_GRPC_TOKEN", token),
    ]


def _pod_spec(spec: Obj, container: Obj, volumes: list[Obj], placement: Obj) -> Obj:
    pod: Obj = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": _pod_security(),
        # Nothing in a Ray pod talks to the Kubernetes API.
        "automountServiceAccountToken": False,
    }
    if placement.get("nodeSelector"):
        pod["nodeSelector"] = dict(placement["nodeSelector"])
    if placement.get("tolerations"):
        pod["tolerations"] = [dict(t) for t in placement["tolerations"]]
    return pod


def head_command(spec: Obj) -> str:
    """The head container's shell line: start Ray, then ``elasticmoe serve``.

    The RayCluster sets ``ray.io/overwrite-container-cmd``, so KubeRay leaves the
    command alone and hands its generated ``ray start`` in
    ``$KUBERAY_GEN_RAY_START_CMD``; ``--block`` is dropped so ``serve`` runs next.
    No secret is on it: ``elasticmoe serve`` reads the API keys and the Redis
    password from the environment (Ray records a driver's argv for its dashboard).
    """
    cmd = f"elasticmoe serve --config {CONFIG_DIR}/{SERVE_CONFIG_FILE}"
    return f"ulimit -n 65536; ${{KUBERAY_GEN_RAY_START_CMD/--block/}} && exec {cmd}"


def render_head_group(name: str, spec: Obj) -> Obj:
    """``headGroupSpec``: Ray head + controller + engines + HTTP front."""
    head = spec.get("head", {})
    shared_memory = head.get("sharedMemory", DEFAULT_SHARED_MEMORY)
    volumes, mounts = _common_volumes(spec, shared_memory)
    volumes.append({"name": "config", "configMap": {"name": config_map_name(name)}})
    mounts.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
    auto = spec.get("autoscaling", {})
    if "policyConfigMap" in auto:
        volumes.append({"name": "policy", "configMap": {"name": auto["policyConfigMap"]["name"]}})
        mounts.append({"name": "policy", "mountPath": POLICY_DIR, "readOnly": True})
    env = _common_env(name)
    # read by the head's `ray start` (so by Serve's controller and the front it starts
    # here) and by `elasticmoe serve`, which then lets the front listen on the serve port
    direct = direct_ingress_environment(serve_port(spec))
    env += [{"name": k, "value": v} for k, v in direct.items()]
    env.append(_secret_env("ELASTICMOE_ADMIN_API_KEYS", admin_key_ref(name, spec)))
    if "apiKeySecret" in spec.get("serve", {}):
        env.append(_secret_env("ELASTICMOE_API_KEYS", spec["serve"]["apiKeySecret"]))
    store = spec.get("stateStore", {})
    if store.get("type") == "redis" and "passwordSecret" in store["redis"]:
        env.append(_secret_env("ELASTICMOE_REDIS_PASSWORD", store["redis"]["passwordSecret"]))

    resources = {k: dict(v) for k, v in head.get("resources", {}).items()}
    resources.setdefault("requests", {}).setdefault("cpu", "4")
    resources["requests"].setdefault("memory", "16Gi")
    resources = _with_limits(resources)
    engines = spec.get("engines", {})
    # Ray's dashboard (job submission included) answers inside the pod only.
    params = {
        "dashboard-host": "127.0.0.1",
        "object-store-memory": str(object_store_bytes(shared_memory)),
        **{k: str(v) for k, v in RAY_PORTS.items()},
    }
    engine_gpus = engines.get("replicas", 1) * engines.get("gpus", 0)
    if engine_gpus:
        gpus = int(-(-engine_gpus // 1))  # ceil: fractional engines share a GPU
        resources["requests"]["nvidia.com/gpu"] = gpus
        resources.setdefault("limits", {})["nvidia.com/gpu"] = gpus
        params["num-gpus"] = str(gpus)
    port = serve_port(spec)
    container = {
        "name": "ray-head",
        "image": spec["image"],
        "command": ["/bin/bash", "-lc", "--"],
        "args": [head_command(spec)],
        "env": env,
        "ports": [
            {"name": "gcs-server", "containerPort": GCS_PORT},
            {"name": "serve", "containerPort": port},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": _container_security(),
    }
    if spec.get("imagePullPolicy"):
        container["imagePullPolicy"] = spec["imagePullPolicy"]
    return {
        "serviceType": "ClusterIP",
        "rayStartParams": params,
        "template": {
            "metadata": {"labels": labels(name, **{LABEL_ROLE: "engine"})},
            "spec": _pod_spec(spec, container, volumes, head),
        },
    }


def render_worker_group(name: str, spec: Obj, pool: Obj, replicas: int) -> Obj:
    """One ``workerGroupSpecs`` entry for ``pool``."""
    volumes, mounts = _common_volumes(spec, pool.get("sharedMemory", DEFAULT_SHARED_MEMORY))
    container = {
        "name": "ray-worker",
        "image": spec["image"],
        "command": ["/bin/bash", "-lc", "--"],
        "args": ["ulimit -n 65536; exec $KUBERAY_GEN_RAY_START_CMD"],
        "env": _common_env(name),
        "ports": [
            {"name": "metrics", "containerPort": METRICS_PORT},
            {"name": "expert-grpc", "containerPort": EXPERT_GRPC_PORT},
        ],
        "resources": container_resources(pool),
        "volumeMounts": mounts,
        "securityContext": _container_security(),
    }
    if spec.get("imagePullPolicy"):
        container["imagePullPolicy"] = spec["imagePullPolicy"]
    pod_labels = labels(name, **{LABEL_ROLE: "worker", LABEL_POOL: pool["name"]})
    return {
        "groupName": pool["name"],
        "replicas": replicas,
        "minReplicas": pool["minWorkers"],
        "maxReplicas": pool["maxWorkers"],
        "rayStartParams": ray_start_params(pool),
        "template": {
            "metadata": {"labels": pod_labels},
            "spec": _pod_spec(spec, container, volumes, pool),
        },
    }


def render_raycluster(
    name: str, spec: Obj, owner: Obj, replicas: dict[str, int] | None = None
) -> Obj:
    """The RayCluster: a head group and one worker group per pool.

    ``replicas`` are the current worker counts per pool (the scale loop owns
    them); missing pools start at :func:`initial_replicas`. Every count is kept
    within the pool's min/max.
    """
    start = initial_replicas(spec)
    groups = []
    for pool in spec["pools"]:
        n = (replicas or {}).get(pool["name"], start[pool["name"]])
        n = clamp(n, pool["minWorkers"], pool["maxWorkers"])
        groups.append(render_worker_group(name, spec, pool, n))
    out: Obj = {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayCluster",
        "metadata": {
            **_meta(name, owner, raycluster_name(name)),
            # KubeRay keeps our container command; its `ray start` is in an env var.
            "annotations": {"ray.io/overwrite-container-cmd": "true"},
        },
        "spec": {
            "rayVersion": spec.get("rayVersion", "2.60.0"),
            # The elasticmoe controller, not Ray's autoscaler, decides worker counts.
            "enableInTreeAutoscaling": False,
            "headGroupSpec": render_head_group(name, spec),
            "workerGroupSpecs": groups,
        },
    }
    store = spec.get("stateStore", {})
    if store.get("type") == "redis":
        redis = store["redis"]
        gcs: Obj = {"redisAddress": redis["address"]}
        if "passwordSecret" in redis:
            ref = redis["passwordSecret"]
            gcs["redisPassword"] = {
                "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}
            }
        out["spec"]["gcsFaultToleranceOptions"] = gcs
    return out


def render_auth_secret(name: str, owner: Obj, token: str, admin_key: str) -> Obj:
    """The deployment's auth Secret (the handler makes the random values once)."""
    import base64

    def b64(v: str) -> str:
        return base64.b64encode(v.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(name, owner, auth_secret_name(name)),
        "type": "Opaque",
        "data": {AUTH_TOKEN_KEY: b64(token), AUTH_ADMIN_KEY: b64(admin_key)},
    }


def render_children(name: str, spec: Obj, owner: Obj, replicas: dict[str, int] | None = None):
    """Every object a MoEDeployment owns, in creation order."""
    return [
        render_config_map(name, spec, owner),
        render_raycluster(name, spec, owner, replicas),
    ]


# ------------------------------------------------------------------ scaling
def clamp(n: int, low: int, high: int) -> int:
    """``n`` within ``[low, high]``."""
    return max(low, min(high, n))


def group_replicas(raycluster: Obj) -> dict[str, int]:
    """Current ``replicas`` of every worker group."""
    return {
        g["groupName"]: int(g.get("replicas", 0))
        for g in raycluster.get("spec", {}).get("workerGroupSpecs", [])
    }


@dataclass(frozen=True)
class PoolScale:
    """What to do with one worker group: grow, shrink (after a drain) or stay."""

    pool: str
    current: int
    desired: int
    remove_pods: tuple[str, ...] = ()
    drain_nodes: tuple[str, ...] = ()

    @property
    def shrinks(self) -> bool:
        """Whether pods go (which needs a drain first when they run workers)."""
        return self.desired < self.current


@dataclass(frozen=True)
class ScalePlan:
    """Changes for every pool; empty ``changes`` means nothing to do."""

    pools: dict[str, PoolScale] = field(default_factory=dict)

    @property
    def changes(self) -> list[PoolScale]:
        """Pools whose replicas change."""
        return [p for p in self.pools.values() if p.desired != p.current]

    @property
    def drain_nodes(self) -> list[str]:
        """Node IPs to drain before any shrink is applied."""
        return [ip for p in self.changes for ip in p.drain_nodes]


def _pod_sort_key(pod: Obj, workers_on: dict[str, list[Obj]]) -> tuple[bool, bool, int]:
    """Cheapest pod to remove first: not running, no healthy worker, fewest workers."""
    ip = pod.get("status", {}).get("podIP")
    running = pod.get("status", {}).get("phase") == "Running" and bool(ip)
    here = workers_on.get(ip, []) if ip else []
    healthy = sum(1 for w in here if w.get("healthy", True))
    return (running, healthy > 0, len(here))


def plan_scale(spec: Obj, raycluster: Obj, demand: Obj, pods: list[Obj]) -> ScalePlan:
    """Per pool: the controller's ``desired`` clamped to min/max, and which pods go.

    ``demand`` is ``GET /admin/demand``; ``pods`` the RayCluster's worker pods.
    A pool the demand does not mention keeps its size (within bounds). On
    shrink, pods are picked cheapest first (see :func:`_pod_sort_key`, then newest); the IPs
    of those that run workers must be drained before the group is patched. A shrink
    only ever removes pods named in ``workersToDelete`` (KubeRay would pick the rest
    at random, drained or not), and before the controller has published an expert
    map (``epoch`` missing) nothing shrinks: the demand cannot say where experts are.
    """
    current = group_replicas(raycluster)
    wanted = demand.get("pools", {})
    workers_on: dict[str, list[Obj]] = {}
    for w in demand.get("workers", []):
        workers_on.setdefault(w.get("node", ""), []).append(w)
    pending_delete = {
        p
        for g in raycluster.get("spec", {}).get("workerGroupSpecs", [])
        for p in g.get("scaleStrategy", {}).get("workersToDelete", [])
    }
    has_map = bool(demand.get("epoch"))
    plans = {}
    for pool in spec["pools"]:
        name = pool["name"]
        now = current.get(name, 0)
        target = wanted.get(name, {}).get("desired", now)
        desired = clamp(int(target), pool["minWorkers"], pool["maxWorkers"])
        if not has_map:
            desired = max(desired, now)
        if desired >= now:
            plans[name] = PoolScale(name, now, desired)
            continue
        candidates = [
            p
            for p in pods
            if p.get("metadata", {}).get("labels", {}).get(RAY_LABEL_GROUP) == name
            and p["metadata"]["name"] not in pending_delete
            and not p["metadata"].get("deletionTimestamp")
        ]
        # Newest first among equals (stable sorts): it holds the least state.
        candidates.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True)
        candidates.sort(key=lambda p: _pod_sort_key(p, workers_on))
        victims = candidates[: now - desired]
        drain = tuple(
            ip for p in victims if (ip := p.get("status", {}).get("podIP")) and workers_on.get(ip)
        )
        # Fewer pods than the shrink (some not created yet): shrink by the named ones only.
        desired = now - len(victims)
        plans[name] = PoolScale(
            name, now, desired, tuple(p["metadata"]["name"] for p in victims), drain
        )
    return ScalePlan(plans)


def apply_scale(raycluster: Obj, plan: ScalePlan) -> list[Obj]:
    """The new ``workerGroupSpecs`` list with the plan's replicas and pods to delete."""
    groups = []
    for group in raycluster["spec"].get("workerGroupSpecs", []):
        group = dict(group)
        change = plan.pools.get(group["groupName"])
        if change is not None and change.desired != change.current:
            group["replicas"] = change.desired
            if change.remove_pods:
                group["scaleStrategy"] = {"workersToDelete": list(change.remove_pods)}
        groups.append(group)
    return groups


# ------------------------------------------------------------------- status
def condition(
    type_: str, status: bool | None, reason: str, message: str, now: str, generation: int
) -> Obj:
    """One status condition (``status`` None means Unknown)."""
    assert type_ in crd.CONDITION_TYPES, f"unknown condition type {type_!r}"
    return {
        "type": type_,
        "status": "Unknown" if status is None else ("True" if status else "False"),
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
        "observedGeneration": generation,
    }


def merge_conditions(old: list[Obj], new: list[Obj]) -> list[Obj]:
    """``new`` conditions, keeping a condition's transition time while its status holds."""
    before = {c["type"]: c for c in old or []}
    out = {c["type"]: c for c in old or []}
    for c in new:
        prev = before.get(c["type"])
        if prev is not None and prev.get("status") == c["status"]:
            c = {**c, "lastTransitionTime": prev.get("lastTransitionTime", c["lastTransitionTime"])}
        out[c["type"]] = c
    return [out[t] for t in crd.CONDITION_TYPES if t in out]


def pool_status(spec: Obj, raycluster: Obj, pods: list[Obj], demand: Obj | None) -> Obj:
    """``status.pools``: replicas asked, pods running and the controller's demand."""
    current = group_replicas(raycluster)
    out = {}
    for pool in spec["pools"]:
        name = pool["name"]
        ready = sum(
            1
            for p in pods
            if p.get("metadata", {}).get("labels", {}).get(RAY_LABEL_GROUP) == name
            and p.get("status", {}).get("phase") == "Running"
        )
        entry = {
            "replicas": current.get(name, 0),
            "readyReplicas": ready,
            "minWorkers": pool["minWorkers"],
            "maxWorkers": pool["maxWorkers"],
        }
        if demand is not None and name in demand.get("pools", {}):
            entry["desired"] = clamp(
                int(demand["pools"][name].get("desired", 0)), pool["minWorkers"], pool["maxWorkers"]
            )
        out[name] = entry
    return out
