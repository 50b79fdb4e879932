"""Prometheus metrics (all named ``elasticmoe_*``).

Request-level metrics are observed where requests are seen: the HTTP
ingress. Engine, expert, worker and scaling figures live in other actors;
:class:`ClusterCollector` pulls them (engine stats, controller status, worker
stats) at scrape time, so every process need not run its own exporter.

``METRICS`` is the single list of names the code defines; the Grafana
dashboards are checked against it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from elasticmoe.core.experts import parse_expert

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RequestMetrics:
    """Metrics observed by the HTTP front for each request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "elasticmoe_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        self.ttft = Histogram(
            "elasticmoe_time_to_first_token_seconds",
            "Time from request to first token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "elasticmoe_inter_token_latency_seconds",
            "Time between consecutive output tokens",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "elasticmoe_e2e_latency_seconds",
            "Time from request to last token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "elasticmoe_prompt_tokens", "Prompt tokens of finished requests", registry=registry
        )
        self.generation_tokens = Counter(
            "elasticmoe_generation_tokens",
            "Generated tokens of finished requests",
            registry=registry,
        )
        self.in_flight = Gauge(
            "elasticmoe_http_requests_in_flight",
            "Requests being served by this front",
            registry=registry,
        )


class ClusterCollector(Collector):
    """Emits engine, expert, worker and scaling metrics pulled from the actors.

    ``engine_stats`` and ``controller_status`` are callables returning the
    dicts of ``EngineActor.stats`` and ``Controller.status``; results are
    cached for ``ttl`` seconds so frequent scrapes do not load the actors.
    """

    def __init__(
        self,
        engine_stats: Callable[[], list[dict[str, Any]]],
        controller_status: Callable[[], dict[str, Any] | None],
        ttl: float = 2.0,
    ) -> None:
        self.engine_stats = engine_stats
        self.controller_status = controller_status
        self.ttl = ttl
        self._cache: tuple[float, list[dict[str, Any]], dict[str, Any] | None] | None = None

    def _snapshot(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        now = time.monotonic()
        if self._cache is None or now - self._cache[0] > self.ttl:
            try:
                engines = self.engine_stats()
            except Exception as e:  # a scrape must not fail because one actor is busy
                logger.warning("engine stats unavailable: %s", e)
                engines = []
            try:
                status = self.controller_status()
            except Exception as e:
                logger.warning("controller status unavailable: %s", e)
                status = None
            self._cache = (now, engines, status)
        return self._cache[1], self._cache[2]

    def describe(self) -> list:
        """Nothing up front: families are only known at collect time."""
        return []

    def collect(self) -> Iterator:
        engines, status = self._snapshot()
        running = GaugeMetricFamily(
            "elasticmoe_running_requests", "Requests running", labels=["engine"]
        )
        waiting = GaugeMetricFamily(
            "elasticmoe_waiting_requests", "Requests waiting", labels=["engine"]
        )
        kv = GaugeMetricFamily(
            "elasticmoe_kv_cache_usage_ratio", "KV blocks in use", labels=["engine"]
        )
        hit = GaugeMetricFamily(
            "elasticmoe_prefix_cache_hit_ratio", "Prefix cache hit rate", labels=["engine"]
        )
        preempt = CounterMetricFamily(
            "elasticmoe_preemptions", "Sequences preempted for KV space", labels=["engine"]
        )
        dispatch = CounterMetricFamily(
            "elasticmoe_dispatch_seconds",
            "Time in expert dispatch per MoE layer",
            labels=["engine", "layer"],
        )
        dispatch_calls = CounterMetricFamily(
            "elasticmoe_dispatch_calls",
            "Expert dispatches per MoE layer",
            labels=["engine", "layer"],
        )
        failed = CounterMetricFamily(
            "elasticmoe_dispatch_failures",
            "Expert calls that failed and were retried",
            labels=["engine"],
        )
        tokens = CounterMetricFamily(
            "elasticmoe_expert_tokens",
            "Tokens routed to each logical expert",
            labels=["layer", "expert"],
        )
        totals: dict[tuple[str, str], float] = {}
        for s in engines:
            e = s["engine_id"]
            running.add_metric([e], s["num_running"])
            waiting.add_metric([e], s["num_waiting"])
            kv.add_metric([e], s["kv_usage"])
            hit.add_metric([e], s["prefix_cache_hit_rate"])
            preempt.add_metric([e], s["num_preemptions"])
            failed.add_metric([e], s.get("failed_calls", 0))
            for layer, seconds in s.get("dispatch_seconds", {}).items():
                dispatch.add_metric([e, str(layer)], seconds)
            for layer, calls in s.get("dispatch_calls", {}).items():
                dispatch_calls.add_metric([e, str(layer)], calls)
            for row, layer in enumerate(s.get("moe_layers", [])):
                for expert, n in enumerate(s["expert_load"][row]):
                    key = (str(layer), str(expert))
                    totals[key] = totals.get(key, 0.0) + n
        for (layer, expert), n in sorted(totals.items()):
            tokens.add_metric([layer, expert], n)
        yield from (running, waiting, kv, hit, preempt, dispatch, dispatch_calls, failed, tokens)
        if status is None:
            return
        yield from self._control_metrics(status)

    def _control_metrics(self, status: dict[str, Any]) -> Iterator:
        epoch = GaugeMetricFamily("elasticmoe_expert_map_epoch", "Current expert map epoch")
        epoch.add_metric([], status["epoch"] or 0)
        replicas = GaugeMetricFamily(
            "elasticmoe_expert_replicas", "Replicas per logical expert", labels=["layer", "expert"]
        )
        for key, holders in status["replicas"].items():
            expert = parse_expert(key)
            replicas.add_metric([str(expert.layer), str(expert.expert)], len(holders))
        workers = GaugeMetricFamily(
            "elasticmoe_workers", "Expert workers", labels=["pool", "healthy"]
        )
        counts: dict[tuple[str, str], int] = {}
        load = GaugeMetricFamily(
            "elasticmoe_worker_load_tokens",
            "Tokens routed to each worker's replicas",
            labels=["worker"],
        )
        slots = GaugeMetricFamily(
            "elasticmoe_worker_slots_used", "Slots holding a replica", labels=["worker"]
        )
        for w in status["workers"]:
            key = (w["pool"] or "default", "true" if w["healthy"] else "false")
            counts[key] = counts.get(key, 0) + 1
            load.add_metric([w["worker_id"]], w["load"])
            slots.add_metric([w["worker_id"]], w["num_replicas"])
        for (pool, healthy), n in counts.items():
            workers.add_metric([pool, healthy], n)
        loads = [w["load"] for w in status["workers"]]
        balance = GaugeMetricFamily(
            "elasticmoe_worker_load_balance", "Mean / max token load over workers (1 = even)"
        )
        balance.add_metric(
            [], (sum(loads) / len(loads)) / max(loads) if loads and max(loads) else 1.0
        )
        ops = CounterMetricFamily(
            "elasticmoe_scaling_operations",
            "Scaling operations by kind and result",
            labels=["kind", "result"],
        )
        duration = CounterMetricFamily(
            "elasticmoe_scaling_duration_seconds",
            "Total seconds spent in scaling operations",
            labels=["kind", "result"],
        )
        for op in status.get("operations", []):
            ops.add_metric([op["kind"], op["result"]], op["count"])
            duration.add_metric([op["kind"], op["result"]], op["seconds"])
        yield from (epoch, replicas, workers, load, slots, balance, ops, duration)


# Every metric name the code exports (Prometheus adds _total/_bucket/... suffixes).
METRICS = {
    "elasticmoe_requests": "counter",
    "elasticmoe_time_to_first_token_seconds": "histogram",
    "elasticmoe_inter_token_latency_seconds": "histogram",
    "elasticmoe_e2e_latency_seconds": "histogram",
    "elasticmoe_prompt_tokens": "counter",
    "elasticmoe_generation_tokens": "counter",
    "elasticmoe_http_requests_in_flight": "gauge",
    "elasticmoe_running_requests": "gauge",
    "elasticmoe_waiting_requests": "gauge",
    "elasticmoe_kv_cache_usage_ratio": "gauge",
    "elasticmoe_prefix_cache_hit_ratio": "gauge",
    "elasticmoe_preemptions": "counter",
    "elasticmoe_dispatch_seconds": "counter",
    "elasticmoe_dispatch_calls": "counter",
    "elasticmoe_dispatch_failures": "counter",
    "elasticmoe_expert_tokens": "counter",
    "elasticmoe_expert_map_epoch": "gauge",
    "elasticmoe_expert_replicas": "gauge",
    "elasticmoe_workers": "gauge",
    "elasticmoe_worker_load_tokens": "gauge",
    "elasticmoe_worker_slots_used": "gauge",
    "elasticmoe_worker_load_balance": "gauge",
    "elasticmoe_scaling_operations": "counter",
    "elasticmoe_scaling_duration_seconds": "counter",
}
