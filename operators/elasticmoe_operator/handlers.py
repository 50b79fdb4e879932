"""Reconcile handlers: read the world, call the pure functions of :mod:`render`, write.

Each handler takes the custom resource's ``body`` and an :class:`OperatorContext`
holding the Kubernetes client, the admin-API client factory and the settings,
so tests run them against a mock API server without kopf's machinery. The kopf
decorators in :mod:`main` are one-line calls into these.

Errors follow kopf's split: a spec that can never work raises
:class:`kopf.PermanentError` after writing a ``Ready=False`` condition that
names the field; a dependency that is not there yet (a Secret, a ConfigMap, a
PVC, the RayCluster, the admin API) raises :class:`kopf.TemporaryError` with a
delay.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from operators.elasticmoe_operator import render, rollout
from operators.elasticmoe_operator.admin import AdminClient, AdminError, RequestRefused
from operators.elasticmoe_operator.config import OperatorConfig
from operators.elasticmoe_operator.crd import GROUP, PLURAL, VERSION
from operators.elasticmoe_operator.kube import (
    CONFIG_MAPS,
    PODS,
    PVCS,
    RAY_CLUSTERS,
    SECRETS,
    SERVICES,
    KubeClient,
)
from operators.elasticmoe_operator.spec import SpecError, check_policy, validate_name, validate_spec

Obj = dict[str, Any]
DEPLOYMENTS = (f"{GROUP}/{VERSION}", PLURAL)
log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class OperatorContext:
    """What handlers need from the outside world (injected, so tests can swap it)."""

    kube: KubeClient
    config: OperatorConfig = field(default_factory=OperatorConfig)
    admin_factory: Callable[[str, str | None, OperatorConfig], AdminClient] = field(
        default=lambda url, key, cfg: AdminClient(
            url, key, timeout_s=cfg.admin_timeout_s, drain_timeout_s=cfg.drain_timeout_s
        )
    )
    now: Callable[[], str] = _now

    def admin_url(self, name: str, namespace: str, spec: Obj, rc_name: str | None = None) -> str:
        """The admin API base URL of one RayCluster's head (default: the first one's)."""
        rc_name = rc_name or render.raycluster_name(name)
        if self.config.admin_url:
            return self.config.admin_url.format(name=name, namespace=namespace, raycluster=rc_name)
        return rollout.head_url(rc_name, namespace, spec)


def _active_name(body: Obj) -> str:
    """The RayCluster that serves users now (another one after a checkpoint rollout)."""
    return body.get("status", {}).get("rayCluster") or render.raycluster_name(
        body["metadata"]["name"]
    )


def _seconds_between(start: str, end: str) -> float:
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    a = datetime.datetime.strptime(start, fmt)
    b = datetime.datetime.strptime(end, fmt)
    return (b - a).total_seconds()


def _ids(body: Obj) -> tuple[str, str, int]:
    meta = body["metadata"]
    return meta["name"], meta["namespace"], int(meta.get("generation", 1))


async def _write_status(ctx: OperatorContext, body: Obj, status: Obj) -> None:
    name, namespace, _ = _ids(body)
    old = body.get("status", {}).get("conditions", [])
    if "conditions" in status:
        status = {**status, "conditions": render.merge_conditions(old, status["conditions"])}
    await ctx.kube.patch(DEPLOYMENTS, namespace, name, {"status": status}, status=True)


async def _fail_spec(ctx: OperatorContext, body: Obj, err: SpecError) -> kopf.PermanentError:
    _, _, generation = _ids(body)
    now = ctx.now()
    await _write_status(
        ctx,
        body,
        {
            "observedGeneration": generation,
            "conditions": [
                render.condition("Ready", False, "InvalidSpec", str(err), now, generation),
                render.condition("Degraded", True, "InvalidSpec", str(err), now, generation),
            ],
        },
    )
    return kopf.PermanentError(str(err))


async def _secret_value(ctx: OperatorContext, namespace: str, ref: Obj, field_: str) -> str:
    """A Secret's key (base64-decoded); TemporaryError while the Secret is missing."""
    import base64

    secret = await ctx.kube.get(SECRETS, namespace, ref["name"])
    if secret is None or ref["key"] not in secret.get("data", {}):
        raise kopf.TemporaryError(
            f"{field_}: Secret {ref['name']!r} with key {ref['key']!r} not found yet",
            delay=ctx.config.retry_delay_s,
        )
    return base64.b64decode(secret["data"][ref["key"]]).decode()


