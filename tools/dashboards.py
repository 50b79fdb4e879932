"""Grafana dashboards for the metrics in :mod:`elasticmoe.serve.metrics`.

The dashboards are plain dicts built here and committed as JSON under
``dashboards/`` at the repository root; ``python tools/dashboards.py``
rewrites them (``--check`` only reports whether they are stale). The tests check
every query against :data:`elasticmoe.serve.metrics.METRICS`, so the
dashboards only query metrics that the code defines.

Conventions of the queries:

- Every panel and query reads the ``${datasource}`` template variable, so one
  JSON file works with any Prometheus data source (import or provisioning).
- Request metrics (``elasticmoe_requests_total``, the latency histograms, the
  token counters, in-flight requests) are observed by each HTTP front, so they
  are *summed* over fronts.
- Engine, expert, worker and scaling metrics come from the
  :class:`~elasticmoe.serve.metrics.ClusterCollector` that every front
  registers: with several fronts, Prometheus scrapes the same figures once per
  front. Those queries first take ``max by (<the metric's own labels>)``, which
  removes the copies, and only then aggregate.
- Rates use :data:`RATE_WINDOW`; scaling operations are rare, so their rates
  and mean durations use the longer :data:`SLOW_WINDOW`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = REPO / "dashboards"

SCHEMA_VERSION = 39
TAGS = ["elasticmoe"]
RATE_WINDOW = "5m"
SLOW_WINDOW = "15m"
DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24

# Exposition suffixes Prometheus adds to a metric's base name.
EXPOSED_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")
METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])elasticmoe_[A-Za-z0-9_:]*")

Panel = dict[str, Any]
Dashboard = dict[str, Any]


# --------------------------------------------------------------- inspection
def iter_panels(dashboard: Dashboard) -> Iterator[Panel]:
    """Every panel of ``dashboard``, rows included, and the panels inside rows."""
    stack = list(reversed(dashboard.get("panels", [])))
    while stack:
        panel = stack.pop()
        yield panel
        stack.extend(reversed(panel.get("panels", [])))


def iter_exprs(dashboard: Dashboard) -> Iterator[tuple[Panel, str]]:
    """``(panel, expr)`` for every PromQL expression of every panel target."""
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                yield panel, target["expr"]


def exposed_names(expr: str) -> list[str]:
    """The ``elasticmoe_*`` series names in ``expr`` as written (with suffixes)."""
    return METRIC_RE.findall(expr)


def base_name(exposed: str) -> str:
    """The metric name the code defines for an exposed series name."""
    for suffix in EXPOSED_SUFFIXES:
        if exposed.endswith(suffix):
            return exposed[: -len(suffix)]
    return exposed


def queried_metrics(dashboard: Dashboard) -> set[str]:
    """Base names of all ``elasticmoe_*`` metrics that ``dashboard``'s targets query."""
    return {base_name(n) for _, expr in iter_exprs(dashboard) for n in exposed_names(expr)}


# ----------------------------------------------------------------- builders
def _target(expr: str, legend: str, ref: str, *, instant: bool = False) -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "format": "time_series",
        "instant": instant,
        "legendFormat": legend,
        "range": not instant,
        "refId": ref,
    }


def _targets(queries: Sequence[tuple[str, str]], *, instant: bool = False) -> list[dict[str, Any]]:
    return [
        _target(expr, legend, chr(ord("A") + i), instant=instant)
        for i, (expr, legend) in enumerate(queries)
    ]


def _thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    if not steps:
        steps = ((None, "green"),)
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def _defaults(
    unit: str,
    *,
    min_: float | None = None,
    max_: float | None = None,
    decimals: int | None = None,
    thresholds: dict[str, Any] | None = None,
    color: str = "palette-classic",
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "color": {"mode": color},
        "mappings": [],
        "thresholds": thresholds or _thresholds(),
        "unit": unit,
    }
    if min_ is not None:
        d["min"] = min_
    if max_ is not None:
        d["max"] = max_
    if decimals is not None:
        d["decimals"] = decimals
    return d


