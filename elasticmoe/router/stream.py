"""One long-lived ``ForwardStream`` per (router, worker): frames out, results back in order.

The router submits a :class:`TokenFrame` and gets a future for its
:class:`TokenResult`. Frames go out through one request iterator that gRPC
consumes on its own thread; one reader thread per stream matches results to
futures by ``seq``. When the stream breaks (the worker died, the channel
closed, a frame timed out), every frame still waiting fails with
:class:`StreamBrokenError` and the stream is not used again: the router marks
the worker down, retries the rows on other replicas, and opens a new stream
once the worker answers a probe.
"""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future

import grpc

from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc


class StreamBrokenError(RuntimeError):
    """The stream to a worker ended; frames sent on it have no result."""


class WorkerStream:
    """The ForwardStream to one worker at one address."""

    def __init__(self, stub: expert_pb2_grpc.ExpertServiceStub, worker: str, address: str) -> None:
        self.worker = worker
        self.address = address
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
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

    def submit(self, frame: expert_pb2.TokenFrame) -> Future:
        """Send ``frame`` (its ``seq`` is set here); the future gets its TokenResult."""
        future: Future = Future()
        with self._lock:
            if self._broken is not None:
                future.set_exception(StreamBrokenError(self._broken))
                return future
            frame.seq = next(self._seq)
            self._pending[frame.seq] = future
        self._requests.put(frame)
        return future

    def _read(self) -> None:
        reason = "the worker ended the stream"
        try:
            for result in self._call:
                with self._lock:
                    future = self._pending.pop(result.seq, None)
                if future is not None:
                    future.set_result(result)
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
        for future in pending.values():
            future.set_exception(StreamBrokenError(self._broken))

    def close(self, reason: str = "closed by the router") -> None:
        """End the stream; frames still waiting fail."""
        self._fail(reason)
        self._requests.put(None)
        self._call.cancel()