async def _check_dependencies(ctx: OperatorContext, namespace: str, spec: Obj) -> None:
    """Everything the spec refers to exists (else TemporaryError) and is valid (else SpecError)."""
    delay = ctx.config.retry_delay_s
    ref = spec.get("autoscaling", {}).get("policyConfigMap")
    if ref is not None:
        cm = await ctx.kube.get(CONFIG_MAPS, namespace, ref["name"])
        if cm is None:
            raise kopf.TemporaryError(
                f"spec.autoscaling.policyConfigMap: ConfigMap {ref['name']!r} not found yet",
                delay=delay,
            )
        key = ref.get("key", render.POLICY_FILE)
        if key not in cm.get("data", {}):
            raise SpecError(
                "spec.autoscaling.policyConfigMap.key",
                f"ConfigMap {ref['name']!r} has no key {key!r} "
                f"(its keys: {', '.join(sorted(cm.get('data', {}))) or 'none'})",
            )
        check_policy(cm["data"][key], spec, "spec.autoscaling.policyConfigMap")
    for field_ in ("apiKeySecret", "adminKeySecret"):
        if field_ in spec.get("serve", {}):
            await _secret_value(ctx, namespace, spec["serve"][field_], f"spec.serve.{field_}")
    store = spec.get("stateStore", {})
    if store.get("type") == "redis" and "passwordSecret" in store["redis"]:
        await _secret_value(
            ctx, namespace, store["redis"]["passwordSecret"], "spec.stateStore.redis.passwordSecret"
        )
    pvc = spec["model"]["checkpoint"].get("pvc")
    if pvc is not None and await ctx.kube.get(PVCS, namespace, pvc["claimName"]) is None:
        raise kopf.TemporaryError(
            f"spec.model.checkpoint.pvc: PersistentVolumeClaim {pvc['claimName']!r} not found yet",
            delay=delay,
        )


async def _validated(ctx: OperatorContext, body: Obj) -> Obj:
    """The spec with defaults, or PermanentError (with a Ready=False condition)."""
    name, namespace, _ = _ids(body)
    try:
        validate_name(name)
        spec = validate_spec(body.get("spec", {}))
        await _check_dependencies(ctx, namespace, spec)
    except SpecError as e:
        raise await _fail_spec(ctx, body, e) from None
    return spec


async def _ensure_auth_secret(ctx: OperatorContext, name: str, namespace: str, owner: Obj) -> None:
    """Create the deployment's auth Secret once; an existing one is never rewritten
    (running pods hold its token)."""
    import secrets

    if await ctx.kube.get(SECRETS, namespace, render.auth_secret_name(name)) is None:
        await ctx.kube.create(
            SECRETS,
            render.render_auth_secret(
                name, owner, secrets.token_urlsafe(32), secrets.token_urlsafe(32)
            ),
        )


async def _apply(ctx: OperatorContext, res: tuple[str, str], desired: Obj) -> Obj:
    """Create ``desired`` or merge-patch the existing object's labels and content."""
    meta = desired["metadata"]
    current = await ctx.kube.get(res, meta["namespace"], meta["name"])
    if current is None:
        return await ctx.kube.create(res, desired)
    patch = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "metadata")}
    patch["metadata"] = {
        k: meta[k] for k in ("labels", "annotations", "ownerReferences") if k in meta
    }
    out = await ctx.kube.patch(res, meta["namespace"], meta["name"], patch)
    return out or current


# ------------------------------------------------------------- policy push
def policy_hash(text: str) -> str:
    """What ``status.appliedPolicy`` records of a policy document."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


async def _desired_policy(ctx: OperatorContext, body: Obj, spec: Obj) -> str | None:
    """The policy text the deployment should run: the inline one as the ConfigMap holds
    it, or the referenced ConfigMap's; None without a policy (or while it is missing)."""
    name, namespace, _ = _ids(body)
    auto = spec.get("autoscaling", {})
    if "policy" in auto:
        return render.render_config_map(name, spec, body)["data"][render.POLICY_FILE]
    ref = auto.get("policyConfigMap")
    if ref is None:
        return None
    cm = await ctx.kube.get(CONFIG_MAPS, namespace, ref["name"])
    return (cm or {}).get("data", {}).get(ref.get("key", render.POLICY_FILE))


