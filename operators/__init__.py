"""Kubernetes operators of elasticmoe (see :mod:`operators.elasticmoe_operator`)."""
