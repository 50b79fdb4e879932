"""``EngineActor``: a data-parallel engine as a Ray actor, its experts behind the router.

The actor runs the same :class:`LLMEngine` as local mode; only the expert
backend differs (an :class:`ExpertRouter` instead of :class:`LocalExperts`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import torch

from elasticmoe.core.expert_map import ExpertMap
from elasticmoe.engine.config import EngineConfig
from elasticmoe.engine.engine import LLMEngine, Prompt
from elasticmoe.engine.loop import EngineLoop, QueueSink
from elasticmoe.engine.request import (
    CompletionDelta,
    OutputAccumulator,
    RequestOutput,
    SamplingParams,
    StreamError,
)
from elasticmoe.experts.priority import freeze_start_up_heap
from elasticmoe.router.router import ExpertRouter, RouterConfig

logger = logging.getLogger(__name__)


class _Subscriber:
    """One caller's share of the loop's output: batches queue here until taken."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._items: list[CompletionDelta | StreamError] = []
        self._live: set[str] = set()

    def put(self, deltas: list[CompletionDelta]) -> None:
        with self._cv:
            self._items.extend(deltas)
            for d in deltas:
                if d.finished:
                    self._live.discard(d.request_id)
            self._cv.notify()

    def fail(self, request_id: str, error: BaseException) -> None:
        with self._cv:
            self._items.append(StreamError(request_id, f"{type(error).__name__}: {error}"))
            self._live.discard(request_id)
            self._cv.notify()

    def take(self, timeout: float = 1.0) -> list[CompletionDelta | StreamError]:
        """Everything queued (waits up to ``timeout`` for something)."""
        with self._cv:
            self._cv.wait_for(lambda: self._items, timeout)
            items, self._items = self._items, []
            return items

    def track(self, request_id: str) -> None:
        with self._cv:
            self._live.add(request_id)

    def untrack(self, request_id: str) -> None:
        with self._cv:
            self._live.discard(request_id)

    def live(self) -> list[str]:
        with self._cv:
            return list(self._live)


