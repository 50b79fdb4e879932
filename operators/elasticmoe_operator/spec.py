"""Validate a MoEDeployment spec and fill in its defaults.

The API server already checks a spec against the CRD's schema, but the operator
checks again with the same schema (a CRD installed by hand may be older, and
tests feed specs directly): every error names the field by its path, e.g.
``spec.pools[1].accelerator: 'nvidia.com/gpux' is not one of [...]``. Rules a
structural schema cannot say (unique pool names, min <= max, exactly one
checkpoint location, policy pools that exist) are checked here too.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema

from operators.elasticmoe_operator import crd

_NAME_MAX = 40  # RayCluster and pod names are built from it and must stay <= 63 chars


class SpecError(ValueError):
    """A spec that can never work as written; ``field`` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _path(parts: Any, root: str = "spec") -> str:
    out = root
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's ``default``s filled in, as the API server does."""
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = with_defaults(sub, out[key])
        return out
    if isinstance(value, list) and "items" in schema:
        return [with_defaults(schema["items"], v) for v in value]
    return value


_SPEC_SCHEMA = crd.spec_schema()
_VALIDATOR = jsonschema.Draft7Validator(_SPEC_SCHEMA)


def validate_name(name: str) -> None:
    """A MoEDeployment name becomes the RayCluster's and the elasticmoe deployment's."""
    import re

    if len(name) > _NAME_MAX or not re.match(crd.DNS_LABEL, name):
        raise SpecError(
            "metadata.name",
            f"{name!r} must be a DNS label (lowercase letters, digits, '-') of at most "
            f"{_NAME_MAX} characters",
        )


def validate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with defaults, or :class:`SpecError` naming the first bad field."""
    errors = sorted(_VALIDATOR.iter_errors(spec), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        raise SpecError(_path(err.absolute_path), err.message)
    spec = with_defaults(_SPEC_SCHEMA, spec)

    names: set[str] = set()
    for i, pool in enumerate(spec["pools"]):
        field = f"spec.pools[{i}]"
        if pool["name"] in names:
            raise SpecError(f"{field}.name", f"{pool['name']!r} is used by another pool")
        if pool["name"] == "head":
            raise SpecError(f"{field}.name", "'head' is reserved for the Ray head group")
        names.add(pool["name"])
        if pool["minWorkers"] > pool["maxWorkers"]:
            raise SpecError(
                f"{field}.minWorkers",
                f"{pool['minWorkers']} > maxWorkers ({pool['maxWorkers']})",
            )

    ckpt = spec["model"]["checkpoint"]
    if ("pvc" in ckpt) == ("uri" in ckpt):
        raise SpecError("spec.model.checkpoint", "set exactly one of pvc or uri")

    auto = spec.get("autoscaling", {})
    if "policy" in auto and "policyConfigMap" in auto:
        raise SpecError("spec.autoscaling", "set at most one of policy or policyConfigMap")
    if "policy" in auto:
        check_policy(auto["policy"], spec, "spec.autoscaling.policy")

    store = spec.get("stateStore", {"type": "memory"})
    if store.get("type") == "redis" and "redis" not in store:
        raise SpecError("spec.stateStore.redis", "required when stateStore.type is redis")
    return spec


def check_policy(policy: Any, spec: dict[str, Any], field: str) -> None:
    """The policy is a valid AutoscalingPolicy whose pools are pools of ``spec``."""
    from elasticmoe.core.policy import PolicyError, parse_policy, policy_from_text

    try:
        doc = policy_from_text(policy) if isinstance(policy, str) else parse_policy(policy)
    except PolicyError as e:
        # "spec.pools[0].hot: unknown field ..." -> spec.autoscaling.policy.spec.pools[0].hot
        where, _, what = e.errors[0].partition(": ")
        if not what or where.startswith(("<", "line ")):
            raise SpecError(field, "; ".join(e.errors)) from None
        raise SpecError(f"{field}.{where}", what) from None
    by_name = {p["name"]: p for p in spec["pools"]}
    for i, pool in enumerate(doc.spec.pools):
        where = f"{field}.spec.pools[{i}]"
        if pool.name not in by_name:
            raise SpecError(
                where, f"pool {pool.name!r} is not in spec.pools ({', '.join(by_name)})"
            )
        if pool.accelerator != by_name[pool.name]["accelerator"]:
            raise SpecError(
                f"{where}.accelerator",
                f"{pool.accelerator!r} differs from the pool's accelerator "
                f"{by_name[pool.name]['accelerator']!r} in spec.pools",
            )
    primary = spec["pools"][0]["name"]
    if primary not in {p.name for p in doc.spec.pools}:
        raise SpecError(
            f"{field}.spec.pools",
            f"must include the first pool of spec.pools ({primary!r}): the controller "
            "starts its workers there",
        )
