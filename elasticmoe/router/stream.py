"""Long-lived frame streams from a router to its workers: frames out, results back in order.

Two transports carry the same frames (``TokenFrame`` / ``TokenResult`` of
``protos/elasticmoe/v1/expert.proto``):

- :class:`WorkerStream`, one gRPC ``ForwardStream`` per (router, worker), works
  across nodes. Frames go out through one request iterator that gRPC consumes on
  its own thread; one reader thread per stream matches results to frames by ``seq``.
- :class:`NodeStream`, a worker's node-local Unix socket
  (:mod:`elasticmoe.experts.node_stream`), for a worker on the router's node: the
  router's own thread writes the frame and reads the result, with no thread, future
  or protobuf between them.

Both take a :class:`Frame` and give a :class:`FrameResult`. When a stream breaks (the
worker died, the connection closed, a frame timed out), every frame still waiting
fails with :class:`StreamBrokenError` and the stream is not used again: the router
marks the worker down, retries the rows on other replicas, and opens a new stream
once the worker answers a probe.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import queue
import select
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc
from elasticmoe.experts.node_stream import (
    DTYPE_CODES,
    FRAME,
    FRAME_MAGIC,
    HELLO,
    HELLO_MAGIC,
    ITEMSIZE,
    MAX_FRAME_BYTES,
    RESULT,
    RESULT_MAGIC,
    WELCOME,
    WELCOME_MAGIC,
    byte_views,
    drop_sent,
    recv_exact,
    socket_address,
)
from elasticmoe.experts.wire import WireError, array_to_proto, bytes_to_tensor, tensor_from_proto

_DATA_LOSS = grpc.StatusCode.DATA_LOSS.value[0]


@dataclass
class Frame:
    """One layer's rows for one worker, as host arrays (2-byte floats viewed as uint16,
    see :func:`~elasticmoe.experts.wire.host_array`)."""

    layer: int
    epoch: int
    dtype: torch.dtype
    hidden: np.ndarray  # [num_tokens, hidden_size]
    pair_rows: np.ndarray  # int32 [num_pairs]
    pair_experts: np.ndarray  # int32 [num_pairs]
    pair_weights: np.ndarray  # [num_pairs]

    def to_proto(self) -> expert_pb2.TokenFrame:
        return expert_pb2.TokenFrame(
            layer=self.layer,
            epoch=self.epoch,
            hidden=array_to_proto(self.hidden, self.dtype),
            pair_rows=self.pair_rows.tobytes(),
            pair_experts=self.pair_experts.tobytes(),
            pair_weights=array_to_proto(self.pair_weights, self.dtype),
        )


@dataclass
class FrameResult:
    """A frame's answer: status ``code`` (0: OK) and ``error``, the output [num_tokens,
    hidden_size] when OK, the worker's compute seconds, and when it arrived
    (``time.monotonic``)."""

    code: int
    error: str
    output: torch.Tensor | None
    compute_seconds: float
    arrived: float


class StreamBrokenError(RuntimeError):
    """The stream to a worker ended; frames sent on it have no result."""


class WorkerStream:
    """The ForwardStream to one worker at one address."""

    def __init__(
        self,
        stub: expert_pb2_grpc.ExpertServiceStub,
        worker: str,
        address: str,
        dtype: torch.dtype,
        hidden_size: int,
    ) -> None:
        self.worker = worker
        self.address = address
        self.dtype = dtype
        self.hidden_size = hidden_size
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[Future, int]] = {}  # seq -> (future, num_tokens)
        self._seq = itertools.count(1)
        self._broken: str | None = None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.ForwardStream(iter(self._requests.get, None))
        self._reader = threading.Thread(
            target=self._read, name=f"forward-stream-{worker}", daemon=True
        )
        self._reader.start()

    @property
    def broken(self) -> bool:
        """Whether the stream ended (no further frame can be sent on it)."""
        return self._broken is not None

    @property
    def num_in_flight(self) -> int:
        """Frames sent whose result has not come back yet."""
        with self._lock:
            return len(self._pending)

    def submit(self, frame: Frame) -> Future:
        """Send ``frame``; returns the ticket for :meth:`result`."""
        future: Future = Future()
        message = frame.to_proto()
        with self._lock:
            if self._broken is not None:
                future.set_exception(StreamBrokenError(self._broken))
                return future
            message.seq = next(self._seq)
            self._pending[message.seq] = (future, len(frame.hidden))
        self._requests.put(message)
        return future

    def result(self, ticket: Future, timeout: float) -> FrameResult:
        """The frame's result; raises :class:`StreamBrokenError`, or
        ``concurrent.futures.TimeoutError`` after ``timeout`` seconds."""
        return ticket.result(timeout=timeout)

    def _decode(self, result: expert_pb2.TokenResult, num_tokens: int) -> FrameResult:
        arrived = time.monotonic()
        if result.code:
            return FrameResult(result.code, result.error, None, 0.0, arrived)
        try:
            output = tensor_from_proto(
                result.output,
                self.dtype,
                (self.hidden_size,),
                readonly_ok=True,
                what="TokenResult.output",
            )
            if tuple(output.shape) != (num_tokens, self.hidden_size):
                raise WireError(
                    f"TokenResult.output.shape {list(output.shape)} must be "
                    f"[{num_tokens}, {self.hidden_size}]"
                )
        except WireError as e:
            return FrameResult(_DATA_LOSS, str(e), None, 0.0, arrived)
        return FrameResult(0, "", output, result.compute_seconds, arrived)

    def _read(self) -> None:
        reason = "the worker ended the stream"
        try:
            for result in self._call:
                with self._lock:
                    entry = self._pending.pop(result.seq, None)
                if entry is not None:
                    future, num_tokens = entry
                    future.set_result(self._decode(result, num_tokens))
        except grpc.RpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        except Exception as e:  # a reader thread must never die silently
            reason = f"{type(e).__name__}: {e}"
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = f"ForwardStream to {self.worker} broke: {reason}"
            pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            future.set_exception(StreamBrokenError(self._broken))

    def close(self, reason: str = "closed by the router") -> None:
        """End the stream; frames still waiting fail."""
        self._fail(reason)
        self._requests.put(None)
        self._call.cancel()


class NodeRefusedError(RuntimeError):
    """A worker's node stream could not be opened (not reachable from here, or refused)."""


