"""The node-local data plane: a worker's frames over a Unix socket, for routers on its node.

gRPC's Python stack costs about 0.25 ms per frame round trip to one worker and 0.5 ms
to two on a 2-core node (a bare bidirectional-stream echo), several times what a
decode batch's experts compute. A router on the same node as the worker (the same
kernel network namespace) needs none of it: a frame is a fixed header and raw
arrays written to a Unix stream socket, and the worker computes it on the thread
that received it and writes the result back (an echo of the same bytes takes
0.05 ms to two workers here).

- **Where**: an abstract-namespace Unix socket (``\\0elasticmoe-<random>``, no file
  to clean up, gone with the process). Its name is told only to authenticated
  callers (the gRPC ``Health`` answer, ``HealthResponse.node_stream``); routers on
  other nodes, or in another network namespace (another Kubernetes pod), cannot
  reach it and use the gRPC ``ForwardStream``.
- **Who**: a connection starts with a hello carrying the deployment's token (compared
  in constant time) and the worker id the router expects; anything else is refused
  with a message and the connection closed.
- **What**: the same frame as ``TokenFrame`` / ``TokenResult`` (see
  ``protos/elasticmoe/v1/expert.proto``), little-endian:

  - frame: :data:`FRAME` header (magic, seq, layer, epoch, num_tokens, num_pairs,
    hidden_size, dtype code), then ``hidden`` [num_tokens, hidden_size],
    ``pair_rows`` int32 [num_pairs], ``pair_experts`` int32 [num_pairs] and
    ``pair_weights`` [num_pairs] in the frame's dtype;
  - result: :data:`RESULT` header (magic, seq, code, compute_seconds, num_tokens,
    body length), then the output [num_tokens, hidden_size] (code 0) or the error
    message in UTF-8.

  A frame with bad values (dtype, hidden size, a row or expert out of range, an
  expert not held) gets a result with its gRPC status code and the message naming
  the field, and the stream goes on. A header that cannot be a frame (bad magic, a
  body over :data:`MAX_FRAME_BYTES`) ends the connection: the byte stream cannot be
  resynchronised.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc
import torch

from elasticmoe.experts.priority import serve_without_wakeup_preemption
from elasticmoe.experts.rpc import MAX_MESSAGE_BYTES, RpcSecurity

if TYPE_CHECKING:
    from elasticmoe.experts.service import ExpertServicer

__all__ = [
    "DTYPE_CODES",
    "FRAME",
    "HELLO",
    "ITEMSIZE",
    "MAX_FRAME_BYTES",
    "RESULT",
    "WELCOME",
    "NodeStreamServer",
    "byte_views",
    "drop_sent",
    "frame_body_bytes",
    "recv_exact",
    "socket_address",
]

logger = logging.getLogger(__name__)

# magic, seq, layer, epoch, num_tokens, num_pairs, hidden_size, dtype code
FRAME = struct.Struct("<4sQiQIIIB3x")
FRAME_MAGIC = b"EMF1"
# magic, seq, code, compute_seconds, num_tokens, body bytes
RESULT = struct.Struct("<4sQidII")
RESULT_MAGIC = b"EMR1"
# magic, token bytes, worker id bytes (each followed by its bytes)
HELLO = struct.Struct("<4sHH")
HELLO_MAGIC = b"EMH1"
# magic, ok (1) or refused (0), message bytes (the worker id, or why it refused)
WELCOME = struct.Struct("<4sBH")
WELCOME_MAGIC = b"EMA1"

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
ITEMSIZE: dict[torch.dtype, int] = {
    torch.float32: 4,
    torch.bfloat16: 2,
    torch.float16: 2,
    torch.int32: 4,
}
# the same bound as a gRPC message: a router cannot send on one path what the other refuses
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES
# connections one worker accepts at once (each is a thread; a router holds one)
MAX_CONNECTIONS = 256
HANDSHAKE_TIMEOUT_S = 10.0
_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def socket_address(name: str) -> str:
    """The ``socket.connect`` address of a ``node_stream`` name: ``@x`` is the abstract
    socket ``\\0x``."""
    return "\0" + name[1:] if name.startswith("@") else name


def frame_body_bytes(num_tokens: int, num_pairs: int, hidden_size: int, itemsize: int) -> int:
    """Bytes that follow a :data:`FRAME` header with these counts."""
    return num_tokens * hidden_size * itemsize + num_pairs * (8 + itemsize)


def recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from the blocking ``sock``; False if the peer closed before it was full."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True


def byte_views(buffers: Sequence) -> list[memoryview]:
    """Flat byte views of the non-empty ``buffers`` (bytes, bytearrays, numpy arrays), for
    one gathered ``sendmsg``."""
    return [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]


def drop_sent(views: list[memoryview], sent: int) -> None:
    """Remove the first ``sent`` bytes from ``views`` (what a partial ``sendmsg`` wrote)."""
    while views and sent >= len(views[0]):
        sent -= len(views[0])
        views.pop(0)
    if views and sent:
        views[0] = views[0][sent:]


def send_all(sock: socket.socket, buffers: Sequence) -> None:
    """Write ``buffers`` in order on the blocking ``sock`` (one gathered write when it fits)."""
    views = byte_views(buffers)
    while views:
        drop_sent(views, sock.sendmsg(views))


class _Desync(Exception):
    """The byte stream no longer starts at a frame: the connection must end."""


class NodeStreamServer:
    """Answers frames for one worker's servicer on an abstract Unix socket (see module doc).

    One thread accepts; each connection gets its own thread, which receives a frame,
    computes it (:meth:`ExpertServicer.forward_frame`, a failure answered with
    :meth:`ExpertServicer.frame_failure`'s code and message) and writes the result. Those
    threads are started by the thread that calls :meth:`start`, so they serve at its
    priority (a worker's serving priority), under ``SCHED_BATCH`` (a frame's arrival does
    not preempt its engine while it writes the layer's other frames:
    :func:`~elasticmoe.experts.priority.serve_without_wakeup_preemption`), and each runs
    ``num_threads`` torch threads.
    ``fault`` (fault injection, off by default) gives per frame a delay in seconds and
    whether to fail it, as the gRPC stream's fault hook does.
    """

    def __init__(
        self,
        servicer: ExpertServicer,
        security: RpcSecurity | None = None,
        num_threads: int | None = None,
        fault: Callable[[], tuple[float, bool]] | None = None,
    ) -> None:
        self.servicer = servicer
        self.security = security or RpcSecurity.from_env()
        self.num_threads = num_threads
        self.fault = fault
        self.name = f"@elasticmoe-{secrets.token_hex(12)}"
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, bool] = {}  # connection -> idle
        self._stopping = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(socket_address(self.name))
        self._listener.listen(64)
        self._acceptor = threading.Thread(target=self._accept, name="node-stream", daemon=True)

    def start(self) -> None:
        self._acceptor.start()

    @property
    def num_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def stop(self) -> None:
        """Refuse new connections and end idle ones; a connection computing a frame ends
        after writing its result (its router retries later frames on other replicas)."""
        with self._lock:
            self._stopping = True
            idle = [c for c, is_idle in self._connections.items() if is_idle]
        _shutdown(self._listener)
        self._listener.close()
        for conn in idle:
            _shutdown(conn)

    # ---------------------------------------------------------------- threads
    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed: stopping
            with self._lock:
                full = len(self._connections) >= MAX_CONNECTIONS
                if not (full or self._stopping):
                    self._connections[conn] = False
            if full or self._stopping:
                why = "the worker is stopping" if self._stopping else "too many connections"
                threading.Thread(target=self._refuse, args=(conn, why), daemon=True).start()
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="node-stream-conn", daemon=True
            ).start()

    def _refuse(self, conn: socket.socket, why: str) -> None:
        with conn:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            with contextlib.suppress(OSError):
                _welcome(conn, False, why)

    def _serve(self, conn: socket.socket) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        serve_without_wakeup_preemption()
        try:
            if not self._handshake(conn):
                return
            header = bytearray(FRAME.size)
            body = bytearray(1 << 16)
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    self._connections[conn] = True
                if not recv_exact(conn, memoryview(header)):
                    return  # the router closed the stream
                with self._lock:
                    self._connections[conn] = False
                body = self._answer(conn, header, body)
        except _Desync as e:
            logger.warning("node stream of worker %s: %s", self.servicer.store.worker_id, e)
        except OSError:
            pass  # the router went away, or stop() shut the connection
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()

    def _handshake(self, conn: socket.socket) -> bool:
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        head = bytearray(HELLO.size)
        if not recv_exact(conn, memoryview(head)):
            return False
        magic, token_len, id_len = HELLO.unpack(head)
        if magic != HELLO_MAGIC:
            _welcome(conn, False, "not an elasticmoe node-stream hello")
            return False
        rest = bytearray(token_len + id_len)
        if not recv_exact(conn, memoryview(rest)):
            return False
        token, worker = bytes(rest[:token_len]), rest[token_len:].decode("utf-8", "replace")
        expected = self.security.token
        if expected and not hmac.compare_digest(token, expected.encode()):
            _welcome(conn, False, "missing or wrong deployment token")
            return False
        mine = self.servicer.store.worker_id
        if worker != mine:
            _welcome(conn, False, f"this socket serves worker {mine!r}, not {worker!r}")
            return False
        _welcome(conn, True, mine)
        conn.settimeout(None)
        return True

    def _answer(self, conn: socket.socket, header: bytearray, body: bytearray) -> bytearray:
        """Receive the body of the frame whose header is ``header``, compute it, write its
        result; returns the receive buffer (grown if this frame needed more)."""
        magic, seq, layer, epoch, num_tokens, num_pairs, hidden_size, code = FRAME.unpack(header)
        if magic != FRAME_MAGIC:
            raise _Desync(f"a frame header starts with {bytes(magic)!r}, not {FRAME_MAGIC!r}")
        dtype = _CODE_DTYPES.get(code)
        if dtype is None:  # the body's length depends on it
            raise _Desync(f"frame {seq}: dtype code {code} is not one of {sorted(_CODE_DTYPES)}")
        itemsize = ITEMSIZE[dtype]
        size = frame_body_bytes(num_tokens, num_pairs, hidden_size, itemsize)
        if size > MAX_FRAME_BYTES:
            raise _Desync(f"frame {seq} has a {size}-byte body; at most {MAX_FRAME_BYTES}")
        if size > len(body):
            body = bytearray(size)
        if not recv_exact(conn, memoryview(body)[:size]):
            raise OSError("the router closed the stream inside a frame")
        store = self.servicer.store
        if dtype != store.dtype:
            error = f"hidden.dtype is {dtype}, expected {store.dtype}"
        elif hidden_size != store.hidden_size:
            error = f"hidden_size is {hidden_size}, expected {store.hidden_size}"
        else:
            error = None
        if error is not None:
            _result(conn, seq, _INVALID, 0.0, 0, error)
            return body
        hidden = _view(body, 0, dtype, (num_tokens, hidden_size))
        offset = hidden.numel() * itemsize
        rows = _view(body, offset, torch.int32, (num_pairs,))
        experts = _view(body, offset + 4 * num_pairs, torch.int32, (num_pairs,))
        weights = _view(body, offset + 8 * num_pairs, dtype, (num_pairs,))
        if store.device.type != "cpu":
            hidden, weights = hidden.to(store.device), weights.to(store.device)
        try:
            out, seconds = self.servicer.forward_frame(layer, epoch, hidden, rows, experts, weights)
            status, message = 0, ""
        except Exception as e:
            status, message = self.servicer.frame_failure(e)
            out, seconds = None, 0.0
        if self.fault is not None:
            delay, fail = self.fault()
            if delay:
                time.sleep(delay)
            if fail:
                status, out, message = grpc.StatusCode.UNAVAILABLE.value[0], None, "injected fault"
        if status:
            _result(conn, seq, status, seconds, 0, message)
            return body
        assert out is not None
        data = out.detach().contiguous()
        if data.device.type != "cpu":
            data = data.cpu()
        payload = data.view(-1).view(torch.uint8).numpy()
        send_all(
            conn, [RESULT.pack(RESULT_MAGIC, seq, 0, seconds, num_tokens, len(payload)), payload]
        )
        return body


def _view(buf: bytearray, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape) * ITEMSIZE[dtype]
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return (
        torch.frombuffer(buf, dtype=torch.uint8, count=count, offset=offset).view(dtype).view(shape)
    )


def _result(conn: socket.socket, seq: int, code: int, seconds: float, n: int, message: str) -> None:
    text = message.encode("utf-8", "replace")[:65536]
    send_all(conn, [RESULT.pack(RESULT_MAGIC, seq, code, seconds, n, len(text)), text])


def _welcome(conn: socket.socket, ok: bool, message: str) -> None:
    text = message.encode("utf-8", "replace")[:1024]
    conn.sendall(WELCOME.pack(WELCOME_MAGIC, int(ok), len(text)) + text)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
