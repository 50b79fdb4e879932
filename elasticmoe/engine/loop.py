"""Run an :class:`LLMEngine` on a background thread and serve many callers.

Callers on other threads submit requests and abort them through a command
queue that the stepping thread drains at step boundaries: no lock is held
across a step, so a submit or an abort never waits for the model. After each
step the loop hands every caller one batch with the new tokens and text of
all its requests that advanced (:class:`CompletionDelta`, never whole lists).
A caller is a *sink*: the engine actor has one per subscribing HTTP replica
(one message per step for all of that replica's requests); :meth:`stream`
and :meth:`generate` use one queue per request. Used by engine actors and
the HTTP front; ``LLM.generate`` uses the engine directly.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Protocol

from elasticmoe.engine.engine import LLMEngine, Prompt
from elasticmoe.engine.request import (
    CompletionDelta,
    OutputAccumulator,
    RequestOutput,
    SamplingParams,
)

logger = logging.getLogger(__name__)


class EngineStoppedError(RuntimeError):
    """The engine loop was stopped before the request finished."""


class Sink(Protocol):
    """Where the loop delivers a caller's outputs (called on the stepping thread)."""

    def put(self, deltas: list[CompletionDelta]) -> None:
        """One step's deltas of this sink's requests."""

    def fail(self, request_id: str, error: BaseException) -> None:
        """The request ended without a final delta."""


class QueueSink:
    """A sink that queues batches and errors for one reader thread."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[list[CompletionDelta] | BaseException] = queue.SimpleQueue()

    def put(self, deltas: list[CompletionDelta]) -> None:
        """Queue a batch."""
        self.queue.put(deltas)

    def fail(self, request_id: str, error: BaseException) -> None:
        """Queue the error."""
        self.queue.put(error)


class EngineLoop:
    """A thread that steps the engine while requests are pending."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._cv = threading.Condition()
        # guarded by _cv: commands for the stepping thread, and the in-flight count
        self._commands: list[tuple] = []
        self._num_in_flight = 0
        self._running = False
        # touched only by the stepping thread (and by stop() once it has ended)
        self._sinks: dict[str, Sink] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> EngineLoop:
        """Start the stepping thread (idempotent)."""
        with self._cv:
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
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            commands, self._commands = self._commands, []
            self._num_in_flight = 0
            self._cv.notify_all()
        for cmd in commands:
            if cmd[0] == "add":
                _, request_id, _, sink = cmd
                sink.fail(request_id, EngineStoppedError(f"request {request_id} was not started"))
        for request_id, sink in list(self._sinks.items()):
            self.engine.abort_request(request_id)
            self.engine.forget_request(request_id)
            sink.fail(
                request_id, EngineStoppedError(f"request {request_id} was stopped by shutdown")
            )
        self._sinks.clear()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is in flight (or timeout); True if idle."""
        with self._cv:
            return self._cv.wait_for(lambda: self._num_in_flight == 0, timeout)

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished."""
        return self._num_in_flight

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        sink: Sink | None = None,
    ) -> tuple[str, Sink]:
        """Queue a request; its outputs go to ``sink`` (a fresh :class:`QueueSink` if
        none). Raises ``ValueError`` for bad input (nothing queued)."""
        if not self._running:
            raise EngineStoppedError("the engine is not running")
        request_id, children = self.engine.prepare_request(prompt, params, request_id)
        sink = sink or QueueSink()
        self._command(("add", request_id, children, sink), new=True)
        return request_id, sink

    def abort(self, request_id: str) -> None:
        """Abort a request; its outputs end with finish_reason 'abort'."""
        self._command(("abort", request_id))

    def _command(self, cmd: tuple, new: bool = False) -> None:
        with self._cv:
            if new:
                if not self._running:
                    raise EngineStoppedError("the engine is not running")
                self._num_in_flight += 1
            self._commands.append(cmd)
            self._cv.notify_all()

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Iterator[RequestOutput]:
        """Submit and yield the request's cumulative output after each step that advanced it."""
        params = params or SamplingParams()
        if not self._running:
            raise EngineStoppedError("the engine is not running")
        request_id, children = self.engine.prepare_request(prompt, params, request_id)
        sink = QueueSink()
        self._command(("add", request_id, children, sink), new=True)
        acc = OutputAccumulator(request_id, children[0].prompt_token_ids, params.n)
        acc.output.prompt = children[0].prompt
        finished = False
        try:
            while True:
                item = sink.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                for delta in item:
                    finished = acc.add(delta).finished
                yield acc.output
                if finished:
                    return
        finally:
            if not finished:  # the caller went away: stop generating
                self.abort(request_id)

    def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestOutput:
        """Submit and wait for the final output."""
        out = None
        for out in self.stream(prompt, params, request_id):  # noqa: B007
            pass
        assert out is not None and out.finished
        return out

    # ------------------------------------------------------------ stepping thread
    def _apply(self, commands: list[tuple]) -> list[CompletionDelta]:
        deltas: list[CompletionDelta] = []
        for cmd in commands:
            if cmd[0] == "add":
                _, request_id, children, sink = cmd
                try:
                    if request_id in self._sinks:
                        raise ValueError(f"request id {request_id!r} is already in use")
                    self.engine.add_prepared(request_id, children)
                except ValueError as e:
                    self._done(1)
                    sink.fail(request_id, e)
                    continue
                self._sinks[request_id] = sink
            else:
                _, request_id = cmd
                if request_id in self._sinks:
                    deltas.extend(self.engine.abort_request_deltas(request_id))
        return deltas

    def _done(self, num: int) -> None:
        with self._cv:
            self._num_in_flight -= num
            self._cv.notify_all()

    def _deliver(self, deltas: list[CompletionDelta]) -> None:
        batches: dict[int, tuple[Sink, list[CompletionDelta]]] = {}
        num_done = 0
        for d in deltas:
            sink = self._sinks.get(d.request_id)
            if sink is None:
                continue
            entry = batches.get(id(sink))
            if entry is None:
                batches[id(sink)] = (sink, [d])
            else:
                entry[1].append(d)
            if d.finished:
                del self._sinks[d.request_id]
                num_done += 1
        for sink, batch in batches.values():
            try:
                sink.put(batch)
            except Exception:  # one broken caller must not stop the others
                logger.exception("delivering outputs failed")
        if num_done:
            self._done(num_done)

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                self._cv.wait_for(
                    lambda: not self._running or self._commands or engine.has_unfinished_requests()
                )
                if not self._running:
                    return
                commands, self._commands = self._commands, []
            deltas = self._apply(commands) if commands else []
            try:
                if engine.has_unfinished_requests():
                    deltas.extend(engine.step_deltas())
            except Exception as e:  # the engine fails requests itself; this is a bug
                logger.exception("engine step crashed")
                self._deliver(deltas)
                self._fail_all(RuntimeError(f"engine step crashed: {e}"))
                continue
            if deltas:
                self._deliver(deltas)

    def _fail_all(self, error: BaseException) -> None:
        sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            self.engine.abort_request(request_id)
            self.engine.forget_request(request_id)
            sink.fail(request_id, error)
        if sinks:
            self._done(len(sinks))


__all__ = ["EngineLoop", "EngineStoppedError", "QueueSink", "Sink"]
