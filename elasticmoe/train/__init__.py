"""Training MoE checkpoints on Ray Train, and recording expert-routing traces.

``elasticmoe train --config FILE`` runs :func:`run_training`; ``elasticmoe trace record``
runs :func:`~elasticmoe.train.trace.record_trace`. Importing this package does not import
Ray.
"""

from elasticmoe.train.config import TrainConfig, TrainConfigError, load_train_config

__all__ = ["TrainConfig", "TrainConfigError", "load_train_config"]
