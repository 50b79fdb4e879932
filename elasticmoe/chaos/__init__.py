"""Chaos drills: inject faults into a running deployment under load and report on recovery."""

from elasticmoe.chaos.faults import FaultInjector, RedisPause
from elasticmoe.chaos.scenarios import SCENARIOS, run_scenario

__all__ = ["SCENARIOS", "FaultInjector", "RedisPause", "run_scenario"]
