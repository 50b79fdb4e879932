"""Shape of a deployment: model, workers, engines, replicas, state store, policy."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from elasticmoe.core.experts import LogicalExpert, parse_expert
from elasticmoe.experts.priority import BackgroundPriority
from elasticmoe.model.config import MoEModelConfig


class PoolConfig(BaseModel):
    """One pool of expert workers on one accelerator type (one KubeRay worker group)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", description="pool name")
    device: Literal["cpu", "cuda", "npu"] = "cpu"
    num_workers: int = Field(1, ge=0, description="workers started with the deployment")
    max_workers: int = Field(64, ge=1)
    slots_per_worker: int | None = Field(
        None,
        ge=1,
        description="default: from expert_memory_gb, else the deployment's slots_per_worker "
        "(or its default)",
    )
    expert_memory_gb: float | None = Field(
        None,
        gt=0,
        le=1 << 20,
        description="device memory one worker gives expert weights: its slots are as many "
        "experts as fit (an Ascend 910 and an H100 pool hold different numbers)",
    )
    worker_num_cpus: float = Field(1.0, ge=0)
    worker_num_gpus: float = Field(0.0, ge=0)
    # Ray resources every worker of the pool asks for (e.g. {"NPU": 1}, a custom label)
    worker_resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_counts(self) -> PoolConfig:
        if self.num_workers > self.max_workers:
            raise ValueError(
                f"pool {self.name!r}: num_workers={self.num_workers} > "
                f"max_workers={self.max_workers}"
            )
        return self


