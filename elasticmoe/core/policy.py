"""Autoscaling policy documents: a versioned YAML schema and its loader.

A policy says *when* the controller changes the expert placement and the
worker set; :mod:`elasticmoe.core.decide` says *what* it then does. A
document looks like a Kubernetes object so that the operator can carry it in
a custom resource unchanged::

    apiVersion: elasticmoe.io/v1alpha1
    kind: AutoscalingPolicy
    metadata:
      name: default
    spec:
      interval_s: 15
      window_s: 60
      experts: {hot_threshold: 1.5, cold_threshold: 0.3, min_replicas: 1, max_replicas: 4}
      rebalance: {enabled: true, min_balancedness: 0.8}
      pools:
        - {name: gpu, accelerator: nvidia.com/gpu, min_workers: 1, max_workers: 8}
      slo: {ttft_p99_ms: 2000, window_s: 120}

Every model forbids unknown keys, so a typo is an error rather than a
silently ignored setting. :func:`load_policy` turns pydantic's errors into one
:class:`PolicyError` that names each field by its dotted path.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

API_VERSION = "elasticmoe.io/v1alpha1"
KIND = "AutoscalingPolicy"
ACCELERATORS = ("nvidia.com/gpu", "huawei.com/Ascend910", "cpu")
SCHEMA_PATH = Path(__file__).with_name("policy.schema.json")

Accelerator = Literal["nvidia.com/gpu", "huawei.com/Ascend910", "cpu"]
# Names end up in Kubernetes objects (worker group names, labels).
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class _Strict(BaseModel):
    # extra="forbid": a misspelt key must fail loudly, not fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _at_least(info: ValidationInfo, value: float, other: str) -> None:
    """Raise when ``value`` is below the already validated field ``other``."""
    floor = info.data.get(other)
    # A missing ``other`` failed its own validation; that error is reported already.
    if floor is not None and value < floor:
        raise ValueError(f"must be >= {other} ({floor})")


class ExpertScaling(_Strict):
    """When a logical expert gains or loses replicas."""

    hot_threshold: float = Field(
        1.5,
        gt=1.0,
        description="An expert is hot when its load per replica exceeds this multiple of "
        "the mean load per replica in its layer; it then gets one more replica.",
    )
    cold_threshold: float = Field(
        0.3,
        ge=0.0,
        lt=1.0,
        validate_default=True,
        description="An expert is cold when its load per replica is below this multiple "
        "of the layer mean; it then loses a replica, down to min_replicas.",
    )
    min_replicas: int = Field(1, ge=1, description="Replicas every expert keeps.")
    max_replicas: int = Field(
        4, ge=1, validate_default=True, description="Most replicas of one expert."
    )
    replicate_cooldown_s: float = Field(
        60.0, ge=0, description="Seconds between two replications of the same expert."
    )
    evict_cooldown_s: float = Field(
        300.0,
        ge=0,
        description="Seconds after an expert was replicated or evicted before it may be "
        "evicted again (stops replicate/evict flapping).",
    )
    max_actions_per_interval: int = Field(
        4, ge=1, description="Replications plus evictions per control interval."
    )

    @field_validator("cold_threshold")
    @classmethod
    def _cold_below_hot(cls, v: float, info: ValidationInfo) -> float:
        hot = info.data.get("hot_threshold")
        if hot is not None and v >= hot:
            raise ValueError(f"must be < hot_threshold ({hot})")
        return v

    @field_validator("max_replicas")
    @classmethod
    def _max_ge_min(cls, v: int, info: ValidationInfo) -> int:
        _at_least(info, v, "min_replicas")
        return v


class RebalanceSpec(_Strict):
    """When replicas move between workers to even out the load."""

    enabled: bool = Field(True, description="Migrate replicas when the load is unbalanced.")
    min_balancedness: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Rebalance when balancedness (mean over layers of mean/max worker "
        "load) falls below this.",
    )
    max_moves_per_interval: int = Field(
        8, ge=1, description="Most replica migrations per control interval."
    )
    cooldown_s: float = Field(120.0, ge=0, description="Seconds between two rebalances.")


class PoolSpec(_Strict):
    """A group of workers on one accelerator type (one KubeRay worker group)."""

    name: str = Field(
        min_length=1, max_length=63, pattern=_DNS_LABEL, description="Pool name (DNS label)."
    )
    accelerator: Accelerator = Field("nvidia.com/gpu", description="Device of the pool.")
    min_workers: int = Field(1, ge=0, description="Workers the pool never goes below.")
    max_workers: int = Field(
        8, ge=1, validate_default=True, description="Workers the pool never goes above."
    )
    slots_per_worker: int = Field(8, ge=1, description="Expert replicas one worker holds.")
    scale_up_cooldown_s: float = Field(
        120.0, ge=0, description="Seconds between two scale-ups of this pool."
    )
    scale_down_cooldown_s: float = Field(
        600.0,
        ge=0,
        description="Seconds after any scale action in this pool before a scale-down.",
    )
    scale_down_utilization: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Remove the least loaded worker when the pool's utilisation (the "
        "larger of slot use and load/capacity) stays below this for spec.window_s.",
    )
    tokens_per_s_per_worker: float | None = Field(
        None,
        gt=0,
        description="Expert token-rows per second one worker sustains. Optional: when "
        "set, load counts toward utilisation and the simulator's latency proxy.",
    )

    @field_validator("max_workers")
    @classmethod
    def _max_ge_min(cls, v: int, info: ValidationInfo) -> int:
        _at_least(info, v, "min_workers")
        return v


class SLOSpec(_Strict):
    """Latency targets; breaching one for ``window_s`` adds a worker."""

    ttft_p99_ms: float | None = Field(
        None, gt=0, description="Target p99 time to first token (ms); unset = no target."
    )
    itl_p99_ms: float | None = Field(
        None, gt=0, description="Target p99 inter-token latency (ms); unset = no target."
    )
    window_s: float = Field(
        60.0, gt=0, description="Seconds a breach must last before a worker is added."
    )

    @property
    def enabled(self) -> bool:
        """Whether any latency target is set."""
        return self.ttft_p99_ms is not None or self.itl_p99_ms is not None


def _default_pools() -> list[PoolSpec]:
    return [PoolSpec(name="default", min_workers=1)]


class PolicySpec(_Strict):
    """The policy proper: control loop timing, expert, rebalance, pool and SLO rules."""

    interval_s: float = Field(15.0, gt=0, description="Control loop period (seconds).")
    window_s: float = Field(
        60.0,
        gt=0,
        validate_default=True,
        description="Load is summed over this many seconds; also how long utilisation "
        "must stay low before a scale-down.",
    )
    experts: ExpertScaling = Field(default_factory=ExpertScaling)
    rebalance: RebalanceSpec = Field(default_factory=RebalanceSpec)
    pools: list[PoolSpec] = Field(
        default_factory=_default_pools,
        min_length=1,
        description="Worker pools in order of preference: scale-ups go to the first "
        "pool below its max_workers.",
    )
    slo: SLOSpec = Field(default_factory=SLOSpec)

    @field_validator("window_s")
    @classmethod
    def _window_covers_interval(cls, v: float, info: ValidationInfo) -> float:
        # A window shorter than the loop period would skip tokens between two looks.
        _at_least(info, v, "interval_s")
        return v

    @field_validator("pools")
    @classmethod
    def _unique_pool_names(cls, v: list[PoolSpec]) -> list[PoolSpec]:
        names = [p.name for p in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pool names must be unique, repeated: {', '.join(dup)}")
        return v

    def pool(self, name: str) -> PoolSpec | None:
        """The pool called ``name``, or None."""
        return next((p for p in self.pools if p.name == name), None)


class Metadata(_Strict):
    """Identifies the policy."""

    name: str = Field(min_length=1, max_length=63, pattern=_DNS_LABEL)
    labels: dict[str, str] = Field(default_factory=dict)
    description: str = ""


class Policy(_Strict):
    """A whole ``AutoscalingPolicy`` document."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    api_version: Literal["elasticmoe.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["AutoscalingPolicy"]
    metadata: Metadata
    spec: PolicySpec = Field(default_factory=PolicySpec)

    def to_document(self) -> dict[str, Any]:
        """The document as plain data (YAML/JSON ready), with defaults filled in."""
        return self.model_dump(mode="json", by_alias=True)


