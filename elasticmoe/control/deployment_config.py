"""Shape of a deployment: model, workers, engines, replicas, state store, policy."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from elasticmoe.core.experts import LogicalExpert, parse_expert
from elasticmoe.model.config import MoEModelConfig


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
    state_store: str | None = Field(None, description="None/'memory://' or 'redis://host:port/db'")
    policy: str | None = Field(None, description="autoscaling policy YAML file")
    fault_injection: bool = Field(
        False, description="install the gRPC fault hook on workers (chaos drills; off by default)"
    )
    spare_workers: int = Field(
        0, ge=0, description="started, empty workers kept ready so add_worker is instant"
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
        if self.num_workers > self.max_workers:
            raise ValueError(f"num_workers={self.num_workers} > max_workers={self.max_workers}")
        if self.policy is not None:
            from elasticmoe.core.policy import load_policy

            pools = [p.name for p in load_policy(self.policy).spec.pools]
            if self.pool not in pools:
                raise ValueError(
                    f"pool={self.pool!r} is not a pool of policy {self.policy} "
                    f"(its pools: {', '.join(pools)}); set pool to one of them"
                )
        return self

    def num_slots(self, num_experts: int) -> int:
        """Slots per worker: as configured, else room for the initial replicas + 25%."""
        if self.slots_per_worker:
            return self.slots_per_worker
        total = num_experts * self.replicas_per_expert + sum(
            n - self.replicas_per_expert for n in self.expert_replicas.values()
        )
        return math.ceil(1.25 * total / self.num_workers)

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