def _panel(
    kind: str,
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    defaults: dict[str, Any],
    options: dict[str, Any],
) -> Panel:
    return {
        "datasource": DATASOURCE,
        "description": description,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
        "title": title,
        "type": kind,
    }


_REDUCE_LAST = {"calcs": ["lastNotNull"], "fields": "", "values": False}


def timeseries(
    title: str,
    description: str,
    queries: Sequence[tuple[str, str]],
    unit: str,
    *,
    stack: bool = False,
    min_: float | None = 0,
    max_: float | None = None,
    decimals: int | None = None,
) -> Panel:
    """A time series panel with a table legend (mean, max, last)."""
    defaults = _defaults(unit, min_=min_, max_=max_, decimals=decimals)
    defaults["custom"] = {
        "axisBorderShow": False,
        "axisPlacement": "auto",
        "drawStyle": "line",
        "fillOpacity": 25 if stack else 10,
        "gradientMode": "none",
        "lineInterpolation": "linear",
        "lineWidth": 1,
        "pointSize": 4,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
    }
    options = {
        "legend": {
            "calcs": ["mean", "max", "lastNotNull"],
            "displayMode": "table",
            "placement": "bottom",
            "showLegend": True,
        },
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return _panel("timeseries", title, description, _targets(queries), defaults, options)


def stat(
    title: str,
    description: str,
    queries: Sequence[tuple[str, str]],
    unit: str,
    *,
    thresholds: dict[str, Any] | None = None,
    decimals: int | None = None,
) -> Panel:
    """A single-value panel with a sparkline, coloured by ``thresholds``."""
    defaults = _defaults(unit, decimals=decimals, thresholds=thresholds, color="thresholds")
    options = {
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "orientation": "auto",
        "reduceOptions": _REDUCE_LAST,
        "showPercentChange": False,
        "textMode": "auto",
        "wideLayout": True,
    }
    return _panel("stat", title, description, _targets(queries), defaults, options)


def gauge(
    title: str,
    description: str,
    queries: Sequence[tuple[str, str]],
    unit: str,
    *,
    min_: float,
    max_: float,
    thresholds: dict[str, Any],
) -> Panel:
    """A gauge between ``min_`` and ``max_``."""
    defaults = _defaults(unit, min_=min_, max_=max_, thresholds=thresholds, color="thresholds")
    options = {
        "minVizHeight": 75,
        "minVizWidth": 75,
        "orientation": "auto",
        "reduceOptions": _REDUCE_LAST,
        "showThresholdLabels": False,
        "showThresholdMarkers": True,
        "sizing": "auto",
    }
    return _panel("gauge", title, description, _targets(queries), defaults, options)


def bargauge(
    title: str,
    description: str,
    queries: Sequence[tuple[str, str]],
    unit: str,
    *,
    min_: float | None = 0,
    thresholds: dict[str, Any] | None = None,
) -> Panel:
    """Horizontal bars, one per series, from an instant query."""
    defaults = _defaults(
        unit,
        min_=min_,
        thresholds=thresholds,
        color="thresholds" if thresholds else "continuous-BlYlRd",
    )
    options = {
        "displayMode": "gradient",
        "maxVizHeight": 300,
        "minVizHeight": 16,
        "minVizWidth": 8,
        "namePlacement": "left",
        "orientation": "horizontal",
        "reduceOptions": _REDUCE_LAST,
        "showUnfilled": True,
        "sizing": "auto",
        "valueMode": "color",
    }
    return _panel(
        "bargauge", title, description, _targets(queries, instant=True), defaults, options
    )


def heatmap(title: str, description: str, queries: Sequence[tuple[str, str]], unit: str) -> Panel:
    """A heatmap whose rows are the series (one row per legend name), over time."""
    defaults = _defaults(unit)
    defaults["custom"] = {
        "hideFrom": {"legend": False, "tooltip": False, "viz": False},
        "scaleDistribution": {"type": "linear"},
    }
    options = {
        "calculate": False,
        "cellGap": 1,
        "cellValues": {"unit": unit},
        "color": {
            "exponent": 0.5,
            "fill": "dark-orange",
            "mode": "scheme",
            "reverse": False,
            "scale": "exponential",
            "scheme": "Oranges",
            "steps": 64,
        },
        "exemplars": {"color": "rgba(255,0,255,0.7)"},
        "filterValues": {"le": 1e-9},
        "legend": {"show": True},
        "rowsFrame": {"layout": "auto"},
        "tooltip": {"mode": "single", "showColorScale": False, "yHistogram": False},
        "yAxis": {"axisPlacement": "left", "reverse": False},
    }
    return _panel("heatmap", title, description, _targets(queries), defaults, options)


class _Grid:
    """Places panels left to right in rows of :data:`GRID_WIDTH` columns."""

    def __init__(self) -> None:
        self.panels: list[Panel] = []
        self.x = 0
        self.y = 0
        self.line_height = 0

    def _newline(self) -> None:
        self.y += self.line_height
        self.x = 0
        self.line_height = 0

    def row(self, title: str) -> None:
        """Start a (non-collapsed) row titled ``title`` on a new line."""
        self._newline()
        self.panels.append(
            {
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": self.y},
                "id": len(self.panels) + 1,
                "panels": [],
                "title": title,
                "type": "row",
            }
        )
        self.y += 1

    def add(self, panel: Panel, w: int, h: int = 8) -> None:
        """Place ``panel`` ``w`` columns wide and ``h`` high, wrapping when full."""
        if self.x + w > GRID_WIDTH:
            self._newline()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel["id"] = len(self.panels) + 1
        self.panels.append(panel)
        self.x += w
        self.line_height = max(self.line_height, h)


def _dashboard(uid: str, title: str, description: str, grid: _Grid) -> Dashboard:
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [
            {
                "asDropdown": True,
                "icon": "external link",
                "includeVars": True,
                "keepTime": True,
                "tags": TAGS,
                "targetBlank": False,
                "title": "ElasticMoE dashboards",
                "tooltip": "",
                "type": "dashboards",
                "url": "",
            }
        ],
        "panels": grid.panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": list(TAGS),
        "templating": {
            "list": [
                {
                    "current": {},
                    "hide": 0,
                    "includeAll": False,
                    "label": "Data source",
                    "multi": False,
                    "name": "datasource",
                    "options": [],
                    "query": "prometheus",
                    "refresh": 1,
                    "regex": "",
                    "skipUrlSync": False,
                    "type": "datasource",
                }
            ]
        },
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


# --------------------------------------------------------------- dashboards
def _rate(series: str, window: str = RATE_WINDOW) -> str:
    return f"rate({series}[{window}])"


def _quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le) ({_rate(histogram + '_bucket')}))"


