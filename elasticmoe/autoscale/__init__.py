"""Autoscaling off the cluster: replay a load trace through a policy.

The policy document (:mod:`elasticmoe.core.policy`) and the pure decision
(:mod:`elasticmoe.core.decide`) live in the decision core; this package runs
them against a recorded trace (:mod:`~elasticmoe.autoscale.simulate`).
"""