def _policy_field(spec: Obj) -> str:
    auto = spec.get("autoscaling", {})
    return "spec.autoscaling.policy" if "policy" in auto else "spec.autoscaling.policyConfigMap"


@dataclass
class PolicySync:
    """Where the policy push stands: ``status`` fields to write, ``pending`` (why it is
    not applied yet; empty when settled), ``refused`` (the controller's refusal), and
    ``failed`` (the admin API did not answer: retry soon)."""

    status: Obj = field(default_factory=dict)
    pending: str = ""
    refused: str = ""
    failed: bool = False


def _policy_state(body: Obj, text: str | None) -> PolicySync | None:
    """The push's state from status alone, or None when a push is due."""
    if text is None:
        return PolicySync()
    h = policy_hash(text)
    status = body.get("status", {})
    if status.get("appliedPolicy") == h:
        return PolicySync()
    refused = status.get("policyRefused") or {}
    if refused.get("hash") == h:
        return PolicySync(refused=f"policy refused by the controller: {refused.get('message')}")
    return None


async def _sync_policy(
    body: Obj, spec: Obj, text: str | None, admin: AdminClient | None, logger: logging.Logger
) -> PolicySync:
    """Push ``text`` with ``PUT /admin/policy`` unless it is already applied or was
    refused (then it waits for a change). ``admin`` None: the deployment is not up."""
    state = _policy_state(body, text)
    if state is not None:
        return state
    assert text is not None
    h = policy_hash(text)
    if admin is None:
        return PolicySync(pending="policy waits for the RayCluster to be ready")
    try:
        # The controller would refuse it too; this names the field.
        check_policy(text, spec, _policy_field(spec))
        await admin.put_policy(text)
    except SpecError as e:
        logger.warning("policy %s not pushed: %s", h, e)
        return PolicySync(
            status={"policyRefused": {"hash": h, "message": str(e)}}, refused=f"policy invalid: {e}"
        )
    except RequestRefused as e:
        logger.warning("policy %s refused: %s", h, e)
        return PolicySync(
            status={"policyRefused": {"hash": h, "message": str(e)}},
            refused=f"policy refused by the controller: {e}",
        )
    except AdminError as e:
        return PolicySync(pending=f"policy not pushed yet: {e}", failed=True)
    logger.info("policy %s pushed", h)
    return PolicySync(status={"appliedPolicy": h, "policyRefused": None})


# ------------------------------------------------------------- pool bounds
def _bounded_groups(spec: Obj, groups: list[Obj]) -> tuple[list[Obj], list[str]]:
    """``groups`` with each pool's minReplicas/maxReplicas from the spec, and the pools
    still above their new maximum. A pool's maxReplicas never drops below its replicas:
    KubeRay would delete pods of its own choosing, undrained, to meet it; the shrink
    goes through a drain (the scale pass) and the maximum follows."""
    pools = {p["name"]: p for p in spec["pools"]}
    out, held = [], []
    for group in groups:
        pool = pools.get(group["groupName"])
        if pool is None:
            out.append(group)
            continue
        group = dict(group)
        replicas = int(group.get("replicas", 0))
        group["minReplicas"] = pool["minWorkers"]
        group["maxReplicas"] = max(pool["maxWorkers"], replicas)
        if replicas > pool["maxWorkers"]:
            held.append(f"{pool['name']} {replicas}>{pool['maxWorkers']}")
        out.append(group)
    return out, held


def _rc_ready(rc: Obj | None) -> bool:
    """KubeRay reports the RayCluster ready for its current spec."""
    if rc is None:
        return False
    status = rc.get("status", {})
    seen = status.get("observedGeneration")
    current = rc.get("metadata", {}).get("generation")
    return status.get("state") == "ready" and (seen is None or current is None or seen >= current)


