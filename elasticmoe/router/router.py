"""The engine-side router: sends each MoE layer's rows to expert workers (over each
worker's node stream on this node, gRPC elsewhere: :mod:`elasticmoe.router.stream`).

Per step: a :class:`DispatchTable` fixes live replicas, down workers and costs.
Per layer: group (token, expert) pairs by logical expert, split them over
replicas, and send each worker one frame, all concurrent: every token it needs
once, with the pairs (expert, gate weight) it serves there. The worker runs all
its experts for those rows in one batched call and returns the weighted sum per
token; the router adds the partial sums in worker-id order. With top-2 routing
those are :class:`LocalExperts`' additions (a + b = b + a); with k > 2 they are
grouped per worker. Either way results differ from it by rounding only
(deterministically): the additions' grouping, and matmuls whose kernel depends on
the row count a worker sees (a one-row GEMV rounds bf16 differently from a bmm).

A call that fails or times out marks its worker down and its rows are
re-planned onto other replicas of the same experts within the same step. If
an expert has no live replica, the step waits (bounded) for a new expert map
and then fails with :class:`ExpertUnavailableError`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import grpc
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc
from elasticmoe.core.expert_map import ExpertMap
from elasticmoe.experts.rpc import RpcSecurity, StubCache
from elasticmoe.experts.wire import WireError, host_array
from elasticmoe.model.gate import GateOutput
from elasticmoe.model.moe import ExpertGroups, group_by_expert
from elasticmoe.router.dispatch import DispatchTable, NoLiveReplicaError, RowSlice
from elasticmoe.router.stream import (
    Frame,
    NodeRefusedError,
    NodeStream,
    StreamBrokenError,
    WorkerStream,
    wait_for_results,
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the enclosed torch ops on the calling thread alone.

    CPU ``index_add_`` starts an OpenMP region whatever its size. Under
    ``OMP_WAIT_POLICY=PASSIVE`` (which a distributed engine runs with, so that it leaves the
    cores to the workers while it waits), waking the sleeping OpenMP thread costs 260-400 us
    for a [8..128, 256] add that takes 3-6 us on one thread. This matters only where the
    engine runs more than one torch thread (``engine_threads`` >= 2, an in-process router);
    an engine actor with the default one CPU already runs on one.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _code_name(code: int) -> str:
    """The name of a gRPC status code number (as a TokenResult carries it)."""
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


class ExpertUnavailableError(RuntimeError):
    """An expert had no live replica for longer than the configured wait."""


class RouterConfig(BaseModel):
    """Timeouts and thresholds of the router (``router.*`` of a serve config; unknown
    keys and out-of-range values are errors naming the field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpc_timeout_s: float = Field(30.0, gt=0, le=3600)
    expert_wait_timeout_s: float = Field(
        30.0, ge=0, le=3600, description="how long a step waits for an expert with no live replica"
    )
    probe_down_after_s: float = Field(
        2.0, gt=0, le=3600, description="a down worker is probed again (Health) after this long"
    )
    min_split_rows: int = Field(16, ge=1)
    node_streams: bool = Field(
        True,
        description="send frames to a worker on this node (same network namespace) over its "
        "Unix socket instead of gRPC (elasticmoe/experts/node_stream.py); false: gRPC always",
    )
    slow_worker_factor: float = Field(
        3.0,
        gt=1,
        le=1000,
        description="a worker whose call latency exceeds this multiple of the median is slow: "
        "its replicas get proportionally fewer rows",
    )


@dataclass
class RouterStats:
    """Counters for metrics: calls, failures, retries, time per layer."""

    forward_calls: int = 0
    failed_calls: int = 0
    retried_rows: int = 0
    rows_sent: int = 0
    dispatch_seconds: dict[int, float] = field(default_factory=dict)
    layer_calls: dict[int, int] = field(default_factory=dict)
    # per layer call, the compute time the slowest worker reported (the critical path),
    # summed over calls; and the compute time of all workers, summed
    critical_compute_seconds: float = 0.0
    worker_compute_seconds: float = 0.0


class WorkerLatency:
    """EWMA call latency per worker, turned into dispatch costs (1.0 = normal).

    A worker slower than ``slow_factor`` x the median worker gets a cost equal
    to its slowdown (capped at 16), so plan_dispatch sends it no rows where
    another replica is on a normal worker. The
    penalty decays with a 5 s half-life when no new calls are observed, so a
    worker that recovered gets traffic (and new samples) again.
    """

    def __init__(self, slow_factor: float = 3.0, alpha: float = 0.3) -> None:
        self.slow_factor = slow_factor
        self.alpha = alpha
        self._ewma: dict[str, tuple[float, float]] = {}  # worker -> (seconds, last update)
        self._lock = threading.Lock()

    def observe(self, worker: str, seconds: float) -> None:
        """Record one call's latency (called from gRPC callback threads)."""
        with self._lock:
            old = self._ewma.get(worker)
            value = seconds if old is None else (1 - self.alpha) * old[0] + self.alpha * seconds
            self._ewma[worker] = (value, time.monotonic())

    def costs(self) -> dict[str, float]:
        """Dispatch cost per known worker (only slow ones differ from 1.0)."""
        with self._lock:
            items = dict(self._ewma)
        if len(items) < 2:
            return {}
        values = sorted(v for v, _ in items.values())
        # lower median: with two workers, compare against the faster one
        median = values[(len(values) - 1) // 2] or 1e-9
        now = time.monotonic()
        costs = {}
        for worker, (value, updated) in items.items():
            ratio = value / median
            if ratio > self.slow_factor:
                decay = 0.5 ** ((now - updated) / 5.0)
                costs[worker] = max(1.0, min(16.0, ratio) * decay)
        return costs

    def slow_workers(self) -> list[str]:
        """Workers currently treated as slow."""
        return sorted(w for w, c in self.costs().items() if c > 1.0)


class _Call(NamedTuple):
    """One frame in flight: to ``worker`` for ``slices``, carrying ``tokens`` (the layer's
    rows, ascending), sent on ``stream`` at ``sent`` (``time.monotonic``)."""

    worker: str
    slices: list[RowSlice]
    tokens: torch.Tensor
    stream: WorkerStream | NodeStream
    ticket: Any
    sent: float


@dataclass
class _Pending:
    """A layer submitted to the workers (:meth:`ExpertRouter.submit`), not yet waited for."""

    layer: int
    hidden: torch.Tensor
    groups: ExpertGroups
    started: float
    pending: list[tuple[int, int, int]]
    calls: list[_Call] = field(default_factory=list)
    partials: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _host: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def host(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host views (:func:`host_array`) of the pairs' token rows and weights and of
        ``hidden``, made once per layer call (retries reuse them)."""
        if self._host is None:
            self._host = (
                host_array(self.groups.token_idx),
                host_array(self.groups.weights),
                host_array(self.hidden),
            )
        return self._host


class ExpertRouter:
    """An :class:`ExpertBackend` whose experts live in remote expert workers."""

    def __init__(
        self,
        expert_map: ExpertMap,
        dtype: torch.dtype,
        hidden_size: int,
        config: RouterConfig | None = None,
        pull_map: Callable[[], ExpertMap | None] | None = None,
    ) -> None:
        self.config = config or RouterConfig()
        self.dtype = dtype
        self.hidden_size = hidden_size
        self.pull_map = pull_map
        self.expert_map = expert_map
        self._pending_map: ExpertMap | None = None
        self._lock = threading.Lock()
        self._stubs = StubCache()
        self.down: dict[str, float] = {}  # worker id -> when it was marked down
        self._in_step = False
        self.latency = WorkerLatency(self.config.slow_worker_factor)
        self.stats = RouterStats()
        self._table: DispatchTable | None = None
        self._streams: dict[str, WorkerStream | NodeStream] = {}
        # (worker, address) -> its node stream's name as its Health gave it ("" if it has none)
        self._node_names: dict[tuple[str, str], str] = {}
        self._token = RpcSecurity.from_env().token
        # rows of this step whose experts had no live replica (their requests fail), with why
        self.lost_rows: list[tuple[torch.Tensor, str]] = []
        self._step_deadline: float | None = None

    # ----------------------------------------------------------- expert map
    def update_map(self, new_map: ExpertMap) -> None:
        """Push a new map; it takes effect at the next step boundary."""
        with self._lock:
            if new_map.epoch > max(self.expert_map.epoch, getattr(self._pending_map, "epoch", -1)):
                self._pending_map = new_map

    def newest_map(self) -> ExpertMap:
        """The newest map known: pushed for the next step, else the current one."""
        with self._lock:
            return self._pending_map or self.expert_map

    @property
    def epoch(self) -> int:
        """Epoch of the map the current step runs on."""
        return self.expert_map.epoch

    def begin_step(self) -> None:
        """Step boundary: switch to the newest pushed map, re-probe down workers."""
        with self._lock:
            if self._pending_map is not None:
                self.expert_map, self._pending_map = self._pending_map, None
                for worker in list(self.down):
                    if worker not in self.expert_map.workers:
                        del self.down[worker]
            self._in_step = True
        now = time.monotonic()
        for worker, since in list(self.down.items()):
            if now - since >= self.config.probe_down_after_s:
                self._probe(worker)
        self._table = self._new_table()
        self.lost_rows = []
        self._step_deadline = None

    def _new_table(self) -> DispatchTable:
        """The dispatch table for the map, down set and latency costs as they are now."""
        return DispatchTable(
            self.expert_map,
            self.down,
            self.latency.costs(),
            min_split_rows=self.config.min_split_rows,
        )

    def end_step(self) -> None:
        """The step is over: its epoch is no longer in use."""
        self._in_step = False
        self._table = None

    def active_epoch(self) -> int | None:
        """Epoch of the step running now, or None between steps.

        The controller frees what epoch N dropped only once no engine reports
        an active epoch <= N.
        """
        with self._lock:
            return self.expert_map.epoch if self._in_step else None

    def _probe(self, worker: str) -> None:
        try:
            self._stub(worker).Health(expert_pb2.HealthRequest(), timeout=0.5)
        except (grpc.RpcError, KeyError):
            self.down[worker] = time.monotonic()
        else:
            logger.info("worker %s is reachable again", worker)
            self.down.pop(worker, None)

    def _stub(self, worker: str) -> expert_pb2_grpc.ExpertServiceStub:
        return self._stubs.get(worker, self.expert_map.workers[worker])

    def _mark_down(self, worker: str, error: str) -> None:
        logger.warning("expert worker %s failed: %s", worker, error)
        # The router only routes around a down worker; the controller's own health
        # loop decides that a worker is dead and replaces it (one channel per fact).
        self.down[worker] = time.monotonic()
        if self._table is not None:
            self._table.mark_down(worker)

    # -------------------------------------------------------------- forward
    def forward(self, layer: int, hidden: torch.Tensor, gate: GateOutput) -> torch.Tensor:
        """Compute the layer's routed experts remotely; [T, H] -> [T, H].

        Each token goes once to each worker that serves any of its pairs, with those
        pairs' experts and gate weights; each worker returns the weighted partial sum
        per token, and the partial sums are added in worker-id order (deterministic).
        """
        return self.wait(self.submit(layer, hidden, gate))

    def submit(self, layer: int, hidden: torch.Tensor, gate: GateOutput) -> _Pending:
        """Send the layer's frames and return at once; :meth:`wait` gives the result."""
        if self._table is None:  # called outside a step (tools, tests)
            self._table = self._new_table()
        groups = group_by_expert(gate)
        state = _Pending(layer, hidden, groups, time.perf_counter(), list(groups.ranges()))
        self._dispatch(state)
        return state

    def wait(self, state: _Pending) -> torch.Tensor:
        """The result of :meth:`submit`: collects the frames, retries failed rows on other
        replicas (within the step), adds the partial sums."""
        while state.calls:
            pending = self._collect(state)
            if pending:
                self.stats.retried_rows += sum(end - start for _, start, end in pending)
            state.pending = pending
            self._dispatch(state)
        out = torch.zeros_like(state.hidden)
        with one_torch_thread():
            for _, tokens, partial in sorted(state.partials, key=lambda p: p[0]):
                out.index_add_(0, tokens, partial)
        layer = state.layer
        self.stats.dispatch_seconds[layer] = (
            self.stats.dispatch_seconds.get(layer, 0.0) + time.perf_counter() - state.started
        )
        self.stats.layer_calls[layer] = self.stats.layer_calls.get(layer, 0) + 1
        return out

    def _dispatch(self, state: _Pending) -> None:
        """Plan ``state.pending`` and send its frames (``state.calls``); rows of experts
        without a live replica wait (once per step) for a new map, then are lost."""
        assert self._table is not None
        state.calls = []
        while state.pending:
            try:
                plan = self._table.plan(state.layer, state.pending)
            except NoLiveReplicaError as e:
                # one wait per step: once it has run out, later layers do not wait again
                if self._step_deadline is None:
                    self._step_deadline = time.monotonic() + self.config.expert_wait_timeout_s
                if time.monotonic() <= self._step_deadline:
                    self._wait_for_replicas()
                    continue
                state.pending = self._lose(state.groups, state.pending, e)
                continue
            state.calls = self._submit_frames(state, plan)
            state.pending = []

    def _lose(
        self,
        groups: ExpertGroups,
        pending: list[tuple[int, int, int]],
        error: NoLiveReplicaError,
    ) -> list[tuple[int, int, int]]:
        """Give up on the rows of experts without a live replica (only their requests fail:
        see ``lost_rows``); return the ranges still to send."""
        missing = {e.expert for e in error.experts}
        lost = [r for r in pending if r[0] in missing]
        rows = torch.unique(torch.cat([groups.token_idx[a:b] for _, a, b in lost]))
        why = ExpertUnavailableError(
            f"{error} for {self.config.expert_wait_timeout_s:.0f}s (epoch "
            f"{self.expert_map.epoch}); the affected requests fail"
        )
        self.lost_rows.append((rows, f"{type(why).__name__}: {why}"))
        logger.warning("%s (%d token rows)", why, rows.numel())
        return [r for r in pending if r[0] not in missing]

    def _frame(self, state: _Pending, slices: list[RowSlice]) -> tuple[Frame, torch.Tensor]:
        """One worker's frame for ``slices`` and the token rows it carries (ascending).

        Built with numpy on host views of the layer's tensors: a frame is a handful of
        small index operations, each about 1 us in numpy against 2-10 us as a torch op
        (some of which start OpenMP threads for a few hundred elements).
        """
        token_idx, weights, hidden = state.host()
        slices = sorted(slices, key=lambda s: s.expert)
        if len(slices) == 1:
            s = slices[0]
            pair_tokens = token_idx[s.start : s.end]
            pair_weights = weights[s.start : s.end]
        else:
            pair_tokens = np.concatenate([token_idx[s.start : s.end] for s in slices])
            pair_weights = np.concatenate([weights[s.start : s.end] for s in slices])
        pair_experts = np.repeat(
            np.array([s.expert for s in slices], dtype=np.int32), [s.num_rows for s in slices]
        )
        tokens, rows = np.unique(pair_tokens, return_inverse=True)
        frame = Frame(
            layer=state.layer,
            epoch=self.expert_map.epoch,
            dtype=state.hidden.dtype,
            hidden=hidden[tokens],
            pair_rows=rows.astype(np.int32),
            pair_experts=pair_experts,
            pair_weights=np.ascontiguousarray(pair_weights),
        )
        return frame, torch.from_numpy(tokens).to(state.hidden.device)

    def _submit_frames(self, state: _Pending, plan: dict[str, list[RowSlice]]) -> list[_Call]:
        """One frame per worker of ``plan``, all in flight at once.

        Every frame is built before the first is sent: a sent frame wakes its worker (and
        a gRPC stream's thread), which would take the GIL from the building of the next one."""
        calls = []
        frames = [(worker, slices, *self._frame(state, slices)) for worker, slices in plan.items()]
        for worker, slices, frame, tokens in frames:
            stream = self._stream(worker)
            ticket = stream.submit(frame)
            calls.append(_Call(worker, slices, tokens, stream, ticket, time.monotonic()))
            self.stats.rows_sent += len(tokens)
        self.stats.forward_calls += len(calls)
        return calls

    def _collect(self, state: _Pending) -> list[tuple[int, int, int]]:
        """Wait for ``state.calls``; appends (worker, tokens, partial sums) to
        ``state.partials``; returns the ranges of the frames that failed."""
        layer, device = state.layer, state.hidden.device
        failed: list[tuple[int, int, int]] = []
        slowest = 0.0
        deadline = time.monotonic() + self.config.rpc_timeout_s
        node_calls = [(c.stream, c.ticket) for c in state.calls if isinstance(c.stream, NodeStream)]
        if node_calls:
            wait_for_results(node_calls, self.config.rpc_timeout_s)
        for worker, slices, tokens, stream, ticket, sent in state.calls:
            try:
                try:
                    result = stream.result(ticket, max(0.0, deadline - time.monotonic()))
                except concurrent.futures.TimeoutError:
                    # results come back in order: nothing behind this frame can arrive
                    self._close_stream(worker, "a frame timed out")
                    raise StreamBrokenError(
                        f"no result within rpc_timeout_s={self.config.rpc_timeout_s}"
                    ) from None
                self.latency.observe(worker, result.arrived - sent)
                if result.code:
                    raise WireError(f"{_code_name(result.code)}: {result.error}")
            except (StreamBrokenError, WireError) as e:
                self.stats.failed_calls += 1
                self._mark_down(worker, f"frame (layer={layer}) failed: {e}")
                failed.extend((s.expert, s.start, s.end) for s in slices)
                continue
            assert result.output is not None  # results arrive on the host
            output = result.output if device.type == "cpu" else result.output.to(device)
            state.partials.append((worker, tokens, output))
            slowest = max(slowest, result.compute_seconds)
            self.stats.worker_compute_seconds += result.compute_seconds
        self.stats.critical_compute_seconds += slowest
        state.calls = []
        return failed

    def _wait_for_replicas(self) -> None:
        """Give the controller a moment to publish a map with live replicas."""
        time.sleep(0.2)
        if self.pull_map is not None:
            try:
                new_map = self.pull_map()
            except Exception as e:  # a controller hiccup must not fail the step yet
                logger.warning("pulling the expert map failed: %s", e)
                new_map = None
            if new_map is not None:
                self.update_map(new_map)
        self.begin_step_probe_all()
        with self._lock:
            if self._pending_map is not None:
                self.expert_map, self._pending_map = self._pending_map, None
        self._table = self._new_table()

    def begin_step_probe_all(self) -> None:
        """Probe every down worker now (used while waiting for replicas)."""
        for worker in list(self.down):
            if worker in self.expert_map.workers:
                self._probe(worker)

    def _stream(self, worker: str) -> WorkerStream | NodeStream:
        """The open stream to ``worker`` (a new one after a break or a move): its node
        stream where the worker is on this node, else its gRPC ForwardStream."""
        address = self.expert_map.workers[worker]
        stream = self._streams.get(worker)
        if stream is None or stream.broken or stream.address != address:
            if stream is not None:
                stream.close("replaced")
            stream = self._streams[worker] = self._open_stream(worker, address)
        return stream

    def _open_stream(self, worker: str, address: str) -> WorkerStream | NodeStream:
        """The worker's node stream where it is reachable from here, else its gRPC stream.
        A node stream that cannot be opened under the remembered name is asked for again
        (a worker restarted at the same address has a new one) before gRPC is used."""
        if self.config.node_streams:
            remembered = (worker, address) in self._node_names
            for cached in (True, False) if remembered else (False,):
                name = self._node_name(worker, address, cached)
                if not name:
                    break
                try:
                    return NodeStream(
                        worker,
                        address,
                        name,
                        self._token,
                        self.dtype,
                        self.hidden_size,
                        timeout=self.config.rpc_timeout_s,
                    )
                except NodeRefusedError as e:
                    self._node_names.pop((worker, address), None)
                    if not cached:
                        logger.info("%s; this stream goes over gRPC", e)
        return WorkerStream(self._stub(worker), worker, address, self.dtype, self.hidden_size)

    def _node_name(self, worker: str, address: str, cached: bool) -> str:
        """The worker's node stream name as its Health answer tells it ("" if none); not
        remembered when the worker does not answer (it may be starting or down)."""
        key = (worker, address)
        if not cached or key not in self._node_names:
            try:
                health = self._stub(worker).Health(expert_pb2.HealthRequest(), timeout=2.0)
            except grpc.RpcError:
                return ""
            self._node_names[key] = health.node_stream
        return self._node_names[key]

    def frames_in_flight(self, worker: str) -> int:
        """Frames sent to ``worker`` on its open stream that have no result yet (several
        when micro-batches or layers are in flight at once)."""
        stream = self._streams.get(worker)
        return 0 if stream is None else stream.num_in_flight

    def _close_stream(self, worker: str, reason: str) -> None:
        stream = self._streams.pop(worker, None)
        if stream is not None:
            stream.close(reason)

    def close(self) -> None:
        """Close all streams and gRPC channels."""
        for worker in list(self._streams):
            self._close_stream(worker, "the router closed")
        self._stubs.close()
