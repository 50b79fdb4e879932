"""The Grafana dashboards in ``dashboards/`` only query metrics the code defines.

Checks every PromQL expression of every panel against
:data:`elasticmoe.serve.metrics.METRICS` and against the labels that
``metrics.py`` gives each metric (read from its source with :mod:`ast`), and
checks that the committed JSON is what ``python tools/dashboards.py``
writes.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from elasticmoe.serve import metrics as metrics_mod
from elasticmoe.serve.metrics import METRICS, ClusterCollector, RequestMetrics

# tools/ holds build-time code; it is not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import dashboards as dash

REGENERATE = "run `python tools/dashboards.py` and commit the result"

# Constructor -> metric type, for prometheus_client's metric classes and families.
_CONSTRUCTORS = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
    "CounterMetricFamily": "counter",
    "GaugeMetricFamily": "gauge",
    "HistogramMetricFamily": "histogram",
    "SummaryMetricFamily": "summary",
}
# Where each constructor takes its label names positionally (and by keyword).
_LABEL_ARG = {
    "Counter": (2, "labelnames"),
    "Gauge": (2, "labelnames"),
    "Histogram": (2, "labelnames"),
    "Summary": (2, "labelnames"),
    "CounterMetricFamily": (3, "labels"),
    "GaugeMetricFamily": (3, "labels"),
    "HistogramMetricFamily": (4, "labels"),
    "SummaryMetricFamily": (4, "labels"),
}
# Series suffixes each type exposes (a gauge exposes its bare name).
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}
_RANGE_FUNCTIONS = ("rate", "irate", "increase")
_GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_MATCHER_RE = re.compile(r"(elasticmoe_[A-Za-z0-9_:]*)\s*\{([^{}]*)\}")
_MATCHER_LABEL_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_LEGEND_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


# ----------------------------------------------------------------- helpers
def _constructor_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _string_list(node: ast.expr) -> list[str]:
    assert isinstance(node, ast.List | ast.Tuple), (
        f"labels are not a literal list: {ast.dump(node)}"
    )
    out = []
    for elt in node.elts:
        assert isinstance(elt, ast.Constant) and isinstance(elt.value, str), ast.dump(elt)
        out.append(elt.value)
    return out


def defined_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Base name -> (type, label names) of every metric constructed in metrics.py."""
    tree = ast.parse(Path(metrics_mod.__file__).read_text(encoding="utf-8"))
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        ctor = _constructor_name(node.func)
        if ctor not in _CONSTRUCTORS:
            continue
        first = node.args[0] if node.args else None
        assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
            f"{ctor}(...) at metrics.py:{node.lineno} has no literal name"
        )
        name = first.value.removesuffix("_total") if "Counter" in ctor else first.value
        position, keyword = _LABEL_ARG[ctor]
        labels: list[str] = []
        if len(node.args) > position:
            labels = _string_list(node.args[position])
        for kw in node.keywords:
            if kw.arg == keyword and not (
                isinstance(kw.value, ast.Constant) and kw.value.value is None
            ):
                labels = _string_list(kw.value)
        assert name not in found, f"{name} is constructed twice in metrics.py"
        found[name] = (_CONSTRUCTORS[ctor], frozenset(labels))
    return found


DEFINED = defined_metrics()
BUILT = dash.build_dashboards()
EXPRS = [
    (file, panel["title"], expr) for file, d in BUILT.items() for panel, expr in dash.iter_exprs(d)
]
EXPR_IDS = [f"{f}:{t}:{i}" for i, (f, t, _) in enumerate(EXPRS)]


def _spans(expr: str, function: str) -> list[tuple[int, int]]:
    """``(start, end)`` of the argument text of every call of ``function`` in ``expr``."""
    spans = []
    for m in re.finditer(rf"(?<![A-Za-z0-9_]){function}\s*\(", expr):
        depth, i = 1, m.end()
        while depth:
            assert i < len(expr), f"unbalanced parentheses in {expr!r}"
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        spans.append((m.end(), i - 1))
    return spans


def _occurrences(expr: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group(0)) for m in dash.METRIC_RE.finditer(expr)]


def _inside(pos: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= pos < end for start, end in spans)


def _series_labels(exposed: str) -> frozenset[str]:
    kind, labels = DEFINED[dash.base_name(exposed)]
    return labels | {"le"} if kind == "histogram" and exposed.endswith("_bucket") else labels


# ------------------------------------------------------ metrics.py itself
def test_metrics_source_matches_metrics_dict() -> None:
    """The metrics parsed from metrics.py are exactly METRICS, with the same types."""
    assert {n: t for n, (t, _) in DEFINED.items()} == METRICS