def _progressing(
    rc: Obj | None,
    held: list[str],
    policy: PolicySync,
    now: str,
    generation: int,
    rollout_status: Obj | None = None,
) -> Obj:
    """``Progressing``: True while a spec change is being applied, False once settled."""
    reasons = []
    if rollout_status:
        reasons.append(
            (
                f"Rollout{rollout_status['phase']}",
                rollout_status.get("message")
                or f"rolling out {rollout_status['target']} to replace {rollout_status['from']}",
            )
        )
    if not _rc_ready(rc):
        reasons.append(("RayClusterStarting", "waiting for the RayCluster to be ready"))
    if held:
        reasons.append(("PoolBoundsPending", f"pools above maxWorkers: {', '.join(held)}"))
    if policy.pending:
        reasons.append(("PolicyPending", policy.pending))
    if not reasons:
        return render.condition("Progressing", False, "Applied", "", now, generation)
    return render.condition(
        "Progressing", True, reasons[0][0], "; ".join(m for _, m in reasons), now, generation
    )


async def reconcile(body: Obj, ctx: OperatorContext, logger: logging.Logger = log) -> None:
    """Create or update the ConfigMap and the RayCluster of a MoEDeployment; set status."""
    name, namespace, generation = _ids(body)
    spec = await _validated(ctx, body)
    await _ensure_auth_secret(ctx, name, namespace, body)
    active = _active_name(body)
    rc = await ctx.kube.get(RAY_CLUSTERS, namespace, active)
    if rc is not None and rollout.checkpoint_of(rc) not in (None, rollout.checkpoint_hash(spec)):
        # A new checkpoint: never in place (the head would restart and drop requests).
        await _roll_out(body, ctx, spec, rc, logger)
        return
    draining = await _settle_rollout(body, ctx, active, logger)
    replicas = render.group_replicas(rc) if rc else None
    config_map, desired_rc = rollout.render_children_for(active, name, spec, body, replicas)
    if rc is not None:
        # Keep a shrink KubeRay has not finished yet (pods named for deletion).
        pending = {
            g["groupName"]: g["scaleStrategy"]
            for g in rc["spec"].get("workerGroupSpecs", [])
            if g.get("scaleStrategy", {}).get("workersToDelete")
        }
        for group in desired_rc["spec"]["workerGroupSpecs"]:
            if group["groupName"] in pending:
                group["scaleStrategy"] = pending[group["groupName"]]
            # A lowered maxWorkers: keep the pods until the scale pass has drained them.
            group["replicas"] = max(group["replicas"], replicas.get(group["groupName"], 0))
        desired_rc["spec"]["workerGroupSpecs"], _ = _bounded_groups(
            spec, desired_rc["spec"]["workerGroupSpecs"]
        )
    await _apply(ctx, CONFIG_MAPS, config_map)
    rc = await _apply(ctx, RAY_CLUSTERS, desired_rc)
    await _apply(ctx, SERVICES, rollout.render_service(name, spec, body, active))
    logger.info("RayCluster %s/%s %s", namespace, active, "updated" if replicas else "created")
    if _rc_ready(rc):
        # Running: the new bounds and policy reach it now, not at the next scale tick.
        await scale(body, ctx, logger, rc=rc, generation_applied=True, rollout_status=draining)
        if draining:
            raise kopf.TemporaryError(draining["message"], delay=draining["delay"])
        return

    now = ctx.now()
    ready = _rc_ready(rc)
    pools = render.pool_status(spec, rc, [], None)
    _, held = _bounded_groups(spec, rc["spec"].get("workerGroupSpecs", []))
    policy = await _sync_policy(body, spec, await _desired_policy(ctx, body, spec), None, logger)
    await _write_status(
        ctx,
        body,
        {
            "observedGeneration": generation,
            "rayCluster": active,
            "endpoint": rollout.endpoint(name, namespace, spec),
            "workers": sum(p["replicas"] for p in pools.values()),
            "pools": pools,
            "conditions": [
                render.condition(
                    "Ready",
                    ready,
                    "RayClusterReady" if ready else "RayClusterStarting",
                    "RayCluster is ready" if ready else "waiting for the RayCluster to be ready",
                    now,
                    generation,
                ),
                _progressing(rc, held, policy, now, generation, draining),
                render.condition(
                    "Degraded",
                    bool(policy.refused),
                    "PolicyRefused" if policy.refused else "SpecApplied",
                    policy.refused,
                    now,
                    generation,
                ),
            ],
        },
    )


