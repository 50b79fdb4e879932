"""Run an :class:`LLMEngine` on a background thread and serve many callers.

Callers on other threads submit requests and read each request's outputs
from its own queue (one item per step that advanced it, the last one
``finished``). Used by engine actors and the HTTP front; ``LLM.generate`` uses
the engine directly.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

from elasticmoe.engine.engine import LLMEngine, Prompt
from elasticmoe.engine.request import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class EngineStoppedError(RuntimeError):
    """The engine loop was stopped before the request finished."""


class EngineLoop:
    """A thread that steps the engine while requests are pending."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queues: dict[str, queue.Queue[RequestOutput | BaseException]] = {}
        self._running = False
        self._thread: threading.Thread | None = None

    def start(self) -> EngineLoop:
        """Start the stepping thread (idempotent)."""
        with self._lock:
            if self._running:
                return self
            self._running = True
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0, drain: bool = True) -> None:
        """Stop stepping. With ``drain``, let in-flight requests finish first
        (up to ``timeout``); the rest get :class:`EngineStoppedError`."""
        if drain:
            self.wait_idle(timeout)
        with self._lock:
            self._running = False
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for request_id, q in list(self._queues.items()):
                self.engine.abort_request(request_id)
                self.engine.forget_request(request_id)
                q.put(EngineStoppedError(f"request {request_id} was stopped by engine shutdown"))
            self._queues.clear()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is in flight (or timeout); True if idle."""
        with self._lock:
            return self._work.wait_for(lambda: not self._queues, timeout)

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished."""
        return len(self._queues)

    def submit(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> tuple[str, queue.Queue[RequestOutput | BaseException]]:
        """Queue a request; raises ``ValueError`` for bad input (nothing queued)."""
        with self._lock:
            if not self._running:
                raise EngineStoppedError("the engine is not running")
            request_id = self.engine.add_request(prompt, params, request_id)
            q: queue.Queue[RequestOutput | BaseException] = queue.Queue()
            self._queues[request_id] = q
            self._work.notify_all()
        return request_id, q

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with finish_reason 'abort'."""
        with self._lock:
            outputs = self._abort_locked(request_id)
        self._deliver(outputs)

    def _abort_locked(self, request_id: str) -> list[RequestOutput]:
        if request_id not in self._queues:
            return []
        return self.engine.abort_request(request_id)

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Iterator[RequestOutput]:
        """Submit and yield the request's outputs as steps advance it."""
        request_id, q = self.submit(prompt, params, request_id)
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if request_id in self._queues:  # the caller went away: stop generating
                self.abort(request_id)

    def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestOutput:
        """Submit and wait for the final output."""
        outputs = list(self.stream(prompt, params, request_id))
        return outputs[-1]

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is None:
                continue
            q.put(out)
            if out.finished:
                with self._lock:
                    self._queues.pop(out.request_id, None)
                    self._work.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._work.wait_for(
                    lambda: not self._running or self.engine.has_unfinished_requests()
                )
                if not self._running:
                    return
                try:
                    outputs = self.engine.step()
                except Exception as e:  # the engine fails requests itself; this is a bug
                    logger.exception("engine step crashed")
                    outputs = []
                    for request_id, q in list(self._queues.items()):
                        self.engine.abort_request(request_id)
                        self.engine.forget_request(request_id)
                        q.put(RuntimeError(f"engine step crashed: {e}"))
                    self._queues.clear()
                    self._work.notify_all()
            self._deliver(outputs)
