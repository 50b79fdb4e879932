"""Generated protobuf package ``elasticmoe.v1``."""
