"""Checkpoints shipped with elasticmoe (package data).

``default/`` is the trained default model, made by ``make default-model``
(``elasticmoe train --config examples/train/default.yaml``).
"""
