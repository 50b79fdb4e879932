"""The operator's pure functions: CRD, spec validation, rendered objects, scale plans.

The rendered RayCluster must be what KubeRay's ``ray.io/v1`` API expects and
every object must pass the Kubernetes schemas (``tests/k8s_schemas.py``); the
rendered ``serve.yaml`` must load with ``elasticmoe serve``'s own loader.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pod_security import hardening_gaps, pod_specs, violations

from elasticmoe.serve.ingress import MAX_ONGOING_REQUESTS, direct_ingress_environment
from elasticmoe.serve.server import direct_ingress, load_serve_config
from operators.elasticmoe_operator import crd, render
from operators.elasticmoe_operator.spec import SpecError, validate_name, validate_spec

from k8s_schemas import validate

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "k8s"
POLICIES = REPO / "examples" / "policies"


def load_cr(kind: str) -> dict[str, Any]:
    cr = yaml.safe_load((EXAMPLES / f"moedeployment-{kind}.yaml").read_text())
    cr["metadata"].update(namespace="models", uid="0c0ffee0-0000-4000-8000-000000000001")
    return cr


def mixed_cr() -> dict[str, Any]:
    """GPU first, NPU and CPU overflow, inline policy over all three."""
    cr = load_cr("gpu")
    cr["metadata"]["name"] = "mixed"
    cr["spec"]["pools"] += [
        {"name": "ascend", "accelerator": "huawei.com/Ascend910", "devicesPerWorker": 2,
         "minWorkers": 0, "maxWorkers": 4},
        {"name": "cpu", "accelerator": "cpu", "devicesPerWorker": 8, "minWorkers": 1,
         "maxWorkers": 2},
    ]  # fmt: skip
    cr["spec"]["autoscaling"] = {
        "policy": {
            "apiVersion": "elasticmoe.io/v1alpha1",
            "kind": "AutoscalingPolicy",
            "metadata": {"name": "mixed"},
            "spec": {
                "pools": [
                    {"name": "gpu", "accelerator": "nvidia.com/gpu", "max_workers": 8},
                    {
                        "name": "ascend",
                        "accelerator": "huawei.com/Ascend910",
                        "min_workers": 0,
                        "max_workers": 4,
                    },
                    {"name": "cpu", "accelerator": "cpu", "max_workers": 2},
                ]
            },
        }
    }
    return cr


CASES = {
    "cpu": lambda: load_cr("cpu"),
    "gpu": lambda: load_cr("gpu"),
    "npu": lambda: load_cr("npu"),
    "mixed": mixed_cr,
    "gpu-npu": lambda: load_cr("gpu-npu"),
}


def rendered(cr: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    spec = validate_spec(cr["spec"])
    return spec, render.render_children(cr["metadata"]["name"], spec, cr)


# ---------------------------------------------------------------------- CRD
def test_chart_crd_file_is_current():
    assert crd.CHART_CRD_PATH.read_text() == crd.crd_yaml(), (
        "helm/elasticmoe/crds is stale: run `make golden`"
    )


def test_crd_is_a_valid_structural_crd():
    obj = crd.crd()
    validate(obj)
    version = obj["spec"]["versions"][0]
    assert version["served"] and version["storage"] and version["subresources"] == {"status": {}}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Ready", "Workers"}

    def walk(node: dict[str, Any], path: str) -> None:
        # Structural: every node says its type, or is int-or-string / free-form.
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path}: no type"
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{key}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(version["schema"]["openAPIV3Schema"], "")


@pytest.mark.parametrize("kind", ["cpu", "gpu", "npu", "gpu-npu"])
def test_example_resources_validate_against_the_crd(kind):
    validate(load_cr(kind))
    validate_spec(load_cr(kind)["spec"])


# --------------------------------------------------------------- bad specs
@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda s: s["pools"][0].update(accelerator="nvidia.com/gpux"),
         "spec.pools[0].accelerator", "'nvidia.com/gpux' is not one of"),
        (lambda s: s["pools"][0].update(minWorkers=9), "spec.pools[0].minWorkers", "> maxWorkers"),
        (lambda s: s["pools"].append(dict(s["pools"][0])), "spec.pools[1].name", "used by another"),
        (lambda s: s["pools"][0].update(name="GPU"), "spec.pools[0].name", "does not match"),
        (lambda s: s.pop("image"), "spec", "'image' is a required property"),
        (lambda s: s["model"]["checkpoint"].update(uri="s3://bucket/m"),
         "spec.model.checkpoint.uri", "does not match"),
        (lambda s: s["model"]["checkpoint"].update(uri="builtin:default"),
         "spec.model.checkpoint", "exactly one of pvc or uri"),
        (lambda s: s["stateStore"].update(type="etcd"), "spec.stateStore.type", "is not one of"),
        (lambda s: s["autoscaling"].update(policy={"kind": "AutoscalingPolicy"}),
         "spec.autoscaling", "at most one"),
        (lambda s: s.setdefault("serve", {}).update(streamInterval=0),
         "spec.serve.streamInterval", "less than the minimum"),
        # the ingress replica's own limit
        (lambda s: s.setdefault("serve", {}).update(maxInFlight=MAX_ONGOING_REQUESTS + 1),
         "spec.serve.maxInFlight", f"greater than the maximum of {MAX_ONGOING_REQUESTS}"),
    ],
)  # fmt: skip
def test_bad_spec_names_the_field(mutate, field, words):
    spec = copy.deepcopy(load_cr("gpu")["spec"])
    mutate(spec)
    with pytest.raises(SpecError) as err:
        validate_spec(spec)
    assert err.value.field == field and words in str(err.value), str(err.value)


def test_inline_policy_pools_must_match_spec_pools():
    cr = mixed_cr()
    cr["spec"]["autoscaling"]["policy"]["spec"]["pools"][1]["accelerator"] = "cpu"
    with pytest.raises(SpecError) as err:
        validate_spec(cr["spec"])
    assert err.value.field == "spec.autoscaling.policy.spec.pools[1].accelerator"
    cr = mixed_cr()
    cr["spec"]["autoscaling"]["policy"]["spec"]["pools"][0]["hot"] = 1
    with pytest.raises(SpecError) as err:
        validate_spec(cr["spec"])
    assert err.value.field == "spec.autoscaling.policy.spec.pools[0].hot"
    assert "unknown field" in err.value.message


def test_name_must_be_a_short_dns_label():
    validate_name("mixtral-gpu")
    with pytest.raises(SpecError, match=r"metadata\.name"):
        validate_name("Mixtral")
    with pytest.raises(SpecError, match=r"metadata\.name"):
        validate_name("m" * 41)


# ----------------------------------------------------------------- rendering
@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_objects_validate(case):
    cr = CASES[case]()
    _, objs = rendered(cr)
    assert [o["kind"] for o in objs] == ["ConfigMap", "RayCluster"]
    for obj in objs:
        validate(obj)
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "elasticmoe.io/v1alpha1",
                "kind": "MoEDeployment",
                "name": cr["metadata"]["name"],
                "uid": cr["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def _group(rc: dict[str, Any], name: str) -> dict[str, Any]:
    (group,) = [g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == name]
    return group


def _container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


def test_gpu_pool_maps_to_ray_gpu():
    _spec, (_, rc) = rendered(load_cr("gpu"))
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert rc["spec"]["enableInTreeAutoscaling"] is False
    gpu = _group(rc, "gpu")
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (2, 2, 8)
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    # the only custom resource of a GPU pod: its pool's, which its worker asks for
    assert json.loads(json.loads(gpu["rayStartParams"]["resources"])) == {
        render.pool_resource("gpu"): 1
    }
    res = _container(gpu)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 == res["requests"]["nvidia.com/gpu"]
    assert gpu["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # GCS fault tolerance on the Redis the spec names, password from its Secret.
    assert rc["spec"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "elasticmoe-redis:6379",
        "redisPassword": {
            "valueFrom": {"secretKeyRef": {"name": "elasticmoe-redis", "key": "redis-password"}}
        },
    }
    head = rc["spec"]["headGroupSpec"]
    args = _container(head)["args"][0]
    assert "elasticmoe serve --config /etc/elasticmoe/serve.yaml" in args
    assert "$KUBERAY_GEN_RAY_START_CMD" in args.replace("{", "").replace("/--block/}", "")
    assert head["template"]["metadata"]["labels"][render.LABEL_ROLE] == "engine"
    assert _container(head)["resources"]["limits"]["nvidia.com/gpu"] == 1  # the engine's GPU


def test_npu_pool_maps_to_custom_npu_resource():
    _, (_, rc) = rendered(load_cr("npu"))
    ascend = _group(rc, "ascend")
    params = ascend["rayStartParams"]
    assert "num-gpus" not in params
    # KubeRay's format: a JSON object, quoted.
    assert params["resources"].startswith('"{\\"NPU\\": 1, ')
    assert json.loads(json.loads(params["resources"])) == {
        "NPU": 1,
        render.pool_resource("ascend"): 1,
    }
    limits = _container(ascend)["resources"]["limits"]
    assert limits["huawei.com/Ascend910"] == 1 and "nvidia.com/gpu" not in limits
    cpu = _group(rc, "cpu")
    assert cpu["rayStartParams"]["num-cpus"] == "4" and cpu["replicas"] == 0


def test_cpu_spec_has_no_accelerators_and_memory_store():
    _spec, (cm, rc) = rendered(load_cr("cpu"))
    cpu = _group(rc, "cpu")
    assert cpu["rayStartParams"]["num-cpus"] == "1"
    resources = _container(cpu)["resources"]
    assert set(resources["limits"]) == {"memory"}  # no accelerator, a memory limit
    assert resources["limits"]["memory"] == resources["requests"]["memory"]
    assert "gcsFaultToleranceOptions" not in rc["spec"]
    head_volumes = {
        v["name"]: v for v in rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    }
    assert head_volumes["policy"]["configMap"]["name"] == "elasticmoe-policy-default-cpu"
    assert head_volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]


def test_mixed_spec_one_group_per_pool():
    _, (cm, rc) = rendered(mixed_cr())
    assert [g["groupName"] for g in rc["spec"]["workerGroupSpecs"]] == ["gpu", "ascend", "cpu"]
    assert json.loads(json.loads(_group(rc, "ascend")["rayStartParams"]["resources"])) == {
        "NPU": 2,
        render.pool_resource("ascend"): 1,
    }
    assert _group(rc, "cpu")["rayStartParams"]["num-cpus"] == "8"
    assert "policy.yaml" in cm["data"]


def test_ray_ports_match_the_chart_network_policy():
    values = yaml.safe_load((REPO / "helm" / "elasticmoe" / "values.yaml").read_text())
    assert values["networkPolicy"]["rayPorts"] == render.RAY_PORTS
    assert values["networkPolicy"]["expertGrpcPort"] == render.EXPERT_GRPC_PORT


# ----------------------------------------------------------------- security
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_pod_passes_pod_security_restricted(case):
    _, (_, rc) = rendered(CASES[case]())
    pods = pod_specs(rc)
    assert len(pods) == 1 + len(rc["spec"]["workerGroupSpecs"])
    for where, pod in pods:
        assert violations(pod) == [], where
        assert hardening_gaps(pod) == [], where


def test_the_pod_security_check_catches_what_restricted_forbids():
    """The checker is not vacuous: each field it guards, set wrong, is reported."""
    _, (_, rc) = rendered(load_cr("cpu"))
    base = rc["spec"]["headGroupSpec"]["template"]["spec"]
    breaks = {
        "Privileged": lambda p, c: c["securityContext"].update(privileged=True),
        "Privilege Escalation": lambda p, c: c["securityContext"].pop("allowPrivilegeEscalation"),
        "Non-root": lambda p, c: (
            p["securityContext"].pop("runAsNonRoot"),
            c["securityContext"].pop("runAsNonRoot"),
        ),
        "Seccomp": lambda p, c: p["securityContext"].pop("seccompProfile"),
        "drop ALL": lambda p, c: c["securityContext"]["capabilities"].update(drop=[]),
        "HostPath": lambda p, c: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "Host Namespaces": lambda p, c: p.update(hostNetwork=True),
    }
    for words, mutate in breaks.items():
        pod = copy.deepcopy(base)
        mutate(pod, pod["containers"][0])
        assert any(words in v for v in violations(pod)), words
    pod = copy.deepcopy(base)
    pod["volumes"][1]["emptyDir"].pop("sizeLimit")
    pod.pop("automountServiceAccountToken")
    assert len(hardening_gaps(pod)) == 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_secret_on_a_command_line(case):
    """API keys, the Redis password and the cluster token reach pods only as env vars
    from Secrets; Ray records a driver's argv for everyone who can see its dashboard."""
    _, (cm, rc) = rendered(CASES[case]())
    for where, pod in pod_specs(rc):
        for c in pod["containers"]:
            line = " ".join(c.get("command", []) + c.get("args", []))
            for secret_word in ("KEY", "PASSWORD", "TOKEN", "redis://"):
                assert secret_word not in line, (where, line)
            secret_env = {e["name"] for e in c["env"] if "valueFrom" in e}
            assert {"RAY_AUTH_TOKEN", "ELASTICMOE_GRPC_TOKEN"} <= secret_env, where
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"]
    head_env = {e["name"]: e for e in _container(rc["spec"]["headGroupSpec"])["env"]}
    assert head_env["ELASTICMOE_ADMIN_API_KEYS"]["valueFrom"]["secretKeyRef"] == {
        "name": render.auth_secret_name(rc["metadata"]["name"]),
        "key": render.AUTH_ADMIN_KEY,
    }
    assert "@" not in yaml.safe_load(cm["data"]["serve.yaml"])["state_store"]