class NodeStream:
    """A worker's node-local stream (:mod:`elasticmoe.experts.node_stream`), used by one
    router thread at a time.

    Writes go out from the calling thread; a write that would block reads the results
    that came back meanwhile (a worker writing a large result does not read the next
    frame until it is read: both sides waiting on each other would deadlock). Results
    are read when asked for (:meth:`result`, :func:`wait_for_results`) and kept by
    ``seq`` until taken.
    """

    def __init__(
        self,
        worker: str,
        address: str,
        name: str,
        token: str | None,
        dtype: torch.dtype,
        hidden_size: int,
        timeout: float = 30.0,
    ) -> None:
        self.worker = worker
        self.timeout = timeout  # for the hello, and for a write the worker does not read
        self.address = address
        self.name = name
        self.dtype = dtype
        self.hidden_size = hidden_size
        self._itemsize = ITEMSIZE[dtype]
        self._seq = itertools.count(1)
        self._broken: str | None = None
        self._waiting: dict[int, int] = {}  # sent, result not read yet: seq -> its rows
        self._results: dict[int, FrameResult] = {}  # read, not taken yet
        self._header = bytearray(RESULT.size)
        self._got = 0  # bytes of the result being read (header, then body)
        self._body: bytearray | None = None
        self._fields: tuple | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(min(timeout, 10.0))
            sock.connect(socket_address(name))
            token_bytes, id_bytes = (token or "").encode(), worker.encode()
            sock.sendall(
                HELLO.pack(HELLO_MAGIC, len(token_bytes), len(id_bytes)) + token_bytes + id_bytes
            )
            reply = bytearray(WELCOME.size)
            if not recv_exact(sock, memoryview(reply)):
                raise NodeRefusedError(f"worker {worker}'s node stream closed during the hello")
            magic, ok, length = WELCOME.unpack(reply)
            text = bytearray(length)
            if magic != WELCOME_MAGIC or not recv_exact(sock, memoryview(text)):
                raise NodeRefusedError(f"worker {worker}'s node stream answered no welcome")
            if not ok:
                raise NodeRefusedError(
                    f"worker {worker}'s node stream refused: {text.decode('utf-8', 'replace')}"
                )
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise NodeRefusedError(f"worker {worker}'s node stream {name}: {e}") from e
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    @property
    def broken(self) -> bool:
        return self._broken is not None

    @property
    def num_in_flight(self) -> int:
        return len(self._waiting)

    def fileno(self) -> int:
        return self._sock.fileno()

    def submit(self, frame: Frame) -> int:
        """Write ``frame``; returns the ticket (its ``seq``) for :meth:`result`."""
        seq = next(self._seq)
        if self._broken is not None:
            return seq  # result() raises
        num_tokens, hidden_size = frame.hidden.shape
        header = FRAME.pack(
            FRAME_MAGIC,
            seq,
            frame.layer,
            frame.epoch,
            num_tokens,
            len(frame.pair_rows),
            hidden_size,
            DTYPE_CODES[frame.dtype],
        )
        self._waiting[seq] = num_tokens
        views = byte_views(
            (header, frame.hidden, frame.pair_rows, frame.pair_experts, frame.pair_weights)
        )
        try:
            while views:
                try:
                    sent = self._sock.sendmsg(views)
                except BlockingIOError:
                    # the worker is not reading: read its results so that it can go on
                    readable, writable = _poll(
                        self._sock, select.POLLIN | select.POLLOUT, self.timeout
                    )
                    if not (readable or writable):
                        raise StreamBrokenError(
                            f"the worker read nothing for {self.timeout}s"
                        ) from None
                    if readable:
                        self._pump()
                        if self._broken is not None:
                            return seq
                    continue
                drop_sent(views, sent)
        except (OSError, StreamBrokenError) as e:
            self._fail(f"writing a frame: {e}")
        return seq

    def result(self, ticket: int, timeout: float) -> FrameResult:
        """The frame's result; raises :class:`StreamBrokenError`, or
        ``concurrent.futures.TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while ticket not in self._results:
            if self._broken is not None or ticket not in self._waiting:
                raise StreamBrokenError(self._broken or f"frame {ticket} was never sent")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise concurrent.futures.TimeoutError
            try:
                readable, _ = _poll(self._sock, select.POLLIN, remaining)
            except StreamBrokenError as e:
                self._fail(str(e))
                continue
            if readable:
                self._pump()
        return self._results.pop(ticket)

    def done(self, ticket: int) -> bool:
        """Whether :meth:`result` returns at once (the result is in, or the stream broke)."""
        return ticket in self._results or self._broken is not None

    def _pump(self) -> None:
        """Read what has arrived (never blocks); complete results go to ``_results``."""
        try:
            while True:
                if self._body is None:
                    n = self._sock.recv_into(memoryview(self._header)[self._got :])
                    if not n:
                        raise StreamBrokenError("the worker closed the stream")
                    self._got += n
                    if self._got < RESULT.size:
                        continue
                    self._fields = RESULT.unpack(self._header)
                    if self._fields[0] != RESULT_MAGIC:
                        raise StreamBrokenError("a result header has a bad magic")
                    if self._fields[5] > MAX_FRAME_BYTES:
                        raise StreamBrokenError(f"a result of {self._fields[5]} bytes")
                    self._body, self._got = bytearray(self._fields[5]), 0
                if self._got < len(self._body):
                    n = self._sock.recv_into(memoryview(self._body)[self._got :])
                    if not n:
                        raise StreamBrokenError("the worker closed the stream inside a result")
                    self._got += n
                    if self._got < len(self._body):
                        continue
                self._finish()
        except BlockingIOError:
            return
        except (OSError, StreamBrokenError) as e:
            self._fail(str(e))

    def _finish(self) -> None:
        assert self._fields is not None and self._body is not None
        _, seq, code, seconds, num_tokens, _ = self._fields
        body, self._body, self._got = self._body, None, 0
        rows = self._waiting.pop(seq, None)
        arrived = time.monotonic()
        if code:
            error = body.decode("utf-8", "replace")
            self._results[seq] = FrameResult(code, error, None, 0.0, arrived)
            return
        if num_tokens != rows or len(body) != num_tokens * self.hidden_size * self._itemsize:
            self._results[seq] = FrameResult(
                _DATA_LOSS,
                f"frame {seq} sent {rows} rows; its result has {num_tokens} rows in "
                f"{len(body)} bytes of {self.hidden_size}-wide {self.dtype}",
                None,
                0.0,
                arrived,
            )
            return
        output = bytes_to_tensor(body, self.dtype, (num_tokens, self.hidden_size))
        self._results[seq] = FrameResult(0, "", output, seconds, arrived)

    def _fail(self, reason: str) -> None:
        if self._broken is None:
            self._broken = f"node stream to {self.worker} broke: {reason}"
        self._waiting.clear()
        with contextlib.suppress(OSError):
            self._sock.close()

    def close(self, reason: str = "closed by the router") -> None:
        self._fail(reason)


def wait_for_results(calls: Sequence[tuple[NodeStream, int]], timeout: float) -> None:
    """Read the node streams' results for these tickets as each arrives (one poll over
    all), so that each result's arrival time is its own, not the slowest one's; returns
    when all are in, a stream broke, or after ``timeout`` seconds (then :meth:`result`
    tells which)."""
    deadline = time.monotonic() + timeout
    open_calls = [(s, t) for s, t in calls if not s.done(t)]
    while open_calls:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        poller = select.poll()
        for stream in {s for s, _ in open_calls}:
            poller.register(stream.fileno(), select.POLLIN)
        ready = {fd for fd, _ in poller.poll(remaining * 1000)}
        for stream in {s for s, _ in open_calls if s.fileno() in ready}:
            stream._pump()
        open_calls = [(s, t) for s, t in open_calls if not s.done(t)]


def _poll(sock: socket.socket, events: int, timeout: float) -> tuple[bool, bool]:
    """(readable, writable) of ``sock`` within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(sock.fileno(), events)
    ready = poller.poll(timeout * 1000)
    mask = ready[0][1] if ready else 0
    if mask & (select.POLLERR | select.POLLNVAL):
        raise StreamBrokenError("the connection failed")
    return bool(mask & (select.POLLIN | select.POLLHUP)), bool(mask & select.POLLOUT)
