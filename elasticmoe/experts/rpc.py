"""gRPC between engines, the controller and expert workers: limits, channels, security.

Torch-free, so the controller (which only sends control RPCs) and the router
share one definition of the limits and one way to keep a channel per worker.

Security (:class:`RpcSecurity`) comes from the environment, never from a command
line or a config others can read: ``ELASTICMOE_GRPC_TOKEN`` is the deployment's
shared token, sent as ``authorization: Bearer <token>`` metadata on every call
and checked by every worker (compared in constant time); with
``ELASTICMOE_GRPC_TLS_CERT`` and ``ELASTICMOE_GRPC_TLS_KEY`` (PEM files) the
workers serve TLS, and clients verify them against ``ELASTICMOE_GRPC_TLS_CA``.
The operator sets the token in every pod; a deployment that starts its own local
Ray instance makes one for it (:func:`fresh_token_in_environment`).
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from elasticmoe._proto.elasticmoe.v1 import expert_pb2_grpc

TOKEN_ENV = "ELASTICMOE_GRPC_TOKEN"
TLS_CERT_ENV = "ELASTICMOE_GRPC_TLS_CERT"
TLS_KEY_ENV = "ELASTICMOE_GRPC_TLS_KEY"
TLS_CA_ENV = "ELASTICMOE_GRPC_TLS_CA"
_AUTH_HEADER = "authorization"

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Servers and clients (router, controller, peers) must use the same limits or large
# batches fail with RESOURCE_EXHAUSTED on the client side before reaching the worker.
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def _read_pem(env: str, environ: Mapping[str, str]) -> bytes | None:
    path = environ.get(env)
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{env}={path}: cannot read the file: {e.strerror or e}") from None


@dataclass(frozen=True)
class RpcSecurity:
    """The deployment's token and optional TLS material (see the module docstring)."""

    token: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_ca: bytes | None = None

    def __post_init__(self) -> None:
        if self.token is not None and (not self.token or self.token != self.token.strip()):
            raise ValueError(f"{TOKEN_ENV} is empty or has leading/trailing whitespace")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"set both {TLS_CERT_ENV} and {TLS_KEY_ENV}, or neither")

    def __repr__(self) -> str:  # never print the token
        return f"RpcSecurity(token={'set' if self.token else None}, tls={self.tls})"

    @property
    def tls(self) -> bool:
        """Whether clients dial TLS (a CA to verify the workers is given)."""
        return self.tls_ca is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RpcSecurity:
        """What this process's environment says."""
        env = os.environ if environ is None else environ
        return cls(
            token=env.get(TOKEN_ENV) or None,
            tls_cert=_read_pem(TLS_CERT_ENV, env),
            tls_key=_read_pem(TLS_KEY_ENV, env),
            tls_ca=_read_pem(TLS_CA_ENV, env),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the token (empty without one)."""
        return ((_AUTH_HEADER, f"Bearer {self.token}"),) if self.token else ()

    def accepts(self, metadata: Any) -> bool:
        """Whether a call's metadata carries this deployment's token."""
        if not self.token:
            return True
        want = f"Bearer {self.token}".encode()
        given = b""
        for key, value in metadata or ():
            if key == _AUTH_HEADER:
                given = value.encode() if isinstance(value, str) else value
        return hmac.compare_digest(given, want)


@contextlib.contextmanager
def fresh_token_in_environment() -> Iterator[str]:
    """While Ray starts a local instance inside this block, its raylet (and so every
    actor it starts) inherits a token made for this deployment; a token already in the
    environment is used as it is. The caller's own environment is left as it was."""
    given = os.environ.get(TOKEN_ENV)
    token = given or secrets.token_urlsafe(32)
    os.environ[TOKEN_ENV] = token
    try:
        yield token
    finally:
        if given is None:
            os.environ.pop(TOKEN_ENV, None)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """A call's details with the token added (built once per call, on the Forward path)."""


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token to every call of a (synchronous) channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return _CallDetails(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self._metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def open_channel(address: str, security: RpcSecurity | None = None) -> grpc.Channel:
    """A channel to a worker with the deployment's limits, token and TLS."""
    sec = security or RpcSecurity.from_env()
    if sec.tls:
        channel = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=sec.tls_ca), GRPC_OPTIONS
        )
    else:
        channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
    if sec.token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(sec.metadata()))
    return channel


def open_aio_channel(address: str, security: RpcSecurity | None = None) -> grpc.aio.Channel:
    """:func:`open_channel` for asyncio code (a worker copying from a peer)."""
    sec = security or RpcSecurity.from_env()
    interceptors = (
        [
            kind(sec.metadata())
            for kind in (
                _AioUnaryUnaryToken,
                _AioUnaryStreamToken,
                _AioStreamUnaryToken,
                _AioStreamStreamToken,
            )
        ]
        if sec.token
        else None
    )
    if sec.tls:
        return grpc.aio.secure_channel(
            address,
            grpc.ssl_channel_credentials(root_certificates=sec.tls_ca),
            GRPC_OPTIONS,
            interceptors=interceptors,
        )
    return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS, interceptors=interceptors)


class _AioToken:
    """Adds the token to the calls of an asyncio channel (grpc.aio files each
    interceptor under one call kind only, hence one subclass per kind)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        pairs = (*(details.metadata or ()), *self._metadata)
        return details._replace(metadata=grpc.aio.Metadata(*pairs))


class _AioUnaryUnaryToken(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any):
        return await continuation(self._details(details), request)


class _AioUnaryStreamToken(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any):
        return await continuation(self._details(details), request)


class _AioStreamUnaryToken(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Callable, details: Any, requests: Any):
        return await continuation(self._details(details), requests)


class _AioStreamStreamToken(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Callable, details: Any, requests: Any):
        return await continuation(self._details(details), requests)


class TokenServerInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call without the deployment's token."""

    def __init__(self, security: RpcSecurity) -> None:
        self._security = security

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong deployment token (authorization metadata); "
                f"every caller needs the deployment's {TOKEN_ENV}",
            )

        async def refuse_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await refuse(None, context)

        # one refusal per call kind: a bidirectional stream (ForwardStream) is refused
        # before the server reads any of its frames
        self._refuse = {
            (False, False): grpc.unary_unary_rpc_method_handler(refuse),
            (False, True): grpc.unary_stream_rpc_method_handler(refuse),
            (True, False): grpc.stream_unary_rpc_method_handler(refuse_stream),
            (True, True): grpc.stream_stream_rpc_method_handler(refuse_stream),
        }

    async def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = await continuation(details)
        if self._security.accepts(details.invocation_metadata) or handler is None:
            return handler
        return self._refuse[(handler.request_streaming, handler.response_streaming)]


def server_credentials(security: RpcSecurity) -> grpc.ServerCredentials | None:
    """TLS credentials for a worker's server, or None to serve plaintext."""
    if security.tls_cert is None or security.tls_key is None:
        return None
    return grpc.ssl_server_credentials([(security.tls_key, security.tls_cert)])


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
            channel = open_channel(address)
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
