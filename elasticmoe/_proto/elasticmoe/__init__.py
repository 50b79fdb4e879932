"""Generated protobuf package ``elasticmoe``."""
