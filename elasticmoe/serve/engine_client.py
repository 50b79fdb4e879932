"""The HTTP front's side of one engine actor: one subscription, many requests.

Each ingress replica subscribes once per engine (``EngineActor.subscribe``, a
Ray streaming generator) and receives one message per engine step carrying
the new tokens and text of all of its requests; this module demultiplexes
those batches to one asyncio queue per request. Submits and aborts are
ordinary actor calls. If the subscription breaks (the engine died), every
request waiting on it gets the error, so the caller can run it elsewhere,
and the next request subscribes again (Ray restarts the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from elasticmoe.engine.request import CompletionDelta, StreamError

logger = logging.getLogger(__name__)

Item = CompletionDelta | StreamError | BaseException


class EngineClient:
    """Requests to one engine actor over a shared per-step stream."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._queues: dict[str, asyncio.Queue[Item]] = {}
        self._task: asyncio.Task | None = None
        self._subscriber = ""

    def _ensure_subscribed(self) -> str:
        if self._task is None or self._task.done():
            self._subscriber = uuid.uuid4().hex
            self._task = asyncio.get_running_loop().create_task(self._pump(self._subscriber))
        return self._subscriber

    async def _pump(self, subscriber: str) -> None:
        error: BaseException
        try:
            gen = self.handle.subscribe.options(num_returns="streaming").remote(subscriber)
            async for ref in gen:
                batch = await ref
                queues = self._queues
                for item in batch:
                    q = queues.get(item.request_id)
                    if q is not None:
                        q.put_nowait(item)
            error = RuntimeError("the engine's output stream ended")
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the engine died, or its stream broke
            error = e
        logger.warning("engine subscription %s ended: %r", subscriber, error)
        if self._subscriber == subscriber:
            self._task = None
        for q in list(self._queues.values()):
            q.put_nowait(error)

    async def submit(
        self, prompt_ids: list[int], params: Any, request_id: str
    ) -> asyncio.Queue[Item]:
        """Start a request; its deltas (or an error) arrive on the returned queue."""
        q: asyncio.Queue[Item] = asyncio.Queue()
        self._queues[request_id] = q
        subscriber = self._ensure_subscribed()
        try:
            await self.handle.submit.remote(
                {"prompt_token_ids": prompt_ids}, params, request_id, subscriber
            )
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        return q

    def release(self, request_id: str, abort: bool) -> None:
        """Stop routing the request's deltas (and abort it on the engine, if asked)."""
        self._queues.pop(request_id, None)
        if abort:
            with contextlib.suppress(Exception):  # the engine is gone: nothing left to stop
                self.handle.abort.remote(request_id)