async def scale(
    body: Obj,
    ctx: OperatorContext,
    logger: logging.Logger = log,
    rc: Obj | None = None,
    generation_applied: bool = False,
    rollout_status: Obj | None = None,
) -> None:
    """Size every worker group to the controller's demand within the pool bounds,
    draining before a shrink, and push the autoscaling policy if it changed.

    :func:`reconcile` runs this pass right after a spec change reached a running
    RayCluster (``rc``, ``generation_applied``: it then also reports the generation).
    """
    name, namespace, generation = _ids(body)
    if rc is None:
        # The timer's body can lag by a whole reconcile (kopf queues the object's events
        # while a handler runs); a rollout may have switched the active RayCluster since.
        body = await ctx.kube.get(DEPLOYMENTS, namespace, name) or body
        name, namespace, generation = _ids(body)
    try:
        validate_name(name)
        spec = validate_spec(body.get("spec", {}))
    except SpecError:
        return  # reconcile() reported it; nothing to scale
    active = _active_name(body)
    if rc is None:
        rc = await ctx.kube.get(RAY_CLUSTERS, namespace, active)
    if rc is None:
        raise kopf.TemporaryError("RayCluster not created yet", delay=ctx.config.retry_delay_s)
    if rollout_status is None:
        rollout_status = body.get("status", {}).get("rollout")
    applied: Obj = (
        {
            "observedGeneration": generation,
            "rayCluster": active,
            "endpoint": rollout.endpoint(name, namespace, spec),
        }
        if generation_applied
        else {}
    )
    policy_text = await _desired_policy(ctx, body, spec)
    ref = render.admin_key_ref(name, spec)
    admin_key = await _secret_value(ctx, namespace, ref, "the admin API key")
    pods = await ctx.kube.list(PODS, namespace, {render.RAY_LABEL_CLUSTER: rc["metadata"]["name"]})
    pods = [p for p in pods if render.RAY_LABEL_GROUP in p["metadata"].get("labels", {})]
    now = ctx.now()
    rc_ready = _rc_ready(rc)

    admin = ctx.admin_factory(ctx.admin_url(name, namespace, spec, active), admin_key, ctx.config)
    try:
        try:
            demand = await admin.demand()
        except AdminError as e:
            _, held = _bounded_groups(spec, rc["spec"].get("workerGroupSpecs", []))
            policy = _policy_state(body, policy_text) or PolicySync(
                pending=f"policy not pushed yet: {e}"
            )
            await _write_status(
                ctx,
                body,
                {
                    **applied,
                    "pools": render.pool_status(spec, rc, pods, None),
                    "conditions": [
                        render.condition(
                            "Ready", False, "AdminUnreachable", str(e), now, generation
                        ),
                        _progressing(rc, held, policy, now, generation, rollout_status),
                    ],
                },
            )
            raise kopf.TemporaryError(
                f"admin API not reachable yet: {e}", delay=ctx.config.retry_delay_s
            ) from None
        demand_obj = demand.model_dump()
        plan = render.plan_scale(spec, rc, demand_obj, pods)
        refused = ""
        if plan.drain_nodes:
            try:
                drained = await admin.drain(nodes=plan.drain_nodes)
                logger.info("drained workers %s on %s", drained, plan.drain_nodes)
            except AdminError as e:
                # Keep every pod; grow what needs growing, shrink again next time.
                refused = f"drain of {', '.join(plan.drain_nodes)} not done: {e}"
                logger.warning(refused)
                plan = render.ScalePlan(
                    {
                        k: (render.PoolScale(k, p.current, p.current) if p.shrinks else p)
                        for k, p in plan.pools.items()
                    }
                )
        policy = await _sync_policy(body, spec, policy_text, admin, logger)
    finally:
        await admin.aclose()

    groups, held = _bounded_groups(spec, render.apply_scale(rc, plan))
    if plan.changes or groups != rc["spec"].get("workerGroupSpecs", []):
        patch: Obj = {"spec": {"workerGroupSpecs": groups}}
        if rc["metadata"].get("resourceVersion"):
            # Optimistic concurrency: fail rather than overwrite a concurrent change.
            patch["metadata"] = {"resourceVersion": rc["metadata"]["resourceVersion"]}
        rc = await ctx.kube.patch(RAY_CLUSTERS, namespace, rc["metadata"]["name"], patch) or rc
        for change in plan.changes:
            logger.info(
                "pool %s: %d -> %d workers%s",
                change.pool,
                change.current,
                change.desired,
                f" (removing {', '.join(change.remove_pods)})" if change.remove_pods else "",
            )

    pools = render.pool_status(spec, rc, pods, demand_obj)
    unsettled = [
        n
        for n, p in pools.items()
        if p["replicas"] != p["readyReplicas"] or p.get("desired", p["replicas"]) != p["replicas"]
    ]
    unhealthy = [w.worker_id for w in demand.workers if not w.healthy]
    degraded_msg = "; ".join(
        m
        for m in (
            refused,
            policy.refused,
            f"unhealthy workers: {', '.join(unhealthy)}" if unhealthy else "",
        )
        if m
    )
    degraded_reason = (
        "DrainRefused"
        if refused
        else "PolicyRefused"
        if policy.refused
        else ("UnhealthyWorkers" if unhealthy else "Healthy")
    )
    scaling_msg = ", ".join(f"{c.pool} {c.current}->{c.desired}" for c in plan.changes) or (
        f"pools settling: {', '.join(unsettled)}" if unsettled else ""
    )
    await _write_status(
        ctx,
        body,
        {
            **applied,
            **policy.status,
            "epoch": demand.epoch or 0,  # 0: no expert map published yet
            "workers": sum(p["replicas"] for p in pools.values()),
            "pools": pools,
            "conditions": [
                render.condition(
                    "Ready",
                    rc_ready,
                    "RayClusterReady" if rc_ready else "RayClusterStarting",
                    "" if rc_ready else "waiting for the RayCluster to be ready",
                    now,
                    generation,
                ),
                render.condition(
                    "Scaling",
                    bool(plan.changes or unsettled),
                    "WorkerGroupsResized"
                    if plan.changes
                    else ("PodsSettling" if unsettled else "Stable"),
                    scaling_msg,
                    now,
                    generation,
                ),
                _progressing(rc, held, policy, now, generation, rollout_status),
                render.condition(
                    "Degraded", bool(degraded_msg), degraded_reason, degraded_msg, now, generation
                ),
            ],
        },
    )
    if policy.failed:
        raise kopf.TemporaryError(policy.pending, delay=ctx.config.retry_delay_s)