# -------------------------------------------------------- queried metrics
def test_queried_metrics_strips_exposition_suffixes() -> None:
    expr = (
        "rate(elasticmoe_a_total[5m]) + elasticmoe_b_bucket + elasticmoe_c_sum"
        " / elasticmoe_d_count + elasticmoe_e_created + elasticmoe_f"
    )
    d = {"panels": [{"type": "row", "panels": [{"targets": [{"expr": expr}]}]}]}
    assert dash.queried_metrics(d) == {f"elasticmoe_{c}" for c in "abcdef"}


@pytest.mark.parametrize("file", sorted(BUILT))
def test_every_queried_metric_is_defined(file: str) -> None:
    queried = dash.queried_metrics(BUILT[file])
    assert queried, f"{file} queries no elasticmoe metric"
    unknown = queried - METRICS.keys()
    assert not unknown, f"{file} queries metrics the code does not define: {sorted(unknown)}"


def test_every_metric_is_shown() -> None:
    shown = set().union(*(dash.queried_metrics(d) for d in BUILT.values()))
    missing = METRICS.keys() - shown
    assert not missing, f"no dashboard panel shows {sorted(missing)}"


@pytest.mark.parametrize(("file", "title", "expr"), EXPRS, ids=EXPR_IDS)
def test_series_suffix_matches_metric_type(file: str, title: str, expr: str) -> None:
    """Counters are queried as ``_total``, histograms as buckets/sum/count, gauges bare."""
    for _, exposed in _occurrences(expr):
        base = dash.base_name(exposed)
        kind = METRICS[base]
        suffix = exposed[len(base) :]
        assert suffix in _SUFFIXES[kind], (
            f"{title!r}: {exposed} is not a series a {kind} named {base} exposes"
        )


@pytest.mark.parametrize(("file", "title", "expr"), EXPRS, ids=EXPR_IDS)
def test_histogram_quantile_uses_histogram_buckets(file: str, title: str, expr: str) -> None:
    spans = _spans(expr, "histogram_quantile")
    for start, end in spans:
        arg = expr[start:end]
        names = dash.exposed_names(arg)
        assert names, f"{title!r}: histogram_quantile over no metric"
        for name in names:
            assert name.endswith("_bucket") and METRICS[dash.base_name(name)] == "histogram", (
                f"{title!r}: histogram_quantile over {name}, not a histogram's buckets"
            )
        grouped = {
            label.strip()
            for kw, labels in _GROUPING_RE.findall(arg)
            if kw == "by"
            for label in labels.split(",")
        }
        assert "le" in grouped, f"{title!r}: histogram_quantile must keep `le`: {arg}"
    for pos, name in _occurrences(expr):
        if name.endswith("_bucket"):
            assert _inside(pos, spans), f"{title!r}: {name} outside histogram_quantile"


@pytest.mark.parametrize(("file", "title", "expr"), EXPRS, ids=EXPR_IDS)
def test_rate_only_on_counters_and_histograms(file: str, title: str, expr: str) -> None:
    """rate/irate/increase take counters or histogram series; those appear nowhere else."""
    spans = [s for fn in _RANGE_FUNCTIONS for s in _spans(expr, fn)]
    for pos, name in _occurrences(expr):
        kind = METRICS[dash.base_name(name)]
        if _inside(pos, spans):
            assert kind in ("counter", "histogram"), (
                f"{title!r}: rate/increase of the {kind} {name} (use deriv/delta for gauges)"
            )
        else:
            assert kind == "gauge", f"{title!r}: the {kind} {name} is used without rate/increase"


@pytest.mark.parametrize(("file", "title", "expr"), EXPRS, ids=EXPR_IDS)
def test_labels_exist_on_queried_metrics(file: str, title: str, expr: str) -> None:
    """Labels in by/without/on/ignoring/group_* exist on every metric of the expression;
    label matchers exist on their metric."""
    names = dash.exposed_names(expr)
    for kw, labels in _GROUPING_RE.findall(expr):
        for label in filter(None, (x.strip() for x in labels.split(","))):
            for name in names:
                assert label in _series_labels(name), (
                    f"{title!r}: `{kw} ({labels})` uses {label!r}, which {name} does not have "
                    f"(it has {sorted(_series_labels(name))})"
                )
    for name, matchers in _MATCHER_RE.findall(expr):
        for label in _MATCHER_LABEL_RE.findall(matchers):
            assert label in _series_labels(name), f"{title!r}: {name} has no label {label!r}"