def _latency_queries(histogram: str) -> list[tuple[str, str]]:
    mean = f"sum({_rate(histogram + '_sum')}) / sum({_rate(histogram + '_count')})"
    return [(_quantile(0.5, histogram), "p50"), (_quantile(0.99, histogram), "p99"), (mean, "mean")]


_REQUESTS = "elasticmoe_requests_total"


def _status_ratio(pattern: str) -> str:
    """Share of requests whose status matches ``pattern`` (0, not empty, when none do)."""
    matching = _rate(_REQUESTS + '{status=~"' + pattern + '"}')
    return f"(sum({matching}) or vector(0)) / sum({_rate(_REQUESTS)})"


_ERROR_RATIO = _status_ratio("5..")
_CLIENT_ERROR_RATIO = _status_ratio("4..")
_TTFT = "elasticmoe_time_to_first_token_seconds"
_ITL = "elasticmoe_inter_token_latency_seconds"
_E2E = "elasticmoe_e2e_latency_seconds"
_TOKENS_PER_S = "count:tok/s"
_ERROR_STEPS = _thresholds((None, "green"), (0.01, "yellow"), (0.05, "red"))


def serving_overview() -> Dashboard:
    """Requests, latency, throughput and engine state."""
    g = _Grid()
    g.row("Summary")
    g.add(
        stat(
            "Request rate",
            "HTTP requests per second over all fronts and endpoints.",
            [(f"sum({_rate(_REQUESTS)})", "requests/s")],
            "reqps",
        ),
        4,
        4,
    )
    g.add(
        stat(
            "Error ratio (5xx)",
            "Share of requests answered with a 5xx status.",
            [(_ERROR_RATIO, "5xx")],
            "percentunit",
            thresholds=_ERROR_STEPS,
            decimals=2,
        ),
        4,
        4,
    )
    g.add(
        stat(
            "TTFT p99",
            "99th percentile time to first token.",
            [(_quantile(0.99, _TTFT), "p99")],
            "s",
            thresholds=_thresholds((None, "green"), (2, "yellow"), (5, "red")),
        ),
        4,
        4,
    )
    g.add(
        stat(
            "Generation throughput",
            "Generated tokens per second over all fronts.",
            [(f"sum({_rate('elasticmoe_generation_tokens_total')})", "generation")],
            _TOKENS_PER_S,
        ),
        4,
        4,
    )
    g.add(
        stat(
            "Running requests",
            "Requests the engines are running now.",
            [("sum(max by (engine) (elasticmoe_running_requests))", "running")],
            "short",
        ),
        4,
        4,
    )
    g.add(
        stat(
            "Waiting requests",
            "Requests queued in the engines' schedulers.",
            [("sum(max by (engine) (elasticmoe_waiting_requests))", "waiting")],
            "short",
            thresholds=_thresholds((None, "green"), (1, "yellow"), (50, "red")),
        ),
        4,
        4,
    )

    g.row("Requests")
    g.add(
        timeseries(
            "Request rate by status",
            "HTTP requests per second by status code, summed over fronts and endpoints.",
            [(f"sum by (status) ({_rate(_REQUESTS)})", "{{status}}")],
            "reqps",
            stack=True,
        ),
        12,
    )
    g.add(
        timeseries(
            "Request rate by endpoint",
            "HTTP requests per second by endpoint, summed over fronts and status codes.",
            [(f"sum by (endpoint) ({_rate(_REQUESTS)})", "{{endpoint}}")],
            "reqps",
            stack=True,
        ),
        12,
    )
    g.add(
        timeseries(
            "Error ratio",
            "Share of requests answered with a 5xx (server) or 4xx (client) status.",
            [(_ERROR_RATIO, "5xx"), (_CLIENT_ERROR_RATIO, "4xx")],
            "percentunit",
        ),
        12,
    )
    g.add(
        timeseries(
            "HTTP requests in flight",
            "Requests being served by the HTTP fronts now (streams included).",
            [("sum(elasticmoe_http_requests_in_flight)", "in flight")],
            "short",
        ),
        12,
    )

    g.row("Latency")
    for title, hist, what in (
        ("Time to first token", _TTFT, "from request arrival to the first output token"),
        ("Inter-token latency", _ITL, "between consecutive output tokens"),
        ("End-to-end latency", _E2E, "from request arrival to the last output token"),
    ):
        g.add(
            timeseries(
                title,
                f"p50, p99 and mean time {what}, over all fronts.",
                _latency_queries(hist),
                "s",
            ),
            8,
        )

    g.row("Throughput and engines")
    g.add(
        timeseries(
            "Token throughput",
            "Prompt and generated tokens per second of finished requests, over all fronts.",
            [
                (f"sum({_rate('elasticmoe_prompt_tokens_total')})", "prompt"),
                (f"sum({_rate('elasticmoe_generation_tokens_total')})", "generation"),
            ],
            _TOKENS_PER_S,
        ),
        12,
    )
    g.add(
        timeseries(
            "Running and waiting requests",
            "Requests each engine is running, and requests waiting in its scheduler.",
            [
                ("max by (engine) (elasticmoe_running_requests)", "{{engine}} running"),
                ("max by (engine) (elasticmoe_waiting_requests)", "{{engine}} waiting"),
            ],
            "short",
        ),
        12,
    )
    g.add(
        timeseries(
            "KV cache usage",
            "Share of each engine's paged KV blocks in use.",
            [("max by (engine) (elasticmoe_kv_cache_usage_ratio)", "{{engine}}")],
            "percentunit",
            max_=1,
        ),
        8,
    )
    g.add(
        timeseries(
            "Prefix cache hit ratio",
            "Share of prompt blocks each engine found in its prefix cache.",
            [("max by (engine) (elasticmoe_prefix_cache_hit_ratio)", "{{engine}}")],
            "percentunit",
            max_=1,
        ),
        8,
    )
    g.add(
        timeseries(
            "Preemptions",
            "Sequences preempted per second to free KV space, by engine.",
            [
                (
                    f"max by (engine) ({_rate('elasticmoe_preemptions_total')})",
                    "{{engine}}",
                )
            ],
            "ops",
        ),
        8,
    )
    return _dashboard(
        "elasticmoe-serving-overview",
        "ElasticMoE / Serving overview",
        "Requests, latency, token throughput and engine state of an elasticmoe deployment.",
        g,
    )