async def delete(body: Obj, ctx: OperatorContext, logger: logging.Logger = log) -> None:
    """Delete the children now (owner references would also let the GC do it, later)."""
    name, namespace, _ = _ids(body)
    clusters = {render.raycluster_name(name)} | {
        rc["metadata"]["name"]
        for rc in await ctx.kube.list(RAY_CLUSTERS, namespace, {render.LABEL_DEPLOYMENT: name})
    }
    for rc_name in sorted(clusters):
        await _delete_cluster(ctx, namespace, rc_name, logger)
    if await ctx.kube.delete(SERVICES, namespace, rollout.service_name(name)):
        logger.info("deleted services %s/%s", namespace, rollout.service_name(name))


async def _delete_cluster(
    ctx: OperatorContext, namespace: str, rc_name: str, logger: logging.Logger
) -> None:
    """Delete one RayCluster and its Serve ConfigMap (KubeRay stops its pods; the head's
    Serve app drains the requests in flight on SIGTERM)."""
    for res, child in ((RAY_CLUSTERS, rc_name), (CONFIG_MAPS, render.config_map_name(rc_name))):
        if await ctx.kube.delete(res, namespace, child):
            logger.info("deleted %s %s/%s", res[1], namespace, child)


# ---------------------------------------------------------- checkpoint rollout
async def _roll_out(
    body: Obj, ctx: OperatorContext, spec: Obj, active_rc: Obj, logger: logging.Logger
) -> None:
    """Bring up the new checkpoint's RayCluster next to the active one; switch the
    Service once it is ready and healthy; then :func:`reconcile` finishes (drain)."""
    name, namespace, generation = _ids(body)
    active = active_rc["metadata"]["name"]
    target = rollout.target_name(name, spec)
    previous = body.get("status", {}).get("rollout") or {}
    if previous.get("target") not in (None, target, active):
        # The spec moved on to yet another checkpoint: that one never took traffic.
        await _delete_cluster(ctx, namespace, previous["target"], logger)
    # As many workers as the running one has now: it takes over all of its traffic.
    config_map, desired = rollout.render_children_for(
        target, name, spec, body, render.group_replicas(active_rc)
    )
    await _apply(ctx, CONFIG_MAPS, config_map)
    target_rc = await _apply(ctx, RAY_CLUSTERS, desired)
    state: Obj = {"target": target, "from": active, "checkpoint": rollout.checkpoint_hash(spec)}
    if not _rc_ready(target_rc):
        state |= {"phase": "Starting", "message": f"waiting for RayCluster {target} to be ready"}
    else:
        admin_key = await _secret_value(
            ctx, namespace, render.admin_key_ref(name, spec), "the admin API key"
        )
        admin = ctx.admin_factory(
            ctx.admin_url(name, namespace, spec, target), admin_key, ctx.config
        )
        try:
            await admin.health()
        except AdminError as e:
            state |= {"phase": "Verifying", "message": f"waiting for {target}'s /health: {e}"}
        finally:
            await admin.aclose()
    now = ctx.now()
    if "phase" in state:
        await _write_status(
            ctx,
            body,
            {
                "observedGeneration": generation,
                "rollout": state,
                "conditions": [_progressing(active_rc, [], PolicySync(), now, generation, state)],
            },
        )
        raise kopf.TemporaryError(state["message"], delay=ctx.config.retry_delay_s)

    # Ready and healthy: new requests go to the target from now on.
    await _apply(ctx, SERVICES, rollout.render_service(name, spec, body, target))
    state |= {
        "phase": "Draining",
        "switchedAt": now,
        "message": f"traffic on {target}; {active} drains",
    }
    logger.info("service %s switched from %s to %s", rollout.service_name(name), active, target)
    await _write_status(
        ctx,
        body,
        {
            "rayCluster": target,
            "endpoint": rollout.endpoint(name, namespace, spec),
            "rollout": state,
            # The target read the policy from its own ConfigMap; push the current one again.
            "appliedPolicy": None,
            "policyRefused": None,
            "conditions": [_progressing(target_rc, [], PolicySync(), now, generation, state)],
        },
    )
    fresh = await ctx.kube.get(DEPLOYMENTS, namespace, name)
    assert fresh is not None, f"MoEDeployment {namespace}/{name} vanished during a rollout"
    await reconcile(fresh, ctx, logger)


async def _settle_rollout(
    body: Obj, ctx: OperatorContext, active: str, logger: logging.Logger
) -> Obj | None:
    """Finish the rollout ``status.rollout`` records, now that ``active`` runs the spec's
    checkpoint: delete the old RayCluster once it has drained, or the target of a
    rollout the spec went back on. Returns the rollout (with ``delay``) while the old
    RayCluster still drains, else None."""
    _, namespace, _ = _ids(body)
    state = body.get("status", {}).get("rollout")
    if not state:
        return None
    if state["target"] != active:
        # Back to the running checkpoint before the switch: the target goes.
        await _delete_cluster(ctx, namespace, state["target"], logger)
        await _write_status(ctx, body, {"rollout": None})
        body["status"]["rollout"] = None
        return None
    waited = _seconds_between(state.get("switchedAt", ctx.now()), ctx.now())
    left = ctx.config.rollout_drain_s - waited
    if left > 0:
        return {**state, "delay": left}
    await _delete_cluster(ctx, namespace, state["from"], logger)
    logger.info("rollout to %s done", active)
    await _write_status(ctx, body, {"rollout": None})
    body["status"]["rollout"] = None
    return None