def test_ray_dashboard_answers_inside_the_pod_only():
    _, (_, rc) = rendered(load_cr("gpu"))
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    ports = {p["containerPort"] for p in _container(head)["ports"]}
    assert 8265 not in ports and 10001 not in ports


def test_workers_serve_experts_on_the_fixed_grpc_port():
    _, (cm, rc) = rendered(mixed_cr())
    assert yaml.safe_load(cm["data"]["serve.yaml"])["worker_grpc_port"] == render.EXPERT_GRPC_PORT
    for group in rc["spec"]["workerGroupSpecs"]:
        ports = {p["name"]: p["containerPort"] for p in _container(group)["ports"]}
        assert ports["expert-grpc"] == render.EXPERT_GRPC_PORT


def test_shared_memory_is_sized_and_ray_object_store_fits_in_it():
    cr = load_cr("cpu")
    cr["spec"]["pools"][0]["sharedMemory"] = "1Gi"
    _, (_, rc) = rendered(cr)
    group = rc["spec"]["workerGroupSpecs"][0]
    (shm,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert int(group["rayStartParams"]["object-store-memory"]) == 2**30 * 4 // 5
    head = rc["spec"]["headGroupSpec"]
    assert int(head["rayStartParams"]["object-store-memory"]) == 2 * 2**30 * 4 // 5
    with pytest.raises(ValueError, match="memory quantity"):
        render.quantity_bytes("lots")


def test_auth_secret_holds_token_and_admin_key():
    cr = load_cr("cpu")
    secret = render.render_auth_secret("m", cr, "tok", "adm")
    validate(secret)
    assert set(secret["data"]) == {render.AUTH_TOKEN_KEY, render.AUTH_ADMIN_KEY}
    spec = validate_spec(cr["spec"])
    assert render.admin_key_ref("m", spec) == {"name": "m-auth", "key": render.AUTH_ADMIN_KEY}
    spec["serve"]["adminKeySecret"] = {"name": "mine", "key": "k"}
    assert render.admin_key_ref("m", spec) == {"name": "mine", "key": "k"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_serve_config_loads(case, tmp_path):
    """``elasticmoe serve`` accepts the rendered config (policy files put where mounted)."""
    cr = CASES[case]()
    spec, (cm, rc) = rendered(cr)
    cfg = yaml.safe_load(cm["data"]["serve.yaml"])
    # the head pod's environment, with made-up values where Secrets would fill it
    environ = {
        e["name"]: e.get("value", f"secret-of-{e['name'].lower()}")
        for e in _container(rc["spec"]["headGroupSpec"])["env"]
    }
    if cfg["policy"]:
        if "policy.yaml" in cm["data"]:
            text = cm["data"]["policy.yaml"]
        else:
            name = spec["autoscaling"]["policyConfigMap"]["name"].removeprefix("elasticmoe-policy-")
            text = (POLICIES / f"{name}.yaml").read_text()
        (tmp_path / "policy.yaml").write_text(text)
        cfg["policy"] = str(tmp_path / "policy.yaml")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_serve_config(path, {}, environ)
    # the front listens on the serve port itself: the pod's Ray is started for that
    assert loaded.ingress == "direct" and direct_ingress(loaded, environ)
    assert environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == str(loaded.port)
    assert loaded.admin_api_keys == ["secret-of-elasticmoe_admin_api_keys"]
    assert loaded.worker_grpc_port == render.EXPERT_GRPC_PORT
    if "ELASTICMOE_REDIS_PASSWORD" in environ:
        assert loaded.state_store.startswith("redis://:secret-of-elasticmoe_redis_password@")
    assert loaded.pool == spec["pools"][0]["name"]
    assert loaded.device == render.device_of(spec["pools"][0])
    assert loaded.host == "0.0.0.0" and loaded.mode == "distributed"


def test_serve_config_values():
    spec = validate_spec(load_cr("npu")["spec"])
    cfg = render.render_serve_config("qwen-npu", spec)
    pool, cpu_pool = cfg["pools"]
    assert cpu_pool["worker_num_cpus"] == 4.0 and cpu_pool["num_workers"] == 0
    assert cfg["device"] == "npu"
    assert pool["worker_resources"] == {"NPU": 1.0, render.pool_resource("ascend"): 1.0}
    assert pool["worker_num_gpus"] == 0.0 and pool["name"] == "ascend"
    assert cfg["model"] == "/models/Qwen3-30B-A3B"
    assert cfg["state_store"] == "redis://redis.example.internal:6379/0"
    assert cfg["policy"] == "/etc/elasticmoe/policy.yaml"
    cpu = validate_spec(load_cr("cpu")["spec"])
    assert render.render_serve_config("x", cpu)["model"] == "default"
    assert "stream_interval" not in render.render_serve_config("x", cpu)
    cpu = validate_spec({**cpu, "serve": {**cpu.get("serve", {}), "streamInterval": 8}})
    assert render.render_serve_config("x", cpu)["stream_interval"] == 8


def test_every_pool_gets_its_own_workers_and_resources(tmp_path):
    """A GPU + NPU + CPU spec: the controller starts workers in every pool with
    minWorkers, each asking for what its pods advertise, and each worker group
    starts with room for them."""
    cr = mixed_cr()
    cr["spec"]["pools"][1].update(minWorkers=1, slotsPerWorker=6)
    spec = validate_spec(cr["spec"])
    cfg = render.render_serve_config("mixed", spec)
    pools = {p["name"]: p for p in cfg["pools"]}
    assert list(pools) == ["gpu", "ascend", "cpu"]
    gpu_min = spec["pools"][0]["minWorkers"]
    assert pools["gpu"]["worker_num_gpus"] == float(spec["pools"][0].get("devicesPerWorker", 1))
    assert pools["gpu"]["num_workers"] == max(1, gpu_min)
    assert pools["ascend"] == {
        "name": "ascend",
        "device": "npu",
        "num_workers": 1,
        "max_workers": 4,
        "worker_num_cpus": 1.0,
        "worker_num_gpus": 0.0,
        "worker_resources": {"NPU": 2.0, render.pool_resource("ascend"): 1.0},
        "slots_per_worker": 6,
    }
    assert pools["cpu"]["worker_num_cpus"] == 8.0 and pools["cpu"]["num_workers"] == 1
    start = render.initial_replicas(spec)
    assert start["ascend"] == 1 and start["cpu"] == 1
    # and elasticmoe serve reads it as three pools
    cfg["policy"] = None
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    head_pod = {"ELASTICMOE_ADMIN_API_KEYS": "x" * 14, **direct_ingress_environment(cfg["port"])}
    loaded = load_serve_config(path, {}, head_pod)
    assert [p.name for p in loaded.worker_pools()] == ["gpu", "ascend", "cpu"]
    assert loaded.get_pool("ascend").device == "npu"
    assert loaded.num_workers == sum(p["num_workers"] for p in cfg["pools"])


def test_gpu_npu_example_starts_workers_on_both_pools():
    spec = validate_spec(load_cr("gpu-npu")["spec"])
    cfg = render.render_serve_config("qwen-gpu-npu", spec)
    h100, ascend = cfg["pools"]
    assert (h100["worker_num_gpus"], h100["num_workers"], h100["slots_per_worker"]) == (1.0, 2, 24)
    assert ascend["worker_resources"] == {"NPU": 1.0, render.pool_resource("ascend"): 1.0}
    assert ascend["num_workers"] == 2
    assert ascend["slots_per_worker"] == 16
    rc = render.render_raycluster("qwen-gpu-npu", spec, load_cr("gpu-npu"))
    assert {g["groupName"]: g["replicas"] for g in rc["spec"]["workerGroupSpecs"]} == {
        "h100": 2,
        "ascend": 2,
    }


def test_replicas_are_kept_within_bounds():
    cr = load_cr("gpu")
    spec = validate_spec(cr["spec"])
    rc = render.render_raycluster("g", spec, cr, {"gpu": 50})
    assert _group(rc, "gpu")["replicas"] == 8
    rc = render.render_raycluster("g", spec, cr, {"gpu": 0})
    assert _group(rc, "gpu")["replicas"] == 2


# ------------------------------------------------------------------ scaling
def _pod(name: str, group: str, ip: str | None, created: str, phase: str = "Running"):
    status = {"phase": phase, **({"podIP": ip} if ip else {})}
    return {
        "metadata": {"name": name, "creationTimestamp": created,
                     "labels": {"ray.io/group": group, "ray.io/cluster": "g"}},
        "status": status,
    }  # fmt: skip


def _demand(desired: int, workers: list[tuple[str, str, bool]]) -> dict[str, Any]:
    return {
        "epoch": 7,
        "pools": {"gpu": {"workers": len(workers), "desired": desired}},
        "workers": [
            {"worker_id": w, "pool": "gpu", "node": ip, "healthy": ok} for w, ip, ok in workers
        ],
    }


def _gpu_rc(replicas: int) -> tuple[dict[str, Any], dict[str, Any]]:
    cr = load_cr("gpu")
    spec = validate_spec(cr["spec"])
    return spec, render.render_raycluster("g", spec, cr, {"gpu": replicas})


def test_scale_up_is_clamped_to_max():
    spec, rc = _gpu_rc(3)
    plan = render.plan_scale(spec, rc, _demand(20, []), [])
    assert plan.pools["gpu"].desired == 8 and not plan.drain_nodes
    groups = render.apply_scale(rc, plan)
    assert groups[0]["replicas"] == 8 and "scaleStrategy" not in groups[0]


def test_scale_down_picks_cheapest_pods_and_drains_them():
    spec, rc = _gpu_rc(4)
    pods = [
        _pod("p-old", "gpu", "10.0.0.1", "2026-01-01T00:00:00Z"),
        _pod("p-sick", "gpu", "10.0.0.2", "2026-01-01T00:00:01Z"),
        _pod("p-new", "gpu", "10.0.0.3", "2026-01-01T00:00:03Z"),
        _pod("p-pending", "gpu", None, "2026-01-01T00:00:04Z", phase="Pending"),
    ]
    workers = [("w0", "10.0.0.1", True), ("w1", "10.0.0.2", False), ("w2", "10.0.0.3", True)]
    plan = render.plan_scale(spec, rc, _demand(2, workers), pods)
    change = plan.pools["gpu"]
    # The pending pod (no worker) first, then the one whose worker is unhealthy.
    assert change.remove_pods == ("p-pending", "p-sick")
    assert plan.drain_nodes == ["10.0.0.2"]
    groups = render.apply_scale(rc, plan)
    assert groups[0]["replicas"] == 2
    assert groups[0]["scaleStrategy"] == {"workersToDelete": ["p-pending", "p-sick"]}
    validate({**rc, "spec": {**rc["spec"], "workerGroupSpecs": groups}})


def test_no_shrink_before_the_first_expert_map():
    spec, rc = _gpu_rc(4)
    pods = [_pod(f"p{i}", "gpu", f"10.0.0.{i}", f"2026-01-01T00:00:0{i}Z") for i in range(4)]
    demand = {**_demand(2, []), "epoch": None}
    assert render.plan_scale(spec, rc, demand, pods).changes == []
    grow = render.plan_scale(spec, rc, {**_demand(6, []), "epoch": None}, pods)
    assert [(c.current, c.desired) for c in grow.changes] == [(4, 6)]


def test_shrink_removes_only_pods_it_names():
    """KubeRay picks unnamed pods at random, drained or not: never leave it a choice."""
    spec, rc = _gpu_rc(4)
    pods = [_pod("p0", "gpu", "10.0.0.1", "2026-01-01T00:00:00Z")]  # 3 pods not listed yet
    plan = render.plan_scale(spec, rc, _demand(1, [("w0", "10.0.0.1", True)]), pods)
    change = plan.pools["gpu"]
    assert change.remove_pods == ("p0",) and change.desired == 3
    assert plan.drain_nodes == ["10.0.0.1"]


def test_scale_down_never_below_min_and_ties_go_newest_first():
    spec, rc = _gpu_rc(4)
    pods = [_pod(f"p{i}", "gpu", f"10.0.0.{i}", f"2026-01-01T00:00:0{i}Z") for i in range(4)]
    workers = [(f"w{i}", f"10.0.0.{i}", True) for i in range(4)]
    plan = render.plan_scale(spec, rc, _demand(0, workers), pods)
    assert plan.pools["gpu"].desired == 2  # minWorkers
    assert plan.pools["gpu"].remove_pods == ("p3", "p2")
    assert plan.drain_nodes == ["10.0.0.3", "10.0.0.2"]


def test_pool_missing_from_demand_keeps_its_size():
    spec, rc = _gpu_rc(3)
    plan = render.plan_scale(spec, rc, {"epoch": 1, "pools": {}, "workers": []}, [])
    assert plan.changes == []


def test_conditions_keep_transition_time_while_status_holds():
    old = [render.condition("Ready", True, "A", "", "t0", 1)]
    new = render.merge_conditions(old, [render.condition("Ready", True, "B", "", "t1", 2)])
    assert new[0]["lastTransitionTime"] == "t0" and new[0]["reason"] == "B"
    new = render.merge_conditions(old, [render.condition("Ready", False, "C", "", "t2", 2)])
    assert new[0]["lastTransitionTime"] == "t2"


def test_pool_expert_memory_reaches_the_serve_config():
    cr = load_cr("gpu")
    cr["spec"]["pools"][0]["expertMemory"] = "60Gi"
    spec = validate_spec(cr["spec"])
    (pool, *_) = render.render_serve_config("m", spec)["pools"]
    assert pool["expert_memory_gb"] == 60.0 and "slots_per_worker" not in pool
