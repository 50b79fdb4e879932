"""Validate Kubernetes objects: built-in kinds, KubeRay's RayCluster, our CRD, ServiceMonitor.

- Built-in kinds: ``kubernetes-validate`` (the API's OpenAPI schemas, strict: unknown
  fields fail).
- ``ray.io/v1`` RayCluster: no JSON schema ships in a package, so
  :data:`RAYCLUSTER_SPEC` transcribes the fields of KubeRay's Go types
  (``ray-operator/apis/ray/v1/raycluster_types.go``: RayClusterSpec,
  HeadGroupSpec, WorkerGroupSpec, ScaleStrategy, GcsFaultToleranceOptions,
  RedisCredential) with ``additionalProperties: false``, so a misspelt field
  fails; every pod template is checked as a core/v1 PodTemplateSpec by
  ``kubernetes-validate``.
- ``elasticmoe.io/v1alpha1`` MoEDeployment: the chart's CRD file's openAPIV3Schema.
- ``monitoring.coreos.com/v1`` ServiceMonitor: the fields the chart uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

KUBE_VERSION = "1.33"
REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "helm" / "elasticmoe" / "crds" / "moedeployments.elasticmoe.io.yaml"

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_TEMPLATE = {"type": "object"}  # checked separately as a PodTemplateSpec


def _closed(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": required or [],
        "additionalProperties": False,
    }


_SECRET_KEY_REF = _closed(
    {"name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}},
    ["key"],
)
RAYCLUSTER_SPEC = _closed(
    {
        "headGroupSpec": _closed(
            {
                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "headService": {"type": "object"},
                "enableIngress": {"type": "boolean"},
                "rayStartParams": _STR_MAP,
                "template": _TEMPLATE,
            },
            ["rayStartParams", "template"],
        ),
        "workerGroupSpecs": {
            "type": "array",
            "items": _closed(
                {
                    "groupName": {"type": "string", "minLength": 1},
                    "replicas": _INT32,
                    "minReplicas": _INT32,
                    "maxReplicas": _INT32,
                    "numOfHosts": _INT32,
                    "rayStartParams": _STR_MAP,
                    "template": _TEMPLATE,
                    "scaleStrategy": _closed(
                        {
                            "workersToDelete": {"type": "array", "items": {"type": "string"}},
                            "multihostReplicasToDelete": {
                                "type": "array",
                                "items": {"type": "string"},
                            },
                        }
                    ),
                    "suspend": {"type": "boolean"},
                },
                ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
            ),
        },
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headServiceAnnotations": _STR_MAP,
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "gcsFaultToleranceOptions": _closed(
            {
                "redisAddress": {"type": "string"},
                "redisUsername": _closed(
                    {
                        "value": {"type": "string"},
                        "valueFrom": _closed({"secretKeyRef": _SECRET_KEY_REF}),
                    }
                ),
                "redisPassword": _closed(
                    {
                        "value": {"type": "string"},
                        "valueFrom": _closed({"secretKeyRef": _SECRET_KEY_REF}),
                    }
                ),
                "externalStorageNamespace": {"type": "string"},
            },
            ["redisAddress"],
        ),
    },
    ["headGroupSpec"],
)
RAYCLUSTER = _closed(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object"},
        "spec": RAYCLUSTER_SPEC,
    },
    ["apiVersion", "kind", "metadata", "spec"],
)
SERVICE_MONITOR = _closed(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": _closed(
            {
                "selector": {"type": "object"},
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string"},
                            "scrapeTimeout": {"type": "string"},
                            "relabelings": {"type": "array"},
                        }
                    ),
                },
            },
            ["selector", "endpoints"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)


def crd_schema() -> dict[str, Any]:
    """openAPIV3Schema of MoEDeployment, from the chart's CRD file."""
    doc = yaml.safe_load(CRD_FILE.read_text())
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _jsonschema(schema: dict[str, Any], obj: Any, what: str) -> None:
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=str)
    if errors:
        e = errors[0]
        path = ".".join(str(p) for p in e.absolute_path)
        raise AssertionError(f"{what}: {path}: {e.message}")


def validate_pod_template(template: dict[str, Any], what: str) -> None:
    """A pod template is a valid core/v1 PodTemplateSpec."""
    wrapper = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "check"},
        "template": template,
    }
    try:
        kubernetes_validate.validate(wrapper, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.absolute_path)
        raise AssertionError(f"{what}: {path}: {e.message}") from None


def validate(obj: dict[str, Any]) -> None:
    """Raise AssertionError naming the object and field when ``obj`` is invalid."""
    kind = obj.get("kind")
    what = f"{kind} {obj.get('metadata', {}).get('name')}"
    if kind == "RayCluster":
        _jsonschema(RAYCLUSTER, obj, what)
        validate_pod_template(obj["spec"]["headGroupSpec"]["template"], f"{what} head")
        for g in obj["spec"].get("workerGroupSpecs", []):
            validate_pod_template(g["template"], f"{what} group {g['groupName']}")
    elif kind == "MoEDeployment":
        _jsonschema(crd_schema(), obj, what)
    elif kind == "ServiceMonitor":
        _jsonschema(SERVICE_MONITOR, obj, what)
    else:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            raise AssertionError(f"{what}: {path}: {e.message}") from None