_EXPERT_RATE = f"max by (layer, expert) ({_rate('elasticmoe_expert_tokens_total')})"
_REPLICAS = "max by (layer, expert) (elasticmoe_expert_replicas)"
_OPS = "elasticmoe_scaling_operations_total"
_OP_SECONDS = "elasticmoe_scaling_duration_seconds_total"


def _per_layer_dispatch(counter: str) -> str:
    return f"sum by (layer) (max by (engine, layer) ({_rate(counter)}))"


def experts_and_scaling() -> Dashboard:
    """Expert load, replicas, the expert map, scaling operations and dispatch."""
    g = _Grid()
    g.row("Summary")
    g.add(
        stat(
            "Expert map epoch",
            "Epoch of the controller's current expert map; it grows by one per change.",
            [("max(elasticmoe_expert_map_epoch)", "epoch")],
            "none",
            decimals=0,
        ),
        6,
        4,
    )
    g.add(
        stat(
            "Replicas",
            "Replicas (physical experts) over all logical experts.",
            [(f"sum({_REPLICAS})", "replicas")],
            "short",
            decimals=0,
        ),
        6,
        4,
    )
    g.add(
        stat(
            "Replicated experts",
            "Logical experts with more than one replica.",
            [(f"count({_REPLICAS} > 1) or vector(0)", "replicated")],
            "short",
            decimals=0,
        ),
        6,
        4,
    )
    g.add(
        stat(
            "Rolled-back scaling operations",
            "Scaling operations in the dashboard's time range that did not finish "
            "(result other than done).",
            [
                (
                    f'sum(max by (kind, result) (increase({_OPS}{{result!="done"}}[$__range])))'
                    " or vector(0)",
                    "rolled back",
                )
            ],
            "short",
            thresholds=_thresholds((None, "green"), (1, "red")),
            decimals=0,
        ),
        6,
        4,
    )

    g.row("Expert load")
    g.add(
        heatmap(
            "Tokens per logical expert",
            "Tokens per second routed to each logical expert (row = layer:expert), over time.",
            [(_EXPERT_RATE, "{{layer}}:{{expert}}")],
            _TOKENS_PER_S,
        ),
        16,
        10,
    )
    g.add(
        bargauge(
            "Hottest logical experts",
            "The 15 logical experts that receive the most tokens per second now.",
            [(f"sort_desc(topk(15, {_EXPERT_RATE}))", "layer {{layer}} expert {{expert}}")],
            _TOKENS_PER_S,
        ),
        8,
        10,
    )
    g.add(
        timeseries(
            "Load skew per layer",
            "Per MoE layer: token rate of the hottest expert over the mean over experts "
            "(1 = even).",
            [
                (
                    f"max by (layer) ({_EXPERT_RATE}) / avg by (layer) ({_EXPERT_RATE})",
                    "layer {{layer}}",
                )
            ],
            "suffix:x",
            min_=1,
        ),
        12,
    )
    g.add(
        timeseries(
            "Tokens per layer",
            "Tokens per second routed to the experts of each MoE layer (top-k counts each).",
            [(f"sum by (layer) ({_EXPERT_RATE})", "layer {{layer}}")],
            _TOKENS_PER_S,
        ),
        12,
    )

    g.row("Replicas and expert map")
    g.add(
        bargauge(
            "Replicas per logical expert",
            "Replica count of the 20 logical experts with the most replicas.",
            [(f"sort_desc(topk(20, {_REPLICAS}))", "layer {{layer}} expert {{expert}}")],
            "short",
            thresholds=_thresholds((None, "blue"), (2, "green"), (4, "orange")),
        ),
        8,
        10,
    )
    g.add(
        timeseries(
            "Replicas per layer",
            "Replicas of all logical experts of each MoE layer.",
            [(f"sum by (layer) ({_REPLICAS})", "layer {{layer}}")],
            "short",
        ),
        8,
        10,
    )
    g.add(
        timeseries(
            "Expert map epoch over time",
            "Epoch of the controller's expert map; each step up is a published change.",
            [("max(elasticmoe_expert_map_epoch)", "epoch")],
            "none",
            min_=None,
            decimals=0,
        ),
        8,
        10,
    )

    g.row("Scaling operations")
    g.add(
        timeseries(
            "Scaling operations by kind and result",
            f"Scaling operations per second by kind and result ({SLOW_WINDOW} rate).",
            [
                (
                    f"max by (kind, result) ({_rate(_OPS, SLOW_WINDOW)})",
                    "{{kind}} {{result}}",
                )
            ],
            "ops",
            stack=True,
        ),
        12,
    )
    g.add(
        timeseries(
            "Mean scaling duration by kind",
            f"Mean seconds per scaling operation of each kind ({SLOW_WINDOW} window).",
            [
                (
                    f"sum by (kind) (max by (kind, result) ({_rate(_OP_SECONDS, SLOW_WINDOW)}))"
                    f" / sum by (kind) (max by (kind, result) ({_rate(_OPS, SLOW_WINDOW)}))",
                    "{{kind}}",
                )
            ],
            "s",
        ),
        12,
    )

    g.row("Expert dispatch")
    g.add(
        timeseries(
            "Dispatch latency per layer",
            "Mean seconds per expert dispatch (all gRPC calls of one MoE layer in one step), "
            "over engines.",
            [
                (
                    f"{_per_layer_dispatch('elasticmoe_dispatch_seconds_total')}"
                    f" / {_per_layer_dispatch('elasticmoe_dispatch_calls_total')}",
                    "layer {{layer}}",
                )
            ],
            "s",
        ),
        12,
    )
    g.add(
        timeseries(
            "Dispatch rate per layer",
            "Expert dispatches per second of each MoE layer, over engines.",
            [(_per_layer_dispatch("elasticmoe_dispatch_calls_total"), "layer {{layer}}")],
            "ops",
        ),
        6,
    )
    g.add(
        timeseries(
            "Dispatch failures",
            "Expert calls per second that failed and were retried on another replica, by engine.",
            [
                (
                    f"max by (engine) ({_rate('elasticmoe_dispatch_failures_total')})",
                    "{{engine}}",
                )
            ],
            "ops",
        ),
        6,
    )
    return _dashboard(
        "elasticmoe-experts-and-scaling",
        "ElasticMoE / Experts and scaling",
        "Token load per logical expert, replicas, the expert map, scaling operations and "
        "expert dispatch.",
        g,
    )


