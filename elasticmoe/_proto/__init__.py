"""Code generated from ``protos/`` by ``python -m elasticmoe._proto.generate``; do not edit.

The layout mirrors the proto packages (``elasticmoe.v1`` lives in
``elasticmoe/_proto/elasticmoe/v1``) so the descriptors register under the same
file names (``elasticmoe/v1/expert.proto``) that other languages' stubs use.
"""
