"""The engine-side router: sends each MoE layer's rows to expert workers over gRPC.

Per layer: group rows by logical expert, plan which replica computes which
rows (:func:`plan_dispatch`), send one ``Forward`` call per worker, all
concurrent, and combine the results with the gate weights in expert order
(the same order as :class:`LocalExperts`, so results match it exactly).

A call that fails or times out marks its worker down and its rows are
re-planned onto other replicas of the same experts within the same step. If
an expert has no live replica, the step waits (bounded) for a new expert map
and then fails with :class:`ExpertUnavailableError`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch
from pydantic import BaseModel, ConfigDict, Field

from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc
from elasticmoe.core.expert_map import ExpertMap
from elasticmoe.experts.rpc import StubCache
from elasticmoe.experts.wire import WireError, tensor_from_proto, tensor_to_proto
from elasticmoe.model.gate import GateOutput
from elasticmoe.model.moe import ExpertGroups, combine_expert_outputs, group_by_expert
from elasticmoe.router.dispatch import DispatchTable, NoLiveReplicaError, RowSlice

logger = logging.getLogger(__name__)

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
        """Compute the layer's routed experts remotely; [T, H] -> [T, H]."""
        start_time = time.perf_counter()
        groups = group_by_expert(gate)
        outputs = torch.empty(
            (groups.token_idx.numel(), hidden.shape[1]), dtype=hidden.dtype, device=hidden.device
        )
        pending = list(groups.ranges())
        deadline: float | None = None
        if self._table is None:  # called outside a step (tools, tests)
            self._table = self._new_table()
        while pending:
            try:
                plan = self._table.plan(layer, pending)
            except NoLiveReplicaError as e:
                deadline = deadline or time.monotonic() + self.config.expert_wait_timeout_s
                if time.monotonic() > deadline:
                    raise ExpertUnavailableError(
                        f"{e} for {self.config.expert_wait_timeout_s:.0f}s (epoch "
                        f"{self.expert_map.epoch}); the affected requests fail"
                    ) from e
                self._wait_for_replicas()
                continue
            pending = self._send(layer, hidden, groups, plan, outputs)
            if pending:
                self.stats.retried_rows += sum(end - start for _, start, end in pending)
        combined = combine_expert_outputs(groups, outputs, torch.zeros_like(hidden))
        self.stats.dispatch_seconds[layer] = (
            self.stats.dispatch_seconds.get(layer, 0.0) + time.perf_counter() - start_time
        )
        self.stats.layer_calls[layer] = self.stats.layer_calls.get(layer, 0) + 1
        return combined

    def _send(
        self,
        layer: int,
        hidden: torch.Tensor,
        groups: ExpertGroups,
        plan: dict[str, list[RowSlice]],
        outputs: torch.Tensor,
    ) -> list[tuple[int, int, int]]:
        """One concurrent Forward per worker; fills ``outputs``; returns failed ranges."""
        calls = []
        for worker, slices in plan.items():
            idx = torch.cat([groups.token_idx[s.start : s.end] for s in slices])
            request = expert_pb2.ForwardRequest(
                layer=layer,
                experts=[
                    expert_pb2.ExpertRows(expert=s.expert, num_rows=s.num_rows) for s in slices
                ],
                hidden=tensor_to_proto(hidden[idx]),
                epoch=self.expert_map.epoch,
            )
            future = self._stub(worker).Forward.future(request, timeout=self.config.rpc_timeout_s)
            sent = time.monotonic()
            future.add_done_callback(
                lambda f, w=worker, t=sent: self.latency.observe(w, time.monotonic() - t)
            )
            calls.append((worker, slices, future))
            self.stats.rows_sent += len(idx)
        self.stats.forward_calls += len(calls)
        failed: list[tuple[int, int, int]] = []
        for worker, slices, future in calls:
            try:
                response = future.result()
                num_rows = sum(s.num_rows for s in slices)
                y = tensor_from_proto(
                    response.output,
                    self.dtype,
                    (num_rows, self.hidden_size),
                    device=outputs.device,
                    readonly_ok=True,
                    what="ForwardResponse.output",
                )
            except (grpc.RpcError, WireError) as e:
                self.stats.failed_calls += 1
                detail = e.details() if isinstance(e, grpc.RpcError) else str(e)
                self._mark_down(worker, f"Forward(layer={layer}) failed: {detail}")
                failed.extend((s.expert, s.start, s.end) for s in slices)
                continue
            offset = 0
            for s in slices:
                outputs[s.start : s.end] = y[offset : offset + s.num_rows]
                offset += s.num_rows
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

    def close(self) -> None:
        """Close all gRPC channels."""
        self._stubs.close()
