"""Fault injection on an expert worker's gRPC server (chaos tests, drills).

A server interceptor, installed only when a worker is started with fault
injection enabled (off by default), that delays and/or fails ``Forward`` and
``ForwardTokens`` calls and ``ForwardStream`` and node-stream frames (a failed
frame answers UNAVAILABLE in its result; the stream goes on) and can delay
``LoadExperts`` (so a drill can catch a scaling operation half-way). The settings
can be changed while the worker runs
(``ExpertWorker.set_fault``).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import grpc


@dataclass
class FaultConfig:
    """Forward calls sleep ``delay_ms`` then fail with ``fail_rate``; LoadExperts calls
    sleep ``load_delay_ms``."""

    delay_ms: float = 0.0
    fail_rate: float = 0.0
    load_delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.load_delay_ms < 0 or not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(
                f"fault config: delay_ms and load_delay_ms must be >= 0 and fail_rate in 0..1 "
                f"(got delay_ms={self.delay_ms}, load_delay_ms={self.load_delay_ms}, "
                f"fail_rate={self.fail_rate})"
            )


class FaultInterceptor(grpc.aio.ServerInterceptor):
    """Delays or fails ``Forward`` and delays ``LoadExperts`` per :class:`FaultConfig`."""

    def __init__(self, config: FaultConfig | None = None, seed: int = 0) -> None:
        self.config = config or FaultConfig()
        self._rng = random.Random(seed)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if method.endswith("/ForwardStream"):
            return self._faulty_stream(handler)
        if not method.endswith(("/Forward", "/ForwardTokens", "/LoadExperts")):
            return handler
        inner = handler.unary_unary
        forward = not method.endswith("/LoadExperts")

        async def faulty(request, context):
            cfg = self.config
            delay = cfg.delay_ms if forward else cfg.load_delay_ms
            if delay:
                await asyncio.sleep(delay / 1e3)
            if forward and cfg.fail_rate and self._rng.random() < cfg.fail_rate:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            faulty,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def frame_fault(self) -> tuple[float, bool]:
        """For one stream frame (gRPC or node-local): seconds to delay it, and whether to
        fail it."""
        cfg = self.config
        fail = bool(cfg.fail_rate) and self._rng.random() < cfg.fail_rate
        return cfg.delay_ms / 1e3, fail

    def _faulty_stream(self, handler):
        inner = handler.stream_stream

        async def faulty(requests, context):
            async for result in inner(requests, context):
                delay, fail = self.frame_fault()
                if delay:
                    await asyncio.sleep(delay)
                if fail:
                    seq = result.seq
                    result.Clear()
                    result.code = grpc.StatusCode.UNAVAILABLE.value[0]
                    result.error = "injected fault"
                    result.seq = seq
                yield result

        return grpc.stream_stream_rpc_method_handler(
            faulty,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
