"""Operator settings, read from ``ELASTICMOE_OPERATOR_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PREFIX = "ELASTICMOE_OPERATOR_"


class OperatorConfig(BaseModel):
    """What the Helm chart sets on the operator Deployment (validated at startup)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale_interval_s: float = Field(
        30.0, gt=0, description="How often each deployment's worker demand is read."
    )
    retry_delay_s: float = Field(
        15.0, gt=0, description="Delay before retrying when a dependency is not ready yet."
    )
    admin_timeout_s: float = Field(10.0, gt=0, description="Timeout of /admin/demand.")
    drain_timeout_s: float = Field(
        600.0, gt=0, description="Timeout of /admin/drain (it moves expert weights)."
    )
    rollout_drain_s: float = Field(
        30.0,
        ge=0,
        description="After a checkpoint rollout switched the Service, how long the old "
        "RayCluster keeps running (clients and kube-proxy move over) before it is deleted.",
    )
    admin_url: str | None = Field(
        None,
        description="Base URL of the admin API with {name}, {namespace} and {raycluster} "
        "placeholders; default: the RayCluster's head Service in the cluster.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        """Read ``ELASTICMOE_OPERATOR_<FIELD>`` variables; errors name the variable."""
        environ = os.environ if environ is None else environ
        data = {
            key[len(PREFIX) :].lower(): value
            for key, value in environ.items()
            if key.startswith(PREFIX)
        }
        try:
            return cls(**data)
        except ValidationError as e:
            problems = "; ".join(
                f"{PREFIX}{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
                for err in e.errors()
            )
            raise ValueError(f"bad operator settings: {problems}") from None