class PolicyError(ValueError):
    """A policy document is not valid; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        n = len(errors)
        super().__init__(f"{source}: invalid policy ({n} problem{'s' * (n != 1)}):\n{lines}")


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<document>"


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class whose field ``loc`` names (to list valid keys)."""
    model: Any = Policy
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next(
            (a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if model is None:
            return None
    return model


def _describe(err: Any) -> str:
    """One pydantic error as ``path: what is wrong [; what is allowed]``."""
    loc = tuple(err["loc"])
    path = _dotted(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc)
        fields = sorted(f.alias or n for n, f in model.model_fields.items()) if model else []
        msg = f"{path}: unknown field"
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        return msg + (f"; allowed fields: {', '.join(fields)}" if fields else "")
    if kind in ("literal_error", "enum"):
        expected = err.get("ctx", {}).get("expected", "")
        allowed = [s.strip().strip("'") for s in expected.replace(" or ", ", ").split(",")]
        return f"{path}: got {err['input']!r}; allowed values: {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "missing":
        return f"{path}: required field is missing"
    if "input" in err and not isinstance(err["input"], dict | list):
        msg += f" (got {err['input']!r})"
    return f"{path}: {msg}"


# A policy document is a few KB; anything far larger is a mistake or an attack.
MAX_POLICY_BYTES = 64 * 1024


def parse_policy(data: Any, source: str = "<policy>") -> Policy:
    """Validate already parsed data (a dict) into a :class:`Policy`."""
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise PolicyError(
            source,
            [f"<document>: expected a mapping with apiVersion, kind, metadata, spec; got {got}"],
        )
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        raise PolicyError(source, [_describe(err) for err in e.errors()]) from None


def load_policy(path: str | Path) -> Policy:
    """Load and validate a policy from a YAML (or JSON) file.

    Raises :class:`PolicyError` listing every problem by dotted field path
    (``spec.experts.max_replicas: must be >= min_replicas (2), got 1``); a
    YAML syntax error names its line and column.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_POLICY_BYTES:
            raise PolicyError(str(path), [f"the file is {size} bytes; at most {MAX_POLICY_BYTES}"])
        text = path.read_text()
    except OSError as e:
        raise PolicyError(str(path), [f"cannot read the file: {e.strerror or e}"]) from None
    return policy_from_text(text, str(path))


def policy_from_text(text: str, source: str = "<policy>") -> Policy:
    """Validate a policy given as YAML or JSON text (what the admin API and the operator
    receive). Text is only ever parsed, never taken for a file name."""
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise PolicyError(
            source, [f"the policy is {len(text.encode())} bytes; at most {MAX_POLICY_BYTES}"]
        )
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        what = "; ".join(str(s) for s in (e.context, e.problem) if s)
        raise PolicyError(source, [f"{where}: YAML syntax error: {what}"]) from None
    except yaml.YAMLError as e:
        raise PolicyError(source, [f"YAML syntax error: {e}"]) from None
    return parse_policy(data, source)


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema of a policy document (for editors, the CRD and CI checks)."""
    schema = Policy.model_json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://elasticmoe.io/schemas/autoscalingpolicy-v1alpha1.json",
        **schema,
    }


def write_schema(path: Path | str = SCHEMA_PATH) -> Path:
    """Write :func:`policy_json_schema` to ``path`` (default: next to this module).

    Run after changing a model here; a test fails while the committed file is stale::

        python -c "from elasticmoe.core.policy import write_schema; write_schema()"
    """
    path = Path(path)
    path.write_text(json.dumps(policy_json_schema(), indent=2) + "\n")
    return path
