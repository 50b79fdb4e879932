"""The ``MoEDeployment`` CustomResourceDefinition, built as data: the single source.

``python -m operators.elasticmoe_operator.crd`` writes it to the Helm chart's
``crds/`` folder (``--check`` exits 1 when the checked-in file is stale); the
operator validates every spec against the same ``openAPIV3Schema`` (see
:mod:`operators.elasticmoe_operator.spec`), so the API server and the operator
never disagree about what a valid spec is.

The schema is structural (every node has a type; free-form objects say so
with ``x-kubernetes-preserve-unknown-fields``), as ``apiextensions.k8s.io/v1``
requires.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from elasticmoe.serve.ingress import MAX_ONGOING_REQUESTS

GROUP = "elasticmoe.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MoEDeployment"
PLURAL = "moedeployments"
SINGULAR = "moedeployment"
SHORT_NAMES = ["moed"]
CRD_NAME = f"{PLURAL}.{GROUP}"

ACCELERATORS = ("nvidia.com/gpu", "huawei.com/Ascend910", "cpu")
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
CONDITION_TYPES = ("Ready", "Progressing", "Scaling", "Degraded")

REPO = Path(__file__).resolve().parents[2]
CHART_CRD_PATH = REPO / "helm" / "elasticmoe" / "crds" / f"{CRD_NAME}.yaml"

Schema = dict[str, Any]


# ------------------------------------------------------------ schema helpers
def _obj(
    props: dict[str, Schema], required: list[str] | None = None, description: str = ""
) -> Schema:
    out: Schema = {"type": "object"}
    if description:
        out["description"] = description
    out["properties"] = props
    if required:
        out["required"] = required
    return out


def _str(description: str = "", **kw: Any) -> Schema:
    return {"type": "string", **({"description": description} if description else {}), **kw}


def _int(description: str = "", **kw: Any) -> Schema:
    return {"type": "integer", **({"description": description} if description else {}), **kw}


def _num(description: str = "", **kw: Any) -> Schema:
    return {"type": "number", **({"description": description} if description else {}), **kw}


def _bool(description: str = "", **kw: Any) -> Schema:
    return {"type": "boolean", **({"description": description} if description else {}), **kw}


def _free(description: str) -> Schema:
    """An object whose keys the API server keeps as given (checked elsewhere)."""
    return {
        "type": "object",
        "description": description,
        "x-kubernetes-preserve-unknown-fields": True,
    }


def _quantity_map(description: str) -> Schema:
    return {
        "type": "object",
        "description": description,
        "additionalProperties": {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
        },
    }


def _resources(description: str) -> Schema:
    return _obj(
        {
            "requests": _quantity_map("Minimum resources, e.g. {cpu: '4', memory: 32Gi}."),
            "limits": _quantity_map("Maximum resources."),
        },
        description=description,
    )


def _shared_memory(what: str) -> Schema:
    return _str(
        f"Size of /dev/shm of {what} (memory-backed; Ray's object store takes 80% of it).",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$",
        default="2Gi",
    )


def _secret_key_ref(description: str) -> Schema:
    return _obj(
        {
            "name": _str("Secret name (same namespace).", minLength=1),
            "key": _str("Key inside the Secret.", minLength=1),
        },
        required=["name", "key"],
        description=description,
    )


_TOLERATIONS: Schema = {
    "type": "array",
    "description": "Tolerations of the pods (core/v1 Toleration).",
    "items": _obj(
        {
            "key": _str(),
            "operator": _str(enum=["Exists", "Equal"]),
            "value": _str(),
            "effect": _str(enum=["NoSchedule", "PreferNoSchedule", "NoExecute"]),
            "tolerationSeconds": _int(),
        }
    ),
}
_NODE_SELECTOR: Schema = {
    "type": "object",
    "description": "Node labels the pods must match.",
    "additionalProperties": {"type": "string"},
}


def spec_schema() -> Schema:
    """The ``spec`` of a MoEDeployment."""
    pool = _obj(
        {
            "name": _str(
                "Pool name (DNS label): the KubeRay worker group and the elasticmoe pool.",
                pattern=DNS_LABEL,
                maxLength=40,
            ),
            "accelerator": _str(
                "Device of the pool's workers; huawei.com/Ascend910 becomes the Ray "
                "resource NPU, nvidia.com/gpu becomes GPU.",
                enum=list(ACCELERATORS),
            ),
            "devicesPerWorker": _int(
                "Accelerators (CPUs for a cpu pool) of one worker pod; one expert "
                "worker runs per pod.",
                minimum=1,
                default=1,
            ),
            "minWorkers": _int("Workers the pool never goes below.", minimum=0, default=0),
            "slotsPerWorker": _int(
                "Expert replicas one worker of this pool holds (accelerators differ: an "
                "Ascend 910 and an H100 hold different numbers); default: "
                "serve.slotsPerWorker, else room for the initial replicas plus 25%.",
                minimum=1,
            ),
            "expertMemory": _str(
                "Device memory one worker of this pool gives expert weights, e.g. 60Gi: "
                "its slots are as many experts as fit (when slotsPerWorker is not set).",
                pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$",
            ),
            "maxWorkers": _int("Workers the pool never goes above.", minimum=1),
            "nodeSelector": _NODE_SELECTOR,
            "tolerations": _TOLERATIONS,
            "resources": _resources(
                "Extra requests/limits of a worker pod (cpu, memory); the accelerator "
                "is added from accelerator and devicesPerWorker."
            ),
            "sharedMemory": _shared_memory("a worker pod"),
        },
        required=["name", "accelerator", "maxWorkers"],
    )
    checkpoint = _obj(
        {
            "pvc": _obj(
                {
                    "claimName": _str("PersistentVolumeClaim holding checkpoints.", minLength=1),
                    "path": _str("Checkpoint directory inside the claim.", default=""),
                },
                required=["claimName"],
                description="A checkpoint on a PersistentVolumeClaim, mounted read-only "
                "at /models.",
            ),
            "uri": _str(
                "file:///abs/path (inside the image or a node mount) or builtin:NAME "
                "(a built-in test model, e.g. builtin:default).",
                pattern=r"^(file:///.+|builtin:[a-z0-9][-a-z0-9]*)$",
            ),
        },
        description="Where the Hugging Face checkpoint is: exactly one of pvc or uri.",
    )
    autoscaling = _obj(
        {
            "policy": _free(
                "An inline AutoscalingPolicy document (apiVersion elasticmoe.io/v1alpha1, "
                "kind AutoscalingPolicy); see examples/policies."
            ),
            "policyConfigMap": _obj(
                {
                    "name": _str("ConfigMap name (same namespace).", minLength=1),
                    "key": _str("Key holding the policy YAML.", default="policy.yaml"),
                },
                required=["name"],
                description="A ConfigMap holding the policy (the chart installs "
                "elasticmoe-policy-* ones).",
            ),
        },
        description="At most one of policy or policyConfigMap; neither: no autoscaling "
        "policy (worker groups stay at their minimum).",
    )
    state_store = _obj(
        {
            "type": _str(
                "memory (embedded in the controller) or redis (restartable control, and "
                "Ray GCS fault tolerance).",
                enum=["memory", "redis"],
                default="memory",
            ),
            "redis": _obj(
                {
                    "address": _str(
                        "host:port of the Redis (the chart's bundled one is RELEASE-redis:6379).",
                        pattern=r"^[^\s:/]+:[0-9]{1,5}$",
                    ),
                    "db": _int("Redis database of the elasticmoe state.", minimum=0, default=0),
                    "passwordSecret": _secret_key_ref("Secret key holding the Redis password."),
                },
                required=["address"],
            ),
        },
        description="Where the controller keeps the expert map and operation log.",
    )
    engines = _obj(
        {
            "replicas": _int("Engine actors (data parallel).", minimum=1, default=1),
            "cpus": _num("CPUs of one engine actor.", minimum=0, default=1),
            "gpus": _num("GPUs of one engine actor (head pod gets them).", minimum=0, default=0),
            "settings": _free("Engine settings (ServeConfig engine.*), e.g. max_num_seqs."),
            "router": _free("Router settings (ServeConfig router.*), e.g. rpc_timeout_s."),
        },
        description="Engines (attention, scheduler, router) run in the head pod.",
    )
    serve = _obj(
        {
            "port": _int("HTTP port (OpenAI API, /admin, /metrics).", minimum=1, maximum=65535),
            "maxInFlight": _int(
                "Concurrent requests before 429 (at most what the ingress replica holds).",
                minimum=1,
                maximum=MAX_ONGOING_REQUESTS,
            ),
            "streamInterval": _int(
                "Tokens a stream gathers per chunk after a completion's first (ServeConfig "
                "stream_interval; 1 sends every engine step's tokens).",
                minimum=1,
                maximum=1024,
            ),
            "apiKeySecret": _secret_key_ref(
                "Secret key holding the Bearer API key clients send to /v1 (none: /v1 is open)."
            ),
            "adminKeySecret": _secret_key_ref(
                "Secret key holding the admin API key (/admin; the operator sends it). "
                "Default: the admin-api-key of the Secret NAME-auth the operator creates."
            ),
            "replicasPerExpert": _int("Initial replicas of every expert.", minimum=1),
            "slotsPerWorker": _int("Expert slots of one worker.", minimum=1),
            "spareWorkers": _int("Started, empty workers kept ready.", minimum=0),
            "dtype": _str(enum=["float32", "bfloat16", "float16", "auto"]),
        },
        description="Settings of the elasticmoe Serve app (ServeConfig).",
    )
    head = _obj(
        {
            "resources": _resources("Requests/limits of the head pod (controller, engines)."),
            "sharedMemory": _shared_memory("the head pod"),
            "nodeSelector": _NODE_SELECTOR,
            "tolerations": _TOLERATIONS,
        },
        description="The Ray head pod: controller, engines and the HTTP front.",
    )
    return _obj(
        {
            "image": _str("elasticmoe container image (head and workers).", minLength=1),
            "imagePullPolicy": _str(enum=["Always", "IfNotPresent", "Never"]),
            "rayVersion": _str("Ray version of the image.", default="2.60.0"),
            "model": _obj(
                {
                    "name": _str("Model name clients use (default: the checkpoint path)."),
                    "checkpoint": checkpoint,
                },
                required=["checkpoint"],
            ),
            "pools": {
                "type": "array",
                "description": "Worker pools, one per accelerator type (e.g. a GPU and "
                "an NPU pool), each a KubeRay worker group scaled from its own demand; "
                "the controller starts each pool's minWorkers (at least one in the "
                "first, which also keeps the spares) and places experts on all of them.",
                "minItems": 1,
                "maxItems": 8,
                "items": pool,
            },
            "engines": engines,
            "head": head,
            "autoscaling": autoscaling,
            "stateStore": state_store,
            "serve": serve,
        },
        required=["image", "model", "pools"],
    )


def status_schema() -> Schema:
    """The ``status`` the operator writes."""
    condition = _obj(
        {
            "type": _str(enum=list(CONDITION_TYPES)),
            "status": _str(enum=["True", "False", "Unknown"]),
            "reason": _str(),
            "message": _str(),
            "lastTransitionTime": _str(format="date-time"),
            "observedGeneration": _int(),
        },
        required=["type", "status"],
    )
    pool = _obj(
        {
            "replicas": _int("Worker pods the RayCluster asks for."),
            "readyReplicas": _int("Worker pods running."),
            "desired": _int("Workers the controller wants (clamped to min/max)."),
            "minWorkers": _int(),
            "maxWorkers": _int(),
        }
    )
    return _obj(
        {
            "observedGeneration": _int(),
            "rayCluster": _str("The RayCluster this resource owns."),
            "endpoint": _str("In-cluster URL of the OpenAI API (the operator's stable Service)."),
            "workers": _int("Worker pods over all pools."),
            "epoch": _int("Expert-map epoch last seen in the controller's demand."),
            "appliedPolicy": _str(
                "Hash of the autoscaling policy last pushed to the running deployment."
            ),
            "rollout": _obj(
                {
                    "target": _str("The RayCluster with the new checkpoint."),
                    "from": _str("The RayCluster it replaces."),
                    "checkpoint": _str("Hash of the new spec.model.checkpoint."),
                    "phase": _str(enum=["Starting", "Verifying", "Draining"]),
                    "switchedAt": _str("When the Service moved to the target.", format="date-time"),
                    "message": _str(),
                },
                description="A checkpoint rollout in progress (blue/green RayClusters).",
            ),
            "policyRefused": _obj(
                {"hash": _str(), "message": _str()},
                description="The policy the controller refused (not sent again until it "
                "changes), and why.",
            ),
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "pools": {
                "type": "object",
                "description": "Observed replicas per pool.",
                "additionalProperties": pool,
            },
        }
    )


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "elasticmoe"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["elasticmoe"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {
                            "name": "Scaling",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Scaling")].status',
                        },
                        {"name": "Workers", "type": "integer", "jsonPath": ".status.workers"},
                        {"name": "Epoch", "type": "integer", "jsonPath": ".status.epoch"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": _obj(
                            {
                                "apiVersion": _str(),
                                "kind": _str(),
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                            required=["spec"],
                            description="An elasticmoe deployment: one MoE model served on "
                            "a KubeRay RayCluster with one worker group per pool.",
                        )
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as the YAML file checked in under the chart's ``crds/``."""
    header = (
        "# Generated by `python -m operators.elasticmoe_operator.crd` (make golden); do not edit.\n"
    )
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    """Write the chart's CRD file, or with ``--check`` report whether it is stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = crd_yaml()
    current = CHART_CRD_PATH.read_text() if CHART_CRD_PATH.exists() else None
    if args.check:
        if current != text:
            print(f"{CHART_CRD_PATH} is stale: run `make golden`", file=sys.stderr)
            return 1
        return 0
    CHART_CRD_PATH.parent.mkdir(parents=True, exist_ok=True)
    CHART_CRD_PATH.write_text(text)
    print(f"wrote {CHART_CRD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