class DeploymentConfig(BaseModel):
    """Shape of a distributed deployment (engine settings go in ``engine``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    mode: Literal["local", "distributed"] = Field(
        "distributed", description="local: experts inside each engine (no workers, no controller)"
    )
    name: str = Field(
        "default",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="deployment name (DNS label): names the actors and store keys",
    )
    num_workers: int = Field(2, ge=1)
    max_workers: int = Field(64, ge=1)
    pool: str = "default"
    pools: list[PoolConfig] = Field(
        default_factory=list,
        description="worker pools, one per accelerator type; empty: one pool named `pool` "
        "from num_workers, max_workers, device and the worker_* fields",
    )
    num_engines: int = Field(1, ge=1)
    slots_per_worker: int | None = Field(
        None, ge=1, description="default: room for the initial replicas plus 25% spare"
    )
    replicas_per_expert: int = Field(1, ge=1)
    # "layer:expert" -> number of replicas, overriding replicas_per_expert
    expert_replicas: dict[str, int] = Field(default_factory=dict)
    device: Literal["cpu", "cuda", "npu"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    worker_num_cpus: float = Field(1.0, ge=0)
    worker_num_gpus: float = Field(0.0, ge=0)
    worker_resources: dict[str, float] = Field(default_factory=dict)
    worker_threads: int = Field(1, ge=1)
    worker_grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="port of every worker's gRPC server (0: any free one); fixed where "
        "one worker runs per pod, so NetworkPolicies can name it",
    )
    engine_num_cpus: float = Field(1.0, ge=0)
    engine_num_gpus: float = Field(0.0, ge=0)
    engine_threads: int | None = Field(None, ge=1)
    engine: dict[str, Any] = Field(default_factory=dict)
    router: dict[str, Any] = Field(default_factory=dict)
    ray_address: str | None = None
    ray_worker_niceness: int = Field(
        0,
        ge=0,
        le=19,
        description="nice value of the worker processes of a Ray instance the deployment "
        "starts itself (engines, HTTP front, expert workers); Ray's own default, 15, lets "
        "any other process on the machine take the CPU from serving first",
    )
    state_store: str | None = Field(None, description="None/'memory://' or 'redis://host:port/db'")
    policy: str | None = Field(None, description="autoscaling policy YAML file")
    fault_injection: bool = Field(
        False, description="install the gRPC fault hook on workers (chaos drills; off by default)"
    )
    spare_workers: int = Field(
        0, ge=0, description="started, empty workers kept ready so add_worker is instant"
    )
    background_priority: BackgroundPriority = Field(
        "idle",
        description="CPU priority of a worker's background threads (replica loads, peer "
        "copies, its process start-up): idle = SCHED_IDLE, low = nice 19, normal = unchanged; "
        "serving threads are never lowered",
    )
    drain_timeout_s: float = Field(60.0, gt=0)
    rpc_timeout_s: float = Field(120.0, gt=0)
    worker_start_timeout_s: float = Field(600.0, gt=0)
    map_poll_s: float = Field(2.0, gt=0, description="engines pull the map this often")
    health_check_s: float = Field(
        2.0, gt=0, description="the controller checks workers this often; 2 misses = dead"
    )

    @model_validator(mode="after")
    def _check_workers(self) -> DeploymentConfig:
        if self.pools:
            names = [p.name for p in self.pools]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"pools: names must be unique; repeated: {', '.join(dupes)}")
            if sum(p.num_workers for p in self.pools) < 1:
                raise ValueError("pools: num_workers of all pools add up to 0; start at least 1")
            # the top-level fields describe the first pool from here on
            self.pool = self.pools[0].name
            self.num_workers = sum(p.num_workers for p in self.pools)
            self.max_workers = sum(p.max_workers for p in self.pools)
        if self.num_workers > self.max_workers:
            raise ValueError(f"num_workers={self.num_workers} > max_workers={self.max_workers}")
        if self.policy is not None:
            from elasticmoe.core.policy import load_policy

            check_policy_pools(
                self, [p.name for p in load_policy(self.policy).spec.pools], self.policy
            )
        return self

    def worker_pools(self) -> list[PoolConfig]:
        """Every pool, in order (the first gets the spares); without ``pools``, the one
        pool the top-level fields describe."""
        if self.pools:
            return list(self.pools)
        return [
            PoolConfig(
                name=self.pool,
                device=self.device,
                num_workers=self.num_workers,
                max_workers=self.max_workers,
                slots_per_worker=self.slots_per_worker,
                worker_num_cpus=self.worker_num_cpus,
                worker_num_gpus=self.worker_num_gpus,
                worker_resources=dict(self.worker_resources),
            )
        ]

    def get_pool(self, name: str) -> PoolConfig:
        """The pool called ``name``; ``ValueError`` naming the pools there are."""
        for p in self.worker_pools():
            if p.name == name:
                return p
        names = ", ".join(p.name for p in self.worker_pools())
        raise ValueError(f"no pool {name!r} in this deployment (its pools: {names})")

    def num_slots(
        self, num_experts: int, pool: str | None = None, expert_bytes: int | None = None
    ) -> int:
        """Slots per worker of ``pool`` (default: the first): as configured, else as many
        experts of ``expert_bytes`` as its ``expert_memory_gb`` holds, else room for the
        initial replicas + 25% spread over the initial workers."""
        own = self.get_pool(pool) if pool is not None else (self.pools or [None])[0]
        if own is not None and own.slots_per_worker:
            return own.slots_per_worker
        if own is not None and own.expert_memory_gb and expert_bytes:
            fit = int(own.expert_memory_gb * 2**30 // expert_bytes)
            if fit < 1:
                raise ValueError(
                    f"pools[{own.name}].expert_memory_gb={own.expert_memory_gb} holds no "
                    f"expert of {expert_bytes} bytes; give it more memory or set "
                    "slots_per_worker"
                )
            return fit
        if self.slots_per_worker:
            return self.slots_per_worker
        total = num_experts * self.replicas_per_expert + sum(
            n - self.replicas_per_expert for n in self.expert_replicas.values()
        )
        return math.ceil(1.25 * total / self.num_workers)

    def pool_max_workers(self, name: str) -> int:
        """The most workers pool ``name`` may have."""
        return self.get_pool(name).max_workers

    def resolved_dtype(self, model: MoEModelConfig) -> str:
        """The worker/engine dtype (``auto``: the checkpoint's, else float32)."""
        if self.dtype != "auto":
            return self.dtype
        return model.raw.get("dtype") or model.raw.get("torch_dtype") or "float32"

    def replica_counts(self, experts: list[LogicalExpert]) -> dict[LogicalExpert, int]:
        """Replicas of every logical expert (validated against the model)."""
        counts = {e: self.replicas_per_expert for e in experts}
        for key, n in self.expert_replicas.items():
            try:
                expert = parse_expert(key)
            except ValueError as e:
                raise ValueError(f"expert_replicas key: {e}") from None
            if expert not in counts:
                raise ValueError(f"expert_replicas key {key!r}: no such expert in the model")
            counts[expert] = n
        return counts


def check_policy_pools(config: DeploymentConfig, policy_pools: list[str], source: str) -> None:
    """A policy must name every pool of the deployment (``ValueError`` naming those missing)."""
    missing = [p.name for p in config.worker_pools() if p.name not in policy_pools]
    theirs = ", ".join(policy_pools)
    if missing and not config.pools:
        raise ValueError(
            f"pool={missing[0]!r} is not a pool of policy {source} "
            f"(its pools: {theirs}); set pool to one of them"
        )
    if missing:
        raise ValueError(
            f"pools: {', '.join(repr(m) for m in missing)} not among the pools of policy "
            f"{source} (its pools: {theirs}); add them to the policy's spec.pools"
        )