_WORKERS = "max by (pool, healthy) (elasticmoe_workers)"
_HEALTHY = 'sum(max by (pool, healthy) (elasticmoe_workers{{healthy="{healthy}"}})) or vector(0)'
_LOAD = "max by (worker) (elasticmoe_worker_load_tokens)"
_SLOTS = "max by (worker) (elasticmoe_worker_slots_used)"
_BALANCE = "max(elasticmoe_worker_load_balance)"


def workers_and_pools() -> Dashboard:
    """Expert workers by pool and health, their slots and token load."""
    g = _Grid()
    g.row("Summary")
    g.add(
        stat(
            "Healthy workers",
            "Expert workers that answer health checks.",
            [(_HEALTHY.format(healthy="true"), "healthy")],
            "short",
            decimals=0,
        ),
        6,
        4,
    )
    g.add(
        stat(
            "Unhealthy workers",
            "Expert workers that do not answer health checks.",
            [(_HEALTHY.format(healthy="false"), "unhealthy")],
            "short",
            thresholds=_thresholds((None, "green"), (1, "red")),
            decimals=0,
        ),
        6,
        4,
    )
    g.add(
        stat(
            "Slots used",
            "Slots holding a replica, over all workers.",
            [(f"sum({_SLOTS})", "slots")],
            "short",
            decimals=0,
        ),
        6,
        4,
    )
    g.add(
        gauge(
            "Worker load balance",
            "Mean over max token load of the workers: 1 is perfectly even.",
            [(_BALANCE, "balance")],
            "percentunit",
            min_=0,
            max_=1,
            thresholds=_thresholds((None, "red"), (0.5, "yellow"), (0.8, "green")),
        ),
        6,
        4,
    )

    g.row("Workers and pools")
    g.add(
        timeseries(
            "Workers by pool and health",
            "Expert workers in each accelerator pool, healthy or not.",
            [(_WORKERS, "{{pool}} healthy={{healthy}}")],
            "short",
            stack=True,
            decimals=0,
        ),
        12,
    )
    g.add(
        timeseries(
            "Worker load balance over time",
            "Mean over max token load of the workers (1 = even); placement aims to keep it high.",
            [(_BALANCE, "mean / max")],
            "percentunit",
            max_=1,
        ),
        12,
    )

    g.row("Per worker")
    g.add(
        bargauge(
            "Slots used per worker",
            "Slots holding a replica on each worker now.",
            [(f"sort_desc({_SLOTS})", "{{worker}}")],
            "short",
        ),
        8,
        10,
    )
    g.add(
        timeseries(
            "Slots used per worker over time",
            "Slots holding a replica on each worker.",
            [(_SLOTS, "{{worker}}")],
            "short",
            decimals=0,
        ),
        16,
        10,
    )
    g.add(
        bargauge(
            "Token load per worker",
            "Tokens routed to each worker's replicas so far (an expert's tokens are split "
            "evenly over its replicas).",
            [(f"sort_desc({_LOAD})", "{{worker}}")],
            "count:tokens",
        ),
        8,
        10,
    )
    g.add(
        timeseries(
            "Token load growth per worker",
            "Tokens per second added to each worker's load (derivative of the load gauge; "
            "jumps when replicas move).",
            [
                (
                    f"max by (worker) (deriv(elasticmoe_worker_load_tokens[{RATE_WINDOW}]))",
                    "{{worker}}",
                )
            ],
            _TOKENS_PER_S,
            min_=None,
        ),
        16,
        10,
    )
    return _dashboard(
        "elasticmoe-workers-and-pools",
        "ElasticMoE / Workers and pools",
        "Expert workers by pool and health, the slots they use and the token load they carry.",
        g,
    )


