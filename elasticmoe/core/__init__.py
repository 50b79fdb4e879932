"""The decision core: pure data and pure functions, no torch, no Ray, no I/O.

Everything above it (model, experts, router, engine, control, serve, the
operator) decides with these and performs the effects itself.

- :mod:`~elasticmoe.core.experts`: :class:`LogicalExpert` and its one parser.
- :mod:`~elasticmoe.core.expert_map`: the expert map (logical expert ->
  replicas, with an epoch).
- :mod:`~elasticmoe.core.actions`: scaling actions, plain journaled data.
- :mod:`~elasticmoe.core.placement`: placement metrics, diffs and algorithms.
- :mod:`~elasticmoe.core.policy`: the ``AutoscalingPolicy`` document.
- :mod:`~elasticmoe.core.decide`: ``decide(policy, observed, now, state)``.
- :mod:`~elasticmoe.core.protocol`: the zero-downtime change as a state
  machine of journaled steps, and which plans the cluster accepts.
"""