def test_legends_use_existing_labels() -> None:
    for file, d in BUILT.items():
        for panel in dash.iter_panels(d):
            for target in panel.get("targets", []):
                names = dash.exposed_names(target["expr"])
                for label in _LEGEND_RE.findall(target["legendFormat"]):
                    assert all(label in _series_labels(n) for n in names), (
                        f"{file} {panel['title']!r}: legend uses {label!r}, not a label of {names}"
                    )


def test_queried_series_are_exposed_by_the_code() -> None:
    """Every series the dashboards query appears, with the labels they use, in a scrape."""
    registry = CollectorRegistry()
    request_metrics = RequestMetrics(registry)
    request_metrics.requests.labels("/v1/completions", "200").inc()
    request_metrics.ttft.observe(0.1)
    engine = {
        "engine_id": "engine-0",
        "num_running": 1,
        "num_waiting": 2,
        "kv_usage": 0.5,
        "prefix_cache_hit_rate": 0.25,
        "num_preemptions": 3,
        "failed_calls": 1,
        "dispatch_seconds": {1: 0.5},
        "dispatch_calls": {1: 10},
        "moe_layers": [1],
        "expert_load": [[5, 7]],
    }
    status = {
        "epoch": 4,
        "replicas": {"1:0": ["w0", "w1"], "1:1": ["w1"]},
        "workers": [
            {"worker_id": "w0", "pool": "gpu", "healthy": True, "load": 5.0, "num_replicas": 1},
            {"worker_id": "w1", "pool": None, "healthy": False, "load": 9.0, "num_replicas": 2},
        ],
        "operations": [{"kind": "replicate", "result": "done", "count": 2, "seconds": 1.5}],
    }
    registry.register(ClusterCollector(lambda: [engine], lambda: status))
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    for file, d in BUILT.items():
        for panel, expr in dash.iter_exprs(d):
            for name in dash.exposed_names(expr):
                assert name in exposed, f"{file} {panel['title']!r}: no series {name} in a scrape"
                assert _series_labels(name) <= exposed[name] | {"le"}, (name, exposed[name])


# ---------------------------------------------------------- the JSON files
def test_committed_dashboards_are_fresh() -> None:
    committed = {p.name for p in dash.DASHBOARD_DIR.glob("*.json")}
    assert committed == set(BUILT), f"dashboards/ holds other JSON files; {REGENERATE}"
    for name, d in BUILT.items():
        path = dash.DASHBOARD_DIR / name
        assert path.read_bytes() == dash.render(d).encode("utf-8"), (
            f"dashboards/{name} is stale; {REGENERATE}"
        )
    assert dash.stale_dashboards() == []
    assert dash.main(["--check"]) == 0


def test_write_dashboards_is_deterministic(tmp_path: Path) -> None:
    written = dash.write_dashboards(tmp_path)
    assert sorted(p.name for p in written) == sorted(BUILT)
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert text.endswith("}\n") and not text.endswith("\n\n")
        assert (
            text == dash.render(BUILT[path.name]) == dash.render(dash.build_dashboards()[path.name])
        )
        assert (dash.DASHBOARD_DIR / path.name).read_bytes() == path.read_bytes()


def _rects_overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


@pytest.mark.parametrize("file", sorted(BUILT))
def test_dashboard_structure(file: str) -> None:
    d: dict[str, Any] = json.loads((dash.DASHBOARD_DIR / file).read_text(encoding="utf-8"))
    assert d["uid"] == f"elasticmoe-{Path(file).stem}" and len(d["uid"]) <= 40
    assert d["schemaVersion"] == dash.SCHEMA_VERSION
    assert "elasticmoe" in d["tags"]
    assert d["title"] and d["description"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    panels = list(dash.iter_panels(d))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    titles = [p["title"] for p in panels if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles repeat"
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= dash.GRID_WIDTH, p["title"]
        if p["type"] == "row":
            continue
        assert p["description"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["fieldConfig"]["defaults"]["unit"], f"{p['title']!r} has no unit"
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
            expr = t["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
            assert expr.count("[") == expr.count("]") and expr.count('"') % 2 == 0, expr
    for i, a in enumerate(panels):
        for b in panels[i + 1 :]:
            assert not _rects_overlap(a["gridPos"], b["gridPos"]), (a["title"], b["title"])


def test_uids_are_unique() -> None:
    uids = [d["uid"] for d in BUILT.values()]
    assert len(uids) == len(set(uids))