# ------------------------------------------------------------------ output
def build_dashboards() -> dict[str, Dashboard]:
    """File name -> dashboard JSON (as dicts) for every dashboard."""
    return {
        "serving-overview.json": serving_overview(),
        "experts-and-scaling.json": experts_and_scaling(),
        "workers-and-pools.json": workers_and_pools(),
    }


def render(dashboard: Dashboard) -> str:
    """The committed text of ``dashboard``: sorted keys, 2-space indent, final newline."""
    return json.dumps(dashboard, indent=2, sort_keys=True) + "\n"


def write_dashboards(out_dir: Path = DASHBOARD_DIR) -> list[Path]:
    """Write every dashboard of :func:`build_dashboards` to ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dashboard in build_dashboards().items():
        path = out_dir / name
        path.write_text(render(dashboard), encoding="utf-8")
        written.append(path)
    return written


def stale_dashboards(out_dir: Path = DASHBOARD_DIR) -> list[str]:
    """Names of dashboards whose file in ``out_dir`` is missing or differs from a fresh build."""
    out_dir = Path(out_dir)
    stale = []
    for name, dashboard in build_dashboards().items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(dashboard):
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """``python tools/dashboards.py [--out DIR] [--check]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DASHBOARD_DIR, help="output folder")
    parser.add_argument(
        "--check", action="store_true", help="only report stale files (exit 1 if any)"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_dashboards(args.out)
        for name in stale:
            print(f"stale: {args.out / name}", file=sys.stderr)
        return 1 if stale else 0
    for path in write_dashboards(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