class EngineActor:
    """Attention, KV cache, scheduler and router of one engine replica."""

    def __init__(
        self,
        engine_id: str,
        engine_config: dict[str, Any],
        expert_map: dict[str, Any] | None,
        router_config: dict[str, Any] | None = None,
        num_threads: int | None = None,
        controller_name: str | None = None,
        map_poll_s: float = 2.0,
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.engine_id = engine_id
        self.instance = uuid.uuid4().hex  # changes when Ray restarts the actor
        self.router: ExpertRouter | None = None
        self.controller_name = controller_name
        self._stop = threading.Event()
        self._subscribers: dict[str, _Subscriber] = {}
        self._subscribers_lock = threading.Lock()
        if expert_map is None:  # local mode: every expert in this actor
            self.engine = LLMEngine(EngineConfig(**engine_config))
            freeze_start_up_heap()
            self.loop = EngineLoop(self.engine).start()
            return
        initial_map = ExpertMap.from_dict(expert_map)
        if controller_name:
            # a restarted engine must not start on the (stale) map it was created with
            current = self.pull_map()
            if current is not None and current.epoch > initial_map.epoch:
                initial_map = current
        router_cfg = RouterConfig(**(router_config or {}))

        def make_router(reader, model, dtype, device) -> ExpertRouter:
            self.router = ExpertRouter(
                initial_map,
                dtype,
                model.config.hidden_size,
                router_cfg,
                pull_map=self.pull_map if controller_name else None,
            )
            return self.router

        self.engine = LLMEngine(EngineConfig(**engine_config), expert_backend=make_router)
        freeze_start_up_heap()
        self.loop = EngineLoop(self.engine).start()
        if controller_name:
            # pull fallback: a push lost while this engine was busy or restarting
            # is picked up within map_poll_s
            threading.Thread(
                target=self._poll_map, args=(map_poll_s,), name="map-poll", daemon=True
            ).start()

    def pull_map(self) -> ExpertMap | None:
        """Ask the controller for its current map (None if it cannot answer)."""
        import ray

        try:
            controller = ray.get_actor(self.controller_name, namespace="elasticmoe")
            data = ray.get(controller.get_map.remote(), timeout=5)
        # a restarting controller: its actor is missing (ValueError) or not answering
        except (ray.exceptions.RayError, ValueError) as e:
            logger.info("map pull failed: %s", e)
            return None
        return ExpertMap.from_dict(data) if data else None

    def _poll_map(self, interval: float) -> None:
        while not self._stop.wait(interval):
            new_map = self.pull_map()
            if new_map is not None and self.router is not None:
                self.router.update_map(new_map)

    def ready(self) -> dict[str, Any]:
        """Identity and model facts, once constructed."""
        mc = self.engine.model_config
        return {
            "engine_id": self.engine_id,
            "instance": self.instance,
            "model_type": mc.model_type,
            "num_layers": mc.num_layers,
            "num_experts": mc.num_experts,
            "vocab_size": mc.vocab_size,
            "epoch": self.router.epoch if self.router else None,
        }

    def generate(self, prompt: Prompt, params: SamplingParams | None = None) -> RequestOutput:
        """Run one request to completion."""
        return self.loop.generate(prompt, params)

    def generate_batch(
        self, prompts: list[Prompt], params: list[SamplingParams]
    ) -> list[RequestOutput]:
        """Submit all, then wait for all (one Ray call for a whole batch)."""
        sink = QueueSink()
        accs: dict[str, OutputAccumulator] = {}
        order = []
        for p, sp in zip(prompts, params, strict=True):
            request_id, children = self.engine.prepare_request(p, sp)
            order.append(request_id)
            accs[request_id] = OutputAccumulator(request_id, children[0].prompt_token_ids, sp.n)
            accs[request_id].output.prompt = children[0].prompt
        # queued only once all are valid: a bad prompt queues none
        for p, sp, request_id in zip(prompts, params, order, strict=True):
            self.loop.submit(p, sp, request_id, sink)
        left = len(order)
        while left:
            item = sink.queue.get()
            if isinstance(item, BaseException):
                raise item
            for delta in item:
                if accs[delta.request_id].add(delta).finished:
                    left -= 1
        return [accs[r].output for r in order]

    # ------------------------------------------------------------ subscriptions
    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str,
        subscriber: str,
    ) -> None:
        """Queue a request whose outputs go to ``subscriber``'s :meth:`subscribe` stream.
        Raises ``ValueError`` for bad input."""
        sink = self._subscriber(subscriber)
        sink.track(request_id)
        try:
            self.loop.submit(prompt, params, request_id, sink)
        except BaseException:
            sink.untrack(request_id)
            raise

    def subscribe(self, subscriber: str) -> Iterator[list[CompletionDelta | StreamError]]:
        """A Ray streaming generator: per engine step, one list with the new tokens and
        text of every request this subscriber submitted (batches that pile up while the
        caller reads are sent as one). Ends, aborting its requests, when the caller
        goes away."""
        sink = self._subscriber(subscriber)
        try:
            while True:
                batch = sink.take()
                if batch:
                    yield batch
        finally:
            with self._subscribers_lock:
                self._subscribers.pop(subscriber, None)
            for request_id in sink.live():
                self.loop.abort(request_id)

    def _subscriber(self, subscriber: str) -> _Subscriber:
        # made by whichever of submit/subscribe arrives first: nothing is lost in between
        with self._subscribers_lock:
            sink = self._subscribers.get(subscriber)
            if sink is None:
                sink = self._subscribers[subscriber] = _Subscriber()
            return sink

    def generate_stream(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Iterator[RequestOutput]:
        """Yield outputs as steps advance the request (a Ray streaming generator)."""
        yield from self.loop.stream(prompt, params, request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request."""
        self.loop.abort(request_id)

    def update_map(self, expert_map: dict[str, Any]) -> int:
        """Push a new expert map; returns the epoch the engine will use from its next step."""
        assert self.router is not None
        self.router.update_map(ExpertMap.from_dict(expert_map))
        return expert_map["epoch"]

    def current_map(self) -> dict[str, Any] | None:
        """The newest expert map this engine knows (a restarted controller that lost its
        in-memory state adopts it)."""
        return self.router.newest_map().to_dict() if self.router else None

    def active_epoch(self) -> int | None:
        """Epoch of the step in flight (None when idle); used to drain old epochs."""
        return self.router.active_epoch() if self.router else None

    def stats(self) -> dict[str, Any]:
        """Queue, KV and router figures."""
        s = self.engine.stats()
        r = self.router.stats if self.router else None
        return {
            "engine_id": self.engine_id,
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "kv_usage": s.kv_usage,
            "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
            "num_preemptions": s.num_preemptions,
            "epoch": self.router.epoch if self.router else None,
            "failed_calls": r.failed_calls if r else 0,
            "retried_rows": r.retried_rows if r else 0,
            "down_workers": sorted(self.router.down) if self.router else [],
            "slow_workers": self.router.latency.slow_workers() if self.router else [],
            "expert_load": self.engine.load_recorder.total.tolist(),
            "moe_layers": list(self.engine.model_config.moe_layers),
            "dispatch_seconds": dict(r.dispatch_seconds) if r else {},
            "dispatch_calls": dict(r.layer_calls) if r else {},
            "ttft_p99_ms": self.engine.latency.percentile_ms("ttft", 99, 60),
            "itl_p99_ms": self.engine.latency.percentile_ms("itl", 99, 60),
        }

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish in-flight requests (up to timeout), then stop and close channels."""
        self._stop.set()
        self.loop.stop(timeout)
        if self.router is not None:
            self.router.close()
