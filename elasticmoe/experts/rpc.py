"""The client side of the expert workers' gRPC service: channel options and a stub cache.

Torch-free, so the controller (which only sends control RPCs) and the router
share one definition of the limits and one way to keep a channel per worker.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc

from elasticmoe._proto.elasticmoe.v1 import expert_pb2_grpc

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Servers and clients (router, controller, peers) must use the same limits or large
# batches fail with RESOURCE_EXHAUSTED on the client side before reaching the worker.
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class StubCache:
    """One channel and stub per worker; a worker at a new address gets a new channel."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stubs: dict[str, tuple[str, grpc.Channel, expert_pb2_grpc.ExpertServiceStub]] = {}

    def get(self, worker: str, address: str) -> expert_pb2_grpc.ExpertServiceStub:
        """The stub for ``worker`` at ``address`` (the old channel closes on a move)."""
        with self._lock:
            cached = self._stubs.get(worker)
            if cached is not None and cached[0] == address:
                return cached[2]
            if cached is not None:
                cached[1].close()
            channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            self._stubs[worker] = (address, channel, stub)
            return stub

    def drop(self, worker: str) -> None:
        """Close and forget ``worker``'s channel (it was stopped)."""
        with self._lock:
            cached = self._stubs.pop(worker, None)
        if cached is not None:
            cached[1].close()

    def close(self) -> None:
        """Close every channel."""
        with self._lock:
            stubs, self._stubs = self._stubs, {}
        for _, channel, _ in stubs.values():
            channel.close()
