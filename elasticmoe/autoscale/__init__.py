"""Autoscaling: YAML policies, the pure decision function, and a trace simulator.

- :mod:`~elasticmoe.autoscale.policy`: the ``AutoscalingPolicy`` document
  (pydantic schema, :func:`load_policy`, JSON Schema export).
- :mod:`~elasticmoe.autoscale.decide`: ``decide(policy, observed, now, state)
  -> (actions, state)``, no hidden state, no clock.
- :mod:`~elasticmoe.autoscale.simulate`: replay a load trace through a policy
  without a cluster.
"""

from elasticmoe.autoscale.decide import ObservedState, PolicyState, WorkerState, decide
from elasticmoe.autoscale.policy import (
    Policy,
    PolicyError,
    load_policy,
    policy_json_schema,
    write_schema,
)
from elasticmoe.autoscale.simulate import SimulationResult, load_trace, simulate

__all__ = [
    "ObservedState",
    "Policy",
    "PolicyError",
    "PolicyState",
    "SimulationResult",
    "WorkerState",
    "decide",
    "load_policy",
    "load_trace",
    "policy_json_schema",
    "simulate",
    "write_schema",
]
