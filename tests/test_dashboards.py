"""The Grafana dashboards (dashboards/*.json) and their provisioning, checked without Grafana.

Every query is parsed (tests/dashboard_queries.py) against SPEC §6, encoded below:
metric names as prometheus-client exposes them, label names per metric, and the
label values the SPEC fixes.  A query that names a label its metric lacks, or
divides series that can never match, returns nothing in Grafana: here it fails.
Whether each query returns data from a real meter is the job of a test with
Prometheus; this file stays offline.
"""

from __future__ import annotations

import itertools
import json
import re
import types
from pathlib import Path
from typing import Any

import pytest

from .dashboard_queries import (
    PromQLError,
    all_values,
    analyse,
    iter_panels,
    load_dashboards,
    panel_queries,
    substitute,
    variables,
)

yaml = pytest.importorskip("yaml", reason="PyYAML (the `pyyaml` test extra) reads the provisioning files")

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
PROVISIONING = DASHBOARDS / "provisioning"
GRAFANA_DASHBOARDS = "/var/lib/grafana/dashboards"  # where deploy/compose.yaml mounts dashboards/

# SPEC §6 ------------------------------------------------------------------------------------------
SPEC_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "meter_requests_total": ("counter", frozenset({"endpoint", "model", "service_tier", "status_code", "outcome", "key"})),
    "meter_tokens_total": ("counter", frozenset({"endpoint", "model", "service_tier", "key", "type"})),
    "meter_web_search_calls_total": ("counter", frozenset({"model", "key"})),
    "meter_prompt_cache_misses_total": ("counter", frozenset({"model", "reason"})),
    "meter_usage_anomalies_total": ("counter", frozenset({"endpoint", "kind"})),
    "meter_websocket_connections": ("gauge", frozenset()),
    "meter_cost_usd_total": ("counter", frozenset({"model", "service_tier", "key"})),
    "meter_request_duration_seconds": ("histogram", frozenset({"endpoint", "model", "stream"})),
    "meter_time_to_first_token_seconds": ("histogram", frozenset({"endpoint", "model"})),
    "meter_upstream_ttfb_seconds": ("histogram", frozenset({"endpoint", "model"})),
    "meter_in_flight_requests": ("gauge", frozenset({"endpoint"})),
    "meter_unpriced_requests_total": ("counter", frozenset({"model"})),
    "meter_ledger_pending_records": ("gauge", frozenset()),
    "meter_ledger_spooled_records": ("gauge", frozenset()),
    "meter_ledger_written_records_total": ("counter", frozenset()),
    "meter_ledger_write_errors_total": ("counter", frozenset()),
    "meter_ledger_rejected_records_total": ("counter", frozenset()),
    "meter_ledger_dropped_records_total": ("counter", frozenset()),
    "meter_unmetered_requests_total": ("counter", frozenset({"endpoint", "reason"})),
    "meter_values_truncated_total": ("counter", frozenset({"field"})),
    "meter_budget_spend_usd": ("gauge", frozenset({"budget"})),
    "meter_budget_limit_usd": ("gauge", frozenset({"budget"})),
    "meter_budget_rejections_total": ("counter", frozenset({"budget"})),
    "meter_alerts_sent_total": ("counter", frozenset({"budget"})),
    "meter_alert_failures_total": ("counter", frozenset({"budget"})),
}
# The proxy process's own families beside them (prometheus-client's process and GC
# collectors, meter/metrics.py): for on-call, not for the dashboards' queries.
RUNTIME_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    **{name: ("gauge", frozenset()) for name in (
        "process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds", "process_open_fds", "process_max_fds",
    )},
    "process_cpu_seconds_total": ("counter", frozenset()),
    **{name: ("counter", frozenset({"generation"})) for name in (
        "python_gc_objects_collected_total", "python_gc_objects_uncollectable_total", "python_gc_collections_total",
    )},
}
# Gauges every replica reports alike (a budget's spend is the fleet's, from the one ledger):
# a query takes their max over replicas, since a sum would count the spend once per replica.
FLEET_GAUGES = frozenset({"meter_budget_spend_usd", "meter_budget_limit_usd"})

# Label values the SPEC fixes (§3, §4, §6); a matcher on these labels must use them.
ENDPOINTS = frozenset(
    {
        "responses",
        "responses.retrieve",
        "responses.compact",
        "responses.input_tokens",
        "responses.cancel",
        "responses.delete",
        "chat.completions",
        "embeddings",
        "other",
        "",
    }
)
SPEC_VALUES: dict[str, frozenset[str]] = {
    "type": frozenset({"input", "cached", "cache_write", "output", "reasoning"}),
    "outcome": frozenset(
        {
            "completed",
            "in_progress",
            "incomplete",
            "failed",
            "error",
            "upstream_unreachable",
            "upstream_timeout",
            "client_disconnected",
            "rejected",
            "",
        }
    ),
    "endpoint": ENDPOINTS,
    "stream": frozenset({"true", "false"}),
}


# `--metrics-tag-labels team` adds `tag_team` to these families (SPEC §6); the dashboards'
# "by tag" panels group by the tag label chosen in their `tag` variable, checked with this one.
TAGGED_METRICS = ("meter_requests_total", "meter_tokens_total", "meter_cost_usd_total")
SAMPLE_TAG = "team"
SAMPLE_TAG_LABEL = "tag_team"


def exposed_series() -> dict[str, frozenset[str]]:
    """Series names prometheus-client exposes for the SPEC's metrics, with their labels
    (the tagged families with the sample tag label, as `--metrics-tag-labels team` makes them)."""
    series: dict[str, frozenset[str]] = {}
    for name, (kind, labels) in SPEC_METRICS.items():
        if name in TAGGED_METRICS:
            labels = labels | {SAMPLE_TAG_LABEL}
        if kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
        else:
            series[name] = labels
    return series


SERIES = exposed_series()
COUNTER_SERIES = {n for n, (k, _) in SPEC_METRICS.items() if k == "counter"} | {
    f"{n}_{s}" for n, (k, _) in SPEC_METRICS.items() if k == "histogram" for s in ("bucket", "sum", "count")
}
DASHBOARD_VARIABLES = ("endpoint", "model", "key")
PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "table"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Variables substituted with themselves, so a parsed matcher shows which variable it uses.
# `tag` names a label (it is used in `by (...)`), so it gets the sample tag label.
MARKERS = {"endpoint": "$endpoint", "model": "$model", "key": "$key", "tag": SAMPLE_TAG_LABEL, "datasource": "prometheus"}


def boards() -> list[dict[str, Any]]:
    return load_dashboards(DASHBOARDS)


def board_ids() -> list[str]:
    return [p.name for p in sorted(DASHBOARDS.glob("*.json"))]


def main_board() -> dict[str, Any]:
    (board,) = [b for b in boards() if b.get("uid") == "meter-overview"]
    return board


def queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every query of every dashboard."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        out += [(path.name, title, expr) for title, expr in panel_queries(board)]
    return out


def marked(expr: str) -> str:
    return substitute(expr, MARKERS, rate_interval="1m", time_range="1h")


def leaf_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in iter_panels(board) if p.get("type") != "row"]


# the dashboard files -----------------------------------------------------------------------------


def test_dashboards_directory_holds_the_overview() -> None:
    assert board_ids(), "dashboards/ holds at least one dashboard"
    board = main_board()
    assert board["title"] == "meter"
    assert board_ids() == ["meter.json"] or (DASHBOARDS / "meter.json").is_file()
    assert json.loads((DASHBOARDS / "meter.json").read_text())["uid"] == "meter-overview"


@pytest.mark.parametrize("name", board_ids())
def test_dashboard_is_current_grafana_schema(name: str) -> None:
    board = json.loads((DASHBOARDS / name).read_text())
    assert isinstance(board.get("schemaVersion"), int) and board["schemaVersion"] >= 39, "schemaVersion 39+ (Grafana 11)"
    assert board.get("uid") and len(board["uid"]) <= 40, "a stable uid (Grafana allows 40 characters)"
    assert "id" not in board or board["id"] is None, "no database id in a provisioned dashboard"
    assert isinstance(board.get("panels"), list) and board["panels"]
    for panel in iter_panels(board):
        assert panel.get("type") in PANEL_TYPES, f"panel {panel.get('title')!r} is a {panel.get('type')!r} (no legacy graph/singlestat)"
        assert panel.get("title"), f"panel {panel.get('id')} has a title"


@pytest.mark.parametrize("name", board_ids())
def test_panel_ids_and_titles_are_unique(name: str) -> None:
    board = json.loads((DASHBOARDS / name).read_text())
    ids = [p.get("id") for p in iter_panels(board)]
    assert all(isinstance(i, int) for i in ids), ids
    dupes = sorted(i for i in set(ids) if ids.count(i) > 1)
    assert not dupes, f"duplicate panel ids {dupes}"
    titles = [p["title"] for p in leaf_panels(board)]
    dupes_t = sorted(t for t in set(titles) if titles.count(t) > 1)
    assert not dupes_t, f"duplicate panel titles {dupes_t} (test failures name panels by title)"


@pytest.mark.parametrize("name", board_ids())
def test_panels_fit_the_grid_without_overlapping(name: str) -> None:
    board = json.loads((DASHBOARDS / name).read_text())
    boxes = []
    for panel in iter_panels(board):
        pos = panel.get("gridPos") or {}
        assert {"h", "w", "x", "y"} <= pos.keys(), f"{panel['title']!r} has a gridPos"
        assert pos["x"] >= 0 and pos["y"] >= 0 and pos["w"] > 0 and pos["h"] > 0
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']!r} is wider than the 24-column grid"
        boxes.append((panel["title"], pos))
    for (a, p), (b, q) in itertools.combinations(boxes, 2):
        overlap = p["x"] < q["x"] + q["w"] and q["x"] < p["x"] + p["w"] and p["y"] < q["y"] + q["h"] and q["y"] < p["y"] + p["h"]
        assert not overlap, f"{a!r} and {b!r} overlap"


@pytest.mark.parametrize("name", board_ids())
def test_every_panel_and_target_uses_the_datasource_variable(name: str) -> None:
    board = json.loads((DASHBOARDS / name).read_text())
    for panel in leaf_panels(board):
        assert panel.get("datasource") == DATASOURCE, f"{panel['title']!r}: datasource {panel.get('datasource')!r}"
        targets = panel.get("targets") or []
        assert targets, f"{panel['title']!r} has queries"
        refs = [t.get("refId") for t in targets]
        assert len(set(refs)) == len(refs) and all(refs), f"{panel['title']!r}: refIds {refs}"
        for target in targets:
            assert target.get("datasource") == DATASOURCE, (
                f"{panel['title']!r} {target.get('refId')}: datasource {target.get('datasource')!r}"
            )
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), f"{panel['title']!r} {target.get('refId')} has an expr"
            if panel["type"] == "table":
                assert target.get("format") == "table" and target.get("instant"), f"{panel['title']!r}: tables take instant table queries"


def test_template_variables() -> None:
    board = main_board()
    by_name = {v["name"]: v for v in variables(board)}
    assert {"datasource", "model", "key"} <= by_name.keys()
    ds = by_name["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in [n for n in ("endpoint", "model", "key") if n in by_name]:
        var = by_name[name]
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert var["type"] == "query"
        assert re.fullmatch(rf"label_values\(\s*meter_requests_total\s*,\s*{name}\s*\)", query), query
        assert var.get("definition", query) == query
        assert var["datasource"] == DATASOURCE
        assert var["multi"] is True and var["includeAll"] is True and var["allValue"] == ".*"
        assert var.get("refresh") in (1, 2), "values are refreshed on load or on time range change"
    # `tag`: one of the tag labels meter exposes (label_names of a tagged family, tag_ only), one at a time
    tag = by_name["tag"]
    query = tag["query"]["query"] if isinstance(tag["query"], dict) else tag["query"]
    assert tag["type"] == "query" and tag["datasource"] == DATASOURCE
    assert query == tag.get("definition", query) == "label_names(meter_cost_usd_total)"
    assert tag["query"]["qryType"] == 0 and tag["query"]["match"] == "meter_cost_usd_total", "Grafana's label names query, matched on the metric"
    regex = re.compile(tag["regex"].strip("/"))
    assert regex.fullmatch(SAMPLE_TAG_LABEL) and not any(regex.fullmatch(label) for label in SPEC_METRICS["meter_cost_usd_total"][1])
    assert tag["multi"] is False and tag["includeAll"] is False, "a `by (...)` takes one label name"
    assert tag.get("refresh") in (1, 2)
    # variables are declared before use: datasource first
    assert variables(board)[0]["name"] == "datasource"
    # nothing references a variable the dashboard does not declare
    declared = {n: ".*" for n in by_name}
    for _, _title, expr in queries():
        substitute(expr, declared)  # raises KeyError on an undeclared $var


# the queries -------------------------------------------------------------------------------------


def test_there_are_queries() -> None:
    assert len(queries()) >= 20


@pytest.mark.parametrize(("board", "title", "expr"), queries(), ids=[f"{b}:{t}" for b, t, _ in queries()])
def test_query_uses_only_spec_metrics_and_labels(board: str, title: str, expr: str) -> None:
    try:
        analysis = analyse(marked(expr), SERIES)
    except PromQLError as exc:
        pytest.fail(f"{title!r}: {exc}")
    assert not analysis.problems, f"{title!r}: {expr}\n" + "\n".join(analysis.problems)
    assert analysis.selectors, f"{title!r} queries a metric"
    assert analysis.labels is not None, f"{title!r} returns a vector, not a bare scalar"
    for sel in analysis.selectors:
        assert sel.metric in SERIES, f"{title!r}: {sel.metric} is not a SPEC §6 series"


@pytest.mark.parametrize(("board", "title", "expr"), queries(), ids=[f"{b}:{t}" for b, t, _ in queries()])
def test_query_label_values_are_spec_values(board: str, title: str, expr: str) -> None:
    for sel in analyse(marked(expr), SERIES).selectors:
        for label, op, value in sel.matchers:
            if label not in SPEC_VALUES or value.startswith("$"):
                continue
            if op in ("=", "!="):
                values = [value]
            elif re.fullmatch(r"[\w.]+(\|[\w.]+)*", value):  # a plain alternation a|b|c
                values = value.split("|")
            else:
                continue
            unknown = [v for v in values if v not in SPEC_VALUES[label]]
            assert not unknown, f"{title!r}: {sel.metric}{{{label}{op}{value!r}}}: {unknown} is not a SPEC value of {label}"


@pytest.mark.parametrize(("board", "title", "expr"), queries(), ids=[f"{b}:{t}" for b, t, _ in queries()])
def test_query_filters_by_every_dashboard_variable_its_metric_has(board: str, title: str, expr: str) -> None:
    for sel in analyse(marked(expr), SERIES).selectors:
        labels = SERIES.get(sel.metric or "", frozenset())
        for var in DASHBOARD_VARIABLES:
            uses = [(op, v) for lbl, op, v in sel.matchers if lbl == var]
            if var in labels:
                assert ("=~", f"${var}") in uses, f'{title!r}: {sel.metric} has {var}, so it filters {var}=~"${var}"'
            for op, value in uses:
                assert value != f"${var}" or op == "=~", f"{title!r}: ${var} is a multi-value regex, use =~"


@pytest.mark.parametrize(("board", "title", "expr"), queries(), ids=[f"{b}:{t}" for b, t, _ in queries()])
def test_query_rates_counters_over_grafana_windows(board: str, title: str, expr: str) -> None:
    windows = re.findall(r"\[([^\]]*)\]", expr)
    for window in windows:
        assert window in ("$__rate_interval", "$__range", "$__interval"), (
            f"{title!r}: window [{window}]; use [$__rate_interval] (or [$__range] for a whole-range total)"
        )
    for sel in analyse(marked(expr), SERIES).selectors:
        if sel.metric in COUNTER_SERIES:
            assert sel.range, f"{title!r}: the counter {sel.metric} is only meaningful through rate()/increase()"
        else:
            assert not sel.range, f"{title!r}: the gauge {sel.metric} is not rated"
    assert "irate(" not in expr, f"{title!r}: irate() skips samples; use rate()"


@pytest.mark.parametrize(("board", "title", "expr"), queries(), ids=[f"{b}:{t}" for b, t, _ in queries()])
def test_query_aggregates_across_replicas(board: str, title: str, expr: str) -> None:
    """Every query aggregates (sum ... / histogram_quantile(sum by (le...))) so several replicas add up;
    the fleet's own gauges (budget spend and limit) take the max over replicas instead."""
    stripped = marked(expr).strip()
    metrics = analyse(stripped, SERIES).metrics
    if metrics and metrics <= FLEET_GAUGES:
        assert re.match(r"^\(?\s*max\b", stripped) and not re.search(r"\bsum\b", stripped), (
            f"{title!r}: every replica reports the same {sorted(metrics)}: take the max over replicas, never the sum: {expr}"
        )
        return
    assert not metrics & FLEET_GAUGES, f"{title!r}: {sorted(metrics & FLEET_GAUGES)} mixed with per-replica counts"
    assert re.match(r"^\(?\s*(sum\b|histogram_quantile\(\s*[\d.]+\s*,\s*sum\b)", stripped), (
        f"{title!r} starts with an aggregation over replicas (instance labels): {expr}"
    )


def test_ratio_panels_guard_division_by_zero() -> None:
    for _, title, expr in queries():
        for denominator in re.split(r"(?<![<>=!])/(?!/)", expr)[1:]:
            assert denominator.lstrip().startswith("clamp_min(") or "> 0" in denominator, (
                f"{title!r}: a denominator that can be 0 turns into NaN/Inf; wrap it in clamp_min(..., 1e-9)"
            )


# SPEC §9 topics ----------------------------------------------------------------------------------


def _has(expr: str, metric: str, by: str | None = None, matchers: tuple[tuple[str, str], ...] = ()) -> bool:
    analysis = analyse(marked(expr), SERIES)
    sels = [s for s in analysis.selectors if s.metric == metric]
    if not sels:
        return False
    if by is not None and not re.search(rf"\bby\s*\(([^)]*\b{by}\b[^)]*)\)", expr):
        return False
    for label, value in matchers:
        if not any((label, value) == (lbl, v) for s in analysis.selectors for lbl, _, v in s.matchers):
            return False
    return True


def _quantiles(panel_exprs: list[str], metric: str, qs: tuple[str, ...]) -> bool:
    found = {q for e in panel_exprs for q in qs if re.search(rf"histogram_quantile\(\s*{re.escape(q)}\s*,", e) and f"{metric}_bucket" in e}
    return found == set(qs)


def _ratio(expr: str, part: str, whole: str) -> bool:
    return (
        "/" in expr
        and _has(expr, "meter_tokens_total", matchers=(("type", part),))
        and _has(expr, "meter_tokens_total", matchers=(("type", whole),))
    )


TOPICS: dict[str, Any] = {
    "traffic by endpoint": lambda es: any(_has(e, "meter_requests_total", by="endpoint") and "rate(" in e for e in es),
    "traffic by model": lambda es: any(_has(e, "meter_requests_total", by="model") and "rate(" in e for e in es),
    "errors by outcome": lambda es: any(_has(e, "meter_requests_total", by="outcome") and re.search(r'outcome!(=|~)"', e) for e in es),
    "error ratio": lambda es: any(_has(e, "meter_requests_total") and re.search(r'outcome!(=|~)"', e) and "/" in e for e in es),
    "errors by status code": lambda es: any(_has(e, "meter_requests_total", by="status_code") for e in es),
    "latency p50/p90/p99": lambda es: _quantiles(es, "meter_request_duration_seconds", ("0.5", "0.9", "0.99")),
    "time to first token p50/p99": lambda es: _quantiles(es, "meter_time_to_first_token_seconds", ("0.5", "0.99")),
    "upstream ttfb p50/p99": lambda es: _quantiles(es, "meter_upstream_ttfb_seconds", ("0.5", "0.99")),
    "in-flight requests": lambda es: any(_has(e, "meter_in_flight_requests") for e in es),
    "tokens by type": lambda es: any(_has(e, "meter_tokens_total", by="type") for e in es),
    "cost by key": lambda es: any(_has(e, "meter_cost_usd_total", by="key") for e in es),
    "cost by model": lambda es: any(_has(e, "meter_cost_usd_total", by="model") for e in es),
    "cost by tag": lambda es: any(_has(e, "meter_cost_usd_total") and re.search(r"\bby\s*\(\s*\$\{?tag\}?\s*\)", e) for e in es),
    "requests by tag": lambda es: any(_has(e, "meter_requests_total") and re.search(r"\bby\s*\(\s*\$\{?tag\}?\s*\)", e) for e in es),
    "cache hit ratio": lambda es: any(_ratio(e, "cached", "input") for e in es),
    "prompt cache misses by reason": lambda es: any(_has(e, "meter_prompt_cache_misses_total", by="reason") for e in es),
    "reasoning share": lambda es: any(_ratio(e, "reasoning", "output") for e in es),
    "tier mix": lambda es: any(_has(e, "meter_requests_total", by="service_tier") for e in es),
    "web search calls": lambda es: any(_has(e, "meter_web_search_calls_total") for e in es),
    "unpriced requests": lambda es: any(_has(e, "meter_unpriced_requests_total") for e in es),
    "usage anomalies": lambda es: any(_has(e, "meter_usage_anomalies_total", by="kind") for e in es),
    "websocket connections": lambda es: any(_has(e, "meter_websocket_connections") for e in es),
    "ledger pending": lambda es: any(_has(e, "meter_ledger_pending_records") for e in es),
    "ledger writes": lambda es: any(_has(e, "meter_ledger_written_records_total") for e in es),
    "ledger write errors": lambda es: any(_has(e, "meter_ledger_write_errors_total") for e in es),
    "budget spend against limit": lambda es: any(
        _has(e, "meter_budget_spend_usd", by="budget") and _has(e, "meter_budget_limit_usd", by="budget") and "/" in e for e in es
    ),
    "budget spend and limit in dollars": lambda es: (
        any(_has(e, "meter_budget_spend_usd", by="budget") and "/" not in e for e in es)
        and any(_has(e, "meter_budget_limit_usd", by="budget") and "/" not in e for e in es)
    ),
    "budget refusals": lambda es: any(_has(e, "meter_budget_rejections_total", by="budget") for e in es),
    "budget alerts sent and failed": lambda es: (
        any(_has(e, "meter_alerts_sent_total", by="budget") for e in es) and any(_has(e, "meter_alert_failures_total", by="budget") for e in es)
    ),
}


@pytest.mark.parametrize("topic", sorted(TOPICS))
def test_every_spec_topic_has_a_panel(topic: str) -> None:
    board = main_board()
    panels = {}
    for title, expr in panel_queries(board):
        panels.setdefault(title, []).append(expr)
    assert any(TOPICS[topic](exprs) for exprs in panels.values()), f"no panel of dashboards/meter.json shows {topic}"


def test_every_spec_metric_is_charted() -> None:
    used = set()
    for _, _, expr in queries():
        used |= analyse(marked(expr), SERIES).metrics
    for name, (kind, _) in SPEC_METRICS.items():
        forms = {f"{name}_bucket"} if kind == "histogram" else {name}
        assert forms & used, f"no dashboard query uses {name}"


def test_spec_table_matches_the_code() -> None:
    """The dict above is SPEC §6; meter/metrics.py must expose the same families and labels."""
    from meter import metrics
    from meter.budgets.alerts import AlertMetrics
    from meter.budgets.metrics import BudgetMetrics
    from meter.budgets.spend import Budgets
    from meter.config import Budget

    ledger = types.SimpleNamespace(pending=0, stats=types.SimpleNamespace(written=0, write_errors=0))
    m = metrics.Metrics(types.SimpleNamespace())
    m.register(metrics.LedgerMetrics(ledger))
    # The server registers the budget collectors beside them; one budget and one alert give them series.
    m.registry.register(BudgetMetrics(Budgets([Budget(name="b", window="day", limit_usd=1)], {})))
    m.registry.register(AlertMetrics(types.SimpleNamespace(sent={"b": 1}, failures={"b": 1})))
    # label names of the client's metric objects (prometheus-client keeps them in `_labelnames`),
    # else of the samples a collector gives
    labelled = {getattr(c, "_name", None): tuple(getattr(c, "_labelnames", ())) for c in vars(m).values() if hasattr(c, "_labelnames")}
    exposed: dict[str, tuple[str, frozenset[str]]] = {}
    for family in m.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        sampled = frozenset(label for sample in family.samples for label in sample.labels)
        exposed[name] = (family.type, frozenset(labelled.get(family.name, ())) or sampled)
    assert set(exposed) == set(SPEC_METRICS) | set(RUNTIME_METRICS)
    for name, spec in {**SPEC_METRICS, **RUNTIME_METRICS}.items():
        assert exposed[name] == spec, name
    # With a tag chosen, the tagged families (and only they) gain its label.
    tagged = metrics.Metrics(types.SimpleNamespace(metrics_tag_labels=(SAMPLE_TAG,)))
    with_tag = set()
    for c in vars(tagged).values():
        if SAMPLE_TAG_LABEL in getattr(c, "_labelnames", ()):
            with_tag.add(c._name + "_total")
    assert with_tag == set(TAGGED_METRICS)


# provisioning ------------------------------------------------------------------------------------


def _yaml_files(sub: str) -> list[Path]:
    return sorted((PROVISIONING / sub).glob("*.y*ml"))


def test_dashboard_provider_reads_the_mounted_directory() -> None:
    files = _yaml_files("dashboards")
    assert files, "dashboards/provisioning/dashboards/ declares a provider"
    providers = []
    for f in files:
        doc = yaml.safe_load(f.read_text())
        assert doc.get("apiVersion") == 1, f.name
        providers += doc.get("providers") or []
    assert providers
    for provider in providers:
        assert provider.get("type", "file") == "file"
        assert provider.get("name")
        assert provider["options"]["path"].rstrip("/") == GRAFANA_DASHBOARDS


def test_prometheus_datasource_is_provisioned_as_default() -> None:
    files = _yaml_files("datasources")
    assert files, "dashboards/provisioning/datasources/ declares the data source"
    sources = []
    for f in files:
        doc = yaml.safe_load(f.read_text())
        assert doc.get("apiVersion") == 1, f.name
        sources += doc.get("datasources") or []
    (prom,) = [d for d in sources if d.get("type") == "prometheus"]
    assert prom["uid"] == "prometheus"
    assert prom["url"] == "http://prometheus:9090"
    assert prom["isDefault"] is True
    assert prom.get("access", "proxy") == "proxy", "the browser cannot reach http://prometheus:9090; Grafana's backend can"
    assert sum(1 for d in sources if d.get("isDefault")) == 1


def test_readme_states_the_mounts() -> None:
    text = (DASHBOARDS / "README.md").read_text()
    assert GRAFANA_DASHBOARDS in text and "/etc/grafana/provisioning" in text


def test_provisioning_holds_no_json_the_provider_would_load() -> None:
    """The provider scans /var/lib/grafana/dashboards recursively, provisioning/ included."""
    assert not list(PROVISIONING.rglob("*.json"))


# the helpers -------------------------------------------------------------------------------------


def test_panel_queries_walks_collapsed_rows_and_skips_hidden_targets() -> None:
    board = {
        "panels": [
            {"type": "row", "title": "open", "panels": []},
            {"type": "stat", "title": "a", "targets": [{"refId": "A", "expr": "sum(x)"}, {"refId": "B", "expr": "sum(y)", "hide": True}]},
            {
                "type": "row",
                "title": "collapsed",
                "collapsed": True,
                "panels": [{"type": "timeseries", "title": "b", "targets": [{"refId": "A", "expr": "sum(z)"}, {"refId": "B"}]}],
            },
        ]
    }
    assert panel_queries(board) == [("a", "sum(x)"), ("b", "sum(z)")]


def test_load_dashboards_reads_json_files(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text(json.dumps({"uid": "b", "panels": []}))
    (tmp_path / "a.json").write_text(json.dumps({"uid": "a", "panels": []}))
    (tmp_path / "notes.yaml").write_text("x: 1\n")
    assert [b["uid"] for b in load_dashboards(tmp_path)] == ["a", "b"]


def test_substitute() -> None:
    values = {"model": ["gpt-4.1", "o3"], "key": ".*", "one": ["gpt-5"], "ds": "prometheus"}
    expr = 'rate(x{model=~"$model", key=~"${key}", m2=~"${model:regex}", p="${model:pipe}", o=~"$one"}[$__rate_interval])'
    assert substitute(expr, values) == (
        r'rate(x{model=~"(gpt-4\\.1|o3)", key=~".*", m2=~"(gpt-4\\.1|o3)", p="gpt-4.1|o3", o=~"gpt-5"}[1m])'
    )
    assert substitute("rate(x[$__rate_interval])", {}, rate_interval="2m") == "rate(x[2m])"
    assert substitute("[$__interval] [$__range] $__range_s $__range_ms $__interval_ms", {}, interval="30s", time_range="2h") == (
        "[30s] [2h] 7200 7200000 30000"
    )
    assert substitute("[[key]] $keys", {"key": "a", "keys": "b"}) == "a b"
    assert substitute('label_replace(x, "d", "$1", "s", "(.*)") ${1}', {}) == 'label_replace(x, "d", "$1", "s", "(.*)") ${1}'
    with pytest.raises(KeyError):
        substitute('x{a=~"$nope"}', {})
    assert substitute('x{a=~"$nope"}', {}, strict=False) == 'x{a=~"$nope"}'


def test_all_values_selects_all() -> None:
    values = all_values(main_board())
    assert values["datasource"] == "prometheus"
    assert values["model"] == values["key"] == ".*"


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('sum(rate(meter_requests_total{nope="x"}[1m]))', "no label 'nope'"),
        ("sum by (key) (rate(meter_request_duration_seconds_count[1m]))", "have no ['key']"),
        ("sum by (model) (rate(meter_requests_total[1m])) / sum(rate(meter_requests_total[1m]))", "never meet"),
        ("histogram_quantile(0.5, sum by (model) (rate(meter_upstream_ttfb_seconds_bucket[1m])))", "without 'le'"),
        ("sum(rate(meter_requests[1m]))", "unknown metric meter_requests"),
        ("sum(rate(meter_requests_total))", "needs a range vector"),
        ('sum(meter_requests_total{model=~"("})', "bad regex"),
        (
            "sum by (kind) (rate(meter_usage_anomalies_total[1m])) / on(model) sum by (kind) (rate(meter_usage_anomalies_total[1m]))",
            "has no ['model']",
        ),
    ],
)
def test_analyse_reports_impossible_labels(expr: str, problem: str) -> None:
    problems = analyse(expr, SERIES).problems
    assert any(problem in p for p in problems), problems


def test_analyse_accepts_matching_ratios() -> None:
    ok = [
        'sum by (model) (rate(meter_tokens_total{type="cached"}[1m])) / clamp_min(sum by (model) (rate(meter_tokens_total[1m])), 1e-9)',
        "sum by (outcome) (rate(meter_requests_total[1m])) / ignoring(outcome) group_left() sum(rate(meter_requests_total[1m]))",
        'sum by (outcome) (rate(meter_requests_total[1m])) or on() label_replace(vector(0), "outcome", "none", "", "")',
        "histogram_quantile(0.99, sum by (le, endpoint) (rate(meter_request_duration_seconds_bucket[5m:1m])))",
        "-sum(meter_websocket_connections) ^ 2 > bool 0",
    ]
    for expr in ok:
        assert analyse(expr, SERIES).problems == [], expr
    with pytest.raises(PromQLError):
        analyse("sum(rate(meter_requests_total[1m])", SERIES)
