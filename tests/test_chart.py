"""The Helm chart, rendered and linted by the real Helm engine (``helm-python-sdk``).

Every manifest of every values file validates against the Kubernetes schemas
(``tests/k8s_schemas.py``); the rendered output equals the golden files in
``tests/golden/helm`` and the chart's copies of dashboards, policies and
examples equal their sources (``make golden`` rewrites both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pod_security import hardening_gaps, pod_specs, violations

from operators.elasticmoe_operator import chart

from k8s_schemas import validate

helm = pytest.importorskip("helm_python")

REPO = Path(__file__).resolve().parents[1]
REGENERATE = "run `make golden` and commit the result"
VALUES = chart.values_files()


def docs(values_name: str) -> list[dict[str, Any]]:
    text = chart.render(chart.load_values(VALUES[values_name]))
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


@pytest.mark.parametrize("name", sorted(VALUES))
def test_lint_is_clean(name):
    report = helm.lint(chart.CHART_DIR, chart.load_values(VALUES[name]), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("name", sorted(VALUES))
def test_rendered_manifests_validate(name):
    objs = docs(name)
    assert objs
    values = chart.load_values(VALUES[name]) or {}
    allowed = {chart.NAMESPACE, *values.get("operator", {}).get("watchNamespaces", [])}
    for obj in objs:
        validate(obj)
        assert obj["metadata"].get("namespace", chart.NAMESPACE) in allowed


@pytest.mark.parametrize("name", sorted(VALUES))
def test_golden_files_are_current(name):
    path = chart.GOLDEN_DIR / f"{name}.yaml"
    assert path.exists(), f"{path} is missing: {REGENERATE}"
    assert path.read_text() == chart.golden_files()[path], f"{path} is stale: {REGENERATE}"


def test_chart_copies_are_current():
    for path, text in chart.copied_files().items():
        assert path.exists() and path.read_text() == text, f"{path} is stale: {REGENERATE}"
    stale = [p for p in chart.stale_files() if p.parent != chart.GOLDEN_DIR]
    assert not stale, f"{stale}: {REGENERATE}"


def test_crds_are_installed_from_the_chart():
    crds = [yaml.safe_load(c["data"]) for c in helm.Chart.load(chart.CHART_DIR).crds]
    assert [c["metadata"]["name"] for c in crds] == ["moedeployments.elasticmoe.io"]
    validate(crds[0])


def test_operator_deployment_is_locked_down():
    (dep,) = [
        d for d in by_kind(docs("default"), "Deployment") if "operator" in d["metadata"]["name"]
    ]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert (
        container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    )
    assert container["command"] == ["elasticmoe-operator"]
    assert "--all-namespaces" in container["args"]
    npu = [d for d in by_kind(docs("npu"), "Deployment") if "operator" in d["metadata"]["name"]]
    assert "--namespace=models" in npu[0]["spec"]["template"]["spec"]["containers"][0]["args"]


def _verbs_of(role: dict[str, Any]) -> dict[str, set[str]]:
    verbs_of: dict[str, set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        for res in rule["resources"]:
            verbs_of.setdefault(res, set()).update(rule["verbs"])
    return verbs_of


def test_rbac_is_least_privilege():
    (role,) = by_kind(docs("default"), "ClusterRole")
    verbs_of = _verbs_of(role)
    # the per-deployment auth Secret is created once; nothing is updated or listed
    assert verbs_of["secrets"] == {"get", "create"}
    assert verbs_of["pods"] == {"get", "list"}
    assert "delete" not in verbs_of["moedeployments"]
    assert {"create", "patch", "delete"} <= verbs_of["rayclusters"]


def test_watching_given_namespaces_grants_nothing_cluster_wide():
    objs = docs("namespaced")
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    roles = by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["models", "research"]
    for role in roles:
        verbs_of = _verbs_of(role)
        assert "customresourcedefinitions" not in verbs_of and "namespaces" not in verbs_of
        assert verbs_of["secrets"] == {"get", "create"}
    bindings = by_kind(objs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["models", "research"]
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"][0]["namespace"] == chart.NAMESPACE
    (dep,) = [d for d in by_kind(objs, "Deployment") if "operator" in d["metadata"]["name"]]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=models" in args and "--all-namespaces" not in args


@pytest.mark.parametrize("name", sorted(VALUES))
def test_every_pod_passes_pod_security_restricted(name):
    """``helm template`` output, every pod template: admitted under "restricted", plus
    read-only root filesystems, memory limits, and no API token where none is needed."""
    pods = [(o["metadata"]["name"], p) for o in docs(name) for _, p in pod_specs(o)]
    assert pods
    for obj_name, pod in pods:
        assert violations(pod) == [], obj_name
        assert hardening_gaps(pod, needs_api_token=obj_name.endswith("-operator")) == [], obj_name


def test_dashboards_one_configmap_each_with_grafana_label():
    maps = [
        c for c in by_kind(docs("default"), "ConfigMap") if "-dashboard-" in c["metadata"]["name"]
    ]
    sources = sorted((REPO / "dashboards").glob("*.json"))
    assert len(maps) == len(sources)
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((REPO / "dashboards" / key).read_text())


def test_default_policies_as_configmaps():
    maps = {
        c["metadata"]["name"]: c
        for c in by_kind(docs("default"), "ConfigMap")
        if c["metadata"]["name"].startswith("elasticmoe-policy-")
    }
    assert {"elasticmoe-policy-default", "elasticmoe-policy-default-cpu"} <= set(maps)
    from elasticmoe.core.policy import policy_from_text

    for cm in maps.values():
        policy_from_text(cm["data"]["policy.yaml"])


def test_network_policies_cover_heads_and_workers_and_name_the_grpc_port():
    from operators.elasticmoe_operator import render

    policies = {p["metadata"]["name"]: p for p in by_kind(docs("default"), "NetworkPolicy")}
    workers, engines = policies["elasticmoe-workers"], policies["elasticmoe-engines"]
    pods = {"app.kubernetes.io/managed-by": render.MANAGED_BY}
    assert workers["spec"]["podSelector"]["matchLabels"] == {**pods, "elasticmoe.io/role": "worker"}
    assert engines["spec"]["podSelector"]["matchLabels"] == {**pods, "elasticmoe.io/role": "engine"}
    for policy in (workers, engines):
        rules = policy["spec"]["ingress"]
        # every rule names its ports: nothing is open on every port
        assert all(r.get("ports") for r in rules), rules
        from_pods = [r for r in rules if r.get("from")]
        assert from_pods and all(
            r["from"] == [{"podSelector": {"matchLabels": pods}}] for r in from_pods
        )
        ports = {p["port"] for r in from_pods for p in r["ports"]}
        assert {"protocol": "TCP", "port": 10002, "endPort": 10999} in from_pods[0]["ports"]
        assert set(render.RAY_PORTS.values()) - {10002, 10999} <= ports
    (grpc,) = [p for r in workers["spec"]["ingress"] for p in r["ports"] if p["port"] == 50051]
    assert render.EXPERT_GRPC_PORT == 50051 and grpc["protocol"] == "TCP"
    # the expert gRPC port is not open to anyone but the deployment's pods
    open_ports = {p["port"] for r in workers["spec"]["ingress"] if not r.get("from")
                  for p in r["ports"]}  # fmt: skip
    assert open_ports == {8080}
    engine_open = {p["port"] for r in engines["spec"]["ingress"] if not r.get("from")
                   for p in r["ports"]}  # fmt: skip
    assert engine_open == {render.DEFAULT_PORT, 8080}
    assert render.GCS_PORT in {p["port"] for r in engines["spec"]["ingress"] if r.get("from")
                               for p in r["ports"]}  # fmt: skip
    namespaced = by_kind(docs("namespaced"), "NetworkPolicy")
    assert sorted({p["metadata"]["namespace"] for p in namespaced}) == ["models", "research"]
    assert len(namespaced) == 4
    assert not by_kind(docs("external-redis"), "NetworkPolicy")


def test_redis_bundled_or_external():
    gpu = docs("gpu")
    assert any(d["metadata"]["name"] == "elasticmoe-redis" for d in by_kind(gpu, "Service"))
    (ex,) = by_kind(gpu, "MoEDeployment")
    assert ex["spec"]["stateStore"]["redis"]["address"] == "elasticmoe-redis:6379"
    ext = docs("external-redis")
    assert not [d for d in ext if "redis" in d["metadata"]["name"]]
    (ex,) = by_kind(ext, "MoEDeployment")
    assert ex["spec"]["stateStore"]["redis"]["address"] == "redis.example.internal:6379"
    (sm,) = by_kind(gpu, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"


def test_example_resources_pass_the_operator():
    from operators.elasticmoe_operator.spec import validate_spec

    for name in ("gpu", "npu", "external-redis"):
        (ex,) = by_kind(docs(name), "MoEDeployment")
        validate_spec(ex["spec"])


def test_bad_values_are_rejected_by_the_schema():
    with pytest.raises(helm.HelmValuesError, match="example/kind"):
        chart.render({"example": {"kind": "tpu"}})
    with pytest.raises(helm.HelmValuesError, match="operator"):
        chart.render({"operator": {"replica": 2}})
    with pytest.raises(helm.HelmError, match=r"redis\.auth\.password"):
        chart.render({"redis": {"enabled": True}})
