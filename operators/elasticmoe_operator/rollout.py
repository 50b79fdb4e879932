"""Blue/green rollout of a new checkpoint, as pure functions (the handlers do the I/O).

A new ``spec.model.checkpoint`` cannot reach a running head in place: the head
would restart and drop every request in flight. Instead the operator renders a
second RayCluster ``<name>-<checkpoint hash>`` from the new spec, with its own
Serve ConfigMap and its own elasticmoe deployment name (so that its controller's
state in a shared Redis never mixes with the running one's), waits until KubeRay
reports it ready and its ``/health`` answers, points the stable Service
``<name>`` (the endpoint users reach, owned by the operator) at its head, and
only then deletes the old RayCluster, whose head drains its requests on SIGTERM.

Phases recorded in ``status.rollout.phase``: ``Starting`` (the new RayCluster is
coming up), ``Verifying`` (ready, ``/health`` not yet 200), ``Draining`` (traffic
switched; the old RayCluster goes after ``rollout_drain_s``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import yaml

from operators.elasticmoe_operator import render

Obj = dict[str, Any]
# The checkpoint a RayCluster was rendered with (a hash of spec.model.checkpoint).
ANNOTATION_CHECKPOINT = "elasticmoe.io/checkpoint"
RAY_LABEL_NODE_TYPE = "ray.io/node-type"


def checkpoint_hash(spec: Obj) -> str:
    """A short, stable hash of ``spec.model.checkpoint`` (5 hex digits: names stay short)."""
    text = json.dumps(spec["model"]["checkpoint"], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:5]


def checkpoint_of(raycluster: Obj) -> str | None:
    """The checkpoint hash a RayCluster runs; None for one rendered before rollouts."""
    return raycluster.get("metadata", {}).get("annotations", {}).get(ANNOTATION_CHECKPOINT)


def target_name(name: str, spec: Obj) -> str:
    """The RayCluster a rollout to ``spec``'s checkpoint creates."""
    return f"{name}-{checkpoint_hash(spec)}"


def service_name(name: str) -> str:
    """The stable Service users reach; it selects the active RayCluster's head."""
    return name


def endpoint(name: str, namespace: str, spec: Obj) -> str:
    """``status.endpoint``: the OpenAI API behind the stable Service."""
    return f"http://{service_name(name)}.{namespace}.svc:{render.serve_port(spec)}/v1"


def head_url(rc_name: str, namespace: str, spec: Obj) -> str:
    """One RayCluster's own head (KubeRay's ``<rc>-head-svc``), for /health and /admin."""
    return f"http://{rc_name}-head-svc.{namespace}.svc:{render.serve_port(spec)}"


def render_children_for(
    rc_name: str, name: str, spec: Obj, owner: Obj, replicas: dict[str, int] | None = None
) -> tuple[Obj, Obj]:
    """The ConfigMap and RayCluster of deployment ``name`` under the RayCluster name
    ``rc_name`` (``name`` itself for the first one), stamped with the checkpoint."""
    config_map, rc = render.render_children(name, spec, owner, replicas)
    rc["metadata"].setdefault("annotations", {})[ANNOTATION_CHECKPOINT] = checkpoint_hash(spec)
    if rc_name == name:
        return config_map, rc
    config_map, rc = copy.deepcopy(config_map), copy.deepcopy(rc)
    cm_name = render.config_map_name(rc_name)
    config_map["metadata"]["name"] = cm_name
    serve = yaml.safe_load(config_map["data"][render.SERVE_CONFIG_FILE])
    serve["name"] = rc_name  # its own controller state, never the running one's
    config_map["data"][render.SERVE_CONFIG_FILE] = yaml.safe_dump(serve, sort_keys=False)
    rc["metadata"]["name"] = rc_name
    for volume in rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]:
        if volume["name"] == "config":
            volume["configMap"]["name"] = cm_name
    return config_map, rc


def render_service(name: str, spec: Obj, owner: Obj, active_rc: str) -> Obj:
    """The stable Service: the Serve port of the active RayCluster's head pod."""
    port = render.serve_port(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": owner["metadata"]["namespace"],
            "labels": render.labels(name),
            "ownerReferences": [render.owner_reference(owner)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {render.RAY_LABEL_CLUSTER: active_rc, RAY_LABEL_NODE_TYPE: "head"},
            "ports": [{"name": "serve", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }
