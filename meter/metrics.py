"""Prometheus metrics (SPEC §6): one update per finished request, served on the admin port.

`Metrics` is an addon.  `request(flow)` raises the in-flight gauge of the flow's
endpoint; `done(flow, record)` lowers it again and counts the record: requests,
tokens by type, cost, web searches, cache misses, anomalies, unpriced and
unmetered requests, and the latency histograms.  Nothing is counted per chunk.
What the ledger writer thread counts (pending, written, refused and truncated
records, numbers past the ledger's types) is read at scrape time.

The metrics live in the addon's own `CollectorRegistry` (never the process-global
one), so several meters in one process (tests) do not share counters, and
`GET /metrics` on the admin port serves exactly the SPEC's families.

Labels stay bounded whatever clients and the upstream send (SPEC §2b):

- A label value that comes from outside (`key`, `model`, `service_tier`, a cache
  miss reason) longer than `MAX_LABEL_CHARS` counts as `other`.
- Each such label has a budget of distinct values; past it, further values count
  as `other`.  A new value is admitted into the budget only from a request the
  upstream answered 2xx (on a WebSocket: a response the upstream created), so
  a client without a valid key, whose requests the upstream refuses, can never
  use it up.  A value once admitted counts as itself for any status; one not
  admitted from a refused request counts as `other`.
- `key` is the key's configured name, else its key_id, else `none`; its budget
  is `metrics_max_keys` (`none` and `other` do not use it up).
  `metrics_key_label = "off"` drops the label from every metric that has it:
  the series carry no `key` at all, and dashboard filters such as `key=~"$key"`
  with `$key = .*` still match them (an absent label matches like the empty string).
- `model` comes from the client when the upstream reports none (an error, say):
  budget `MAX_MODELS`.  `service_tier`: the tiers OpenAI defines always count as
  themselves, plus `MAX_TIERS` others.  The ledger keeps the detail.
- `endpoint` is from the fixed list of SPEC §4; a missing value is `""`.
  Unmetered reasons and the field names of truncated values are meter's own
  words, bounded all the same.

Hot path: `done` runs once per request on the event loop.  The labelled
children of one label combination are resolved once and kept in a `_Series`
bundle keyed by the combination's tuple of label values, so a repeated
combination costs one dict lookup, not a `.labels()` call per metric.  The raw
values of a request are looked up in that same dict: they hit only when each
of them already is its own label, so only requests carrying a value that is
not (yet) a label take the slower path through the budgets, and the dict holds
label values only, never a raw value a client sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .record import Record

log = logging.getLogger("meter")

# From 10 ms (a cached embedding) to ten minutes (a long reasoning stream).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKEN_TYPES = ("input", "cached", "cache_write", "output", "reasoning")
MAX_LABEL_CHARS = 128  # a longer label value from outside counts as `other`
MAX_MODELS = 1000  # distinct `model` label values before further ones count as `other`
MAX_TIERS = 16  # distinct `service_tier` values besides the ones OpenAI defines
KNOWN_TIERS = ("auto", "default", "flex", "scale", "priority")
MAX_CACHE_MISS_REASONS = 100
MAX_UNMETERED_REASONS = 16
MAX_SCRAPED_LABELS = 64  # distinct `field` / `endpoint` values read from the ledger writer's counts
_MAX_CACHED = 20_000  # resolved label combinations kept; past it the cache starts over
OTHER = "other"
NO_KEY = "none"

# `_created` samples double every counter and histogram in Prometheus for no use here.
prometheus_client.disable_created_metrics()


class _Bounded:
    """Maps raw label values to themselves once admitted, else to `other`.

    A value is admitted when `admit` is true (the upstream accepted the request
    it came with), it is at most `MAX_LABEL_CHARS` long, and fewer than `limit`
    values were admitted before.
    """

    __slots__ = ("_fixed", "_limit", "_seen")

    def __init__(self, limit: int, fixed: Iterable[str] = ()) -> None:
        self._seen: set[str] = set()
        self._limit = limit
        self._fixed = frozenset(fixed)  # always themselves, outside the budget

    def __call__(self, value: str, admit: bool = True) -> str:
        seen = self._seen
        if value in seen or value in self._fixed:
            return value
        if not admit or len(value) > MAX_LABEL_CHARS or len(seen) >= self._limit:
            return OTHER
        seen.add(value)
        return value


def _accepted(record: Record) -> bool:
    """Whether the upstream accepted the request, so that its label values may be admitted.

    HTTP: a 2xx answer.  WebSocket: every response has the handshake's 101; the
    upstream accepted it when it created the response (named its id).
    """
    status = record.status_code
    if status is not None and 200 <= status < 300:
        return True
    return status == 101 and record.transport == "websocket" and record.response_id is not None


def _bounded_counts(counts: Any, limit: int = MAX_SCRAPED_LABELS) -> dict[str, float]:
    """Counts by name read from the ledger writer thread, at most `limit` names plus `other`.

    The writer only ever adds names, and a dict keeps insertion order, so the
    names kept are the same at every scrape and `other` never decreases.
    """
    if not counts:
        return {}
    out: dict[str, float] = {}
    other = 0
    # `dict(d)` copies in one step under the GIL: safe while the writer thread adds names.
    for name, n in dict(counts).items():
        if len(out) < limit and isinstance(name, str) and len(name) <= MAX_LABEL_CHARS and name != OTHER:
            out[name] = n
        else:
            other += n
    if other:
        out[OTHER] = other
    return out


class _Series:
    """The children of one (endpoint, model, tier, status, outcome, key, stream) combination."""

    __slots__ = ("_labels", "_m", "cost", "duration", "requests", "tokens", "ttfb", "ttft", "unpriced", "web_search")

    def __init__(self, m: Metrics, endpoint: str, model: str, tier: str, status: str, outcome: str, key: str | None, stream: str) -> None:
        self._m = m
        self._labels = (endpoint, model, tier, key)
        keyed = (key,) if key is not None else ()
        self.requests = m.requests.labels(endpoint, model, tier, status, outcome, *keyed)
        self.tokens: list[Any] = [None] * len(TOKEN_TYPES)  # created on first use
        self.cost: Any = None
        self.web_search: Any = None
        self.unpriced: Any = None
        self.duration = m.duration.labels(endpoint, model, stream)
        self.ttft: Any = None
        self.ttfb: Any = None

    def token(self, index: int) -> Any:
        child = self.tokens[index]
        if child is None:
            endpoint, model, tier, key = self._labels
            keyed = (key,) if key is not None else ()
            child = self.tokens[index] = self._m.tokens.labels(endpoint, model, tier, *keyed, TOKEN_TYPES[index])
        return child

    def cost_child(self) -> Any:
        if self.cost is None:
            _, model, tier, key = self._labels
            self.cost = self._m.cost.labels(model, tier, *((key,) if key is not None else ()))
        return self.cost

    def web_search_child(self) -> Any:
        if self.web_search is None:
            _, model, _, key = self._labels
            self.web_search = self._m.web_search.labels(model, *((key,) if key is not None else ()))
        return self.web_search

    def unpriced_child(self) -> Any:
        if self.unpriced is None:
            self.unpriced = self._m.unpriced.labels(self._labels[1])
        return self.unpriced

    def ttft_child(self) -> Any:
        if self.ttft is None:
            self.ttft = self._m.ttft.labels(self._labels[0], self._labels[1])
        return self.ttft

    def ttfb_child(self) -> Any:
        if self.ttfb is None:
            self.ttfb = self._m.ttfb.labels(self._labels[0], self._labels[1])
        return self.ttfb


class _LedgerCollector:
    """The ledger writer's own counters, read at scrape time so they are always current."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    def describe(self) -> list[Metric]:
        return self._families(None, None)

    def collect(self) -> list[Metric]:
        ledger = self.ledger
        return self._families(ledger, getattr(ledger, "stats", None))

    @staticmethod
    def _families(ledger: Any, stats: Any) -> list[Metric]:
        def value(obj: Any, name: str) -> float | None:
            return getattr(obj, name, 0) if ledger is not None else None  # describe(): no value

        return [
            GaugeMetricFamily("meter_ledger_pending_records", "Records waiting to be written to the ledger.", value=value(ledger, "pending")),
            CounterMetricFamily("meter_ledger_written_records", "Records written to the ledger.", value=value(stats, "written")),
            CounterMetricFamily("meter_ledger_write_errors", "Failed ledger writes (batches).", value=value(stats, "write_errors")),
            CounterMetricFamily(
                "meter_ledger_rejected_records", "Records the store refused, appended to <ledger>.rejected.jsonl.", value=value(stats, "rejected"),
            ),
        ]


class Metrics:
    """Addon: SPEC §6 metrics in an own registry, and `GET /metrics` on the admin app."""

    def __init__(self, settings: Any, ledger_writer: Any, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.key_label = getattr(settings, "metrics_key_label", "on") != "off"
        self._keys = _Bounded(getattr(settings, "metrics_max_keys", 100), fixed=(NO_KEY, OTHER))
        self._models = _Bounded(MAX_MODELS, fixed=("", OTHER))
        self._tiers = _Bounded(MAX_TIERS, fixed=("", OTHER, *KNOWN_TIERS))
        self._reasons = _Bounded(MAX_CACHE_MISS_REASONS, fixed=(OTHER,))
        self._unmetered_reasons = _Bounded(MAX_UNMETERED_REASONS, fixed=(OTHER,))
        key = ["key"] if self.key_label else []
        r = self.registry
        # prometheus-client appends `_total` to counter names: the exposed names are SPEC §6's.
        self.requests = Counter(
            "meter_requests", "Proxied requests (and WebSocket responses).",
            ["endpoint", "model", "service_tier", "status_code", "outcome", *key], registry=r,
        )
        self.tokens = Counter(
            "meter_tokens", "Tokens by type, as reported by the upstream.",
            ["endpoint", "model", "service_tier", *key, "type"], registry=r,
        )
        self.web_search = Counter("meter_web_search_calls", "Hosted web search calls.", ["model", *key], registry=r)
        self.cache_misses = Counter(
            "meter_prompt_cache_misses", "Requests whose prompt cache diagnostics report a miss, by reason.", ["model", "reason"], registry=r,
        )
        self.anomalies = Counter(
            "meter_usage_anomalies", "Usage blocks that break an invariant, or numbers past the ledger's types (kind overflow).",
            ["endpoint", "kind"], registry=r,
        )
        self.unmetered = Counter(
            "meter_unmetered_requests", "Model calls that completed without usage meter could read, by reason.", ["endpoint", "reason"], registry=r,
        )
        self.truncated = Counter("meter_values_truncated", "Values from outside cut to the size the ledger stores, by field.", ["field"], registry=r)
        self.websockets = Gauge("meter_websocket_connections", "Open client WebSocket connections.", registry=r)
        self.cost = Counter("meter_cost_usd", "Cost in US dollars of priced requests.", ["model", "service_tier", *key], registry=r)
        self.duration = Histogram(
            "meter_request_duration_seconds", "From the request's arrival to the last byte relayed.",
            ["endpoint", "model", "stream"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "meter_time_to_first_token_seconds", "From the request's arrival to the first output delta of a stream.",
            ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttfb = Histogram(
            "meter_upstream_ttfb_seconds", "From the request's arrival to the upstream's response headers.",
            ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("meter_in_flight_requests", "Requests being forwarded now.", ["endpoint"], registry=r)
        self.unpriced = Counter("meter_unpriced_requests", "Requests with usage but no price (cost_usd NULL).", ["model"], registry=r)
        self.ledger = ledger_writer
        if ledger_writer is not None:
            r.register(_LedgerCollector(ledger_writer))
        # What the ledger writer thread counted and was already added to a counter: (family, label) -> count.
        self._from_ledger: dict[tuple[str, str], float] = {}
        # Keyed by label values (see the module doc): (endpoint, model, tier, status, outcome, key, stream).
        self._series: dict[tuple[str, str, str, int | None, str, str | None, bool], _Series] = {}
        self._in_flight: dict[str, Any] = {}
        self._miss: dict[tuple[str, str], Any] = {}
        self._anomaly: dict[tuple[str, str], Any] = {}
        self._unmetered: dict[tuple[str, str], Any] = {}

    # hooks ----------------------------------------------------------------------

    def request(self, flow: Any) -> None:
        endpoint = flow.endpoint or ""
        child = self._in_flight.get(endpoint)
        if child is None:
            child = self._in_flight[endpoint] = self.in_flight.labels(endpoint)
        child.inc()
        # done() lowers exactly what was raised: flows refused before the request hook
        # (413) never raised it, and a second done() for one flow finds nothing.
        flow.state["metrics.in_flight"] = child

    def done(self, flow: Any, record: Record) -> None:
        endpoint = record.endpoint or ""
        if flow is not None:
            raised = flow.state.pop("metrics.in_flight", None)
            if raised is not None:
                raised.dec()
            reason = getattr(flow.observation, "unmetered", None)
            if reason is not None:
                self._count_unmetered(endpoint, reason)
        model_raw = record.model or record.model_requested or ""
        if self.key_label:
            key_raw = record.key_name or record.key_id or NO_KEY
        else:
            key_raw = None
        ident = (endpoint, model_raw, record.service_tier or "", record.status_code, record.outcome or "", key_raw, record.stream)
        series = self._series.get(ident)
        if series is None:
            series = self._new_series(ident, _accepted(record))
        series.requests.inc()

        if record.input_tokens is not None and record.input_tokens >= 0:
            series.token(0).inc(record.input_tokens)
        if record.cached_tokens is not None and record.cached_tokens >= 0:
            series.token(1).inc(record.cached_tokens)
        if record.cache_write_tokens is not None and record.cache_write_tokens >= 0:
            series.token(2).inc(record.cache_write_tokens)
        if record.output_tokens is not None and record.output_tokens >= 0:
            series.token(3).inc(record.output_tokens)
        if record.reasoning_tokens is not None and record.reasoning_tokens >= 0:
            series.token(4).inc(record.reasoning_tokens)
        if record.web_search_calls is not None and record.web_search_calls >= 0:
            series.web_search_child().inc(record.web_search_calls)

        cost = record.cost_usd
        if cost is not None:
            if cost >= 0:
                series.cost_child().inc(float(cost))
        elif record.has_usage:
            series.unpriced_child().inc()

        if record.anomalies:
            for kind in record.anomalies:  # meter's own words (observe.usage_anomalies): a fixed set
                self._anomaly_child(endpoint, kind).inc()
        status = record.cache_status
        if status is not None and status.startswith("miss:"):
            self._miss_child(series._labels[1], self._reasons(status[5:], _accepted(record))).inc()

        if record.duration_ms is not None:
            series.duration.observe(record.duration_ms / 1000.0)
        if record.ttft_ms is not None:
            series.ttft_child().observe(record.ttft_ms / 1000.0)
        if record.ttfb_ms is not None:
            series.ttfb_child().observe(record.ttfb_ms / 1000.0)

    def _new_series(self, ident: tuple[Any, ...], admit: bool) -> _Series:
        """The series of a request whose raw values are not all labels yet: through the budgets."""
        endpoint, model_raw, tier_raw, status, outcome, key_raw, stream = ident
        model = self._models(model_raw, admit)
        tier = self._tiers(tier_raw, admit)
        key = self._keys(key_raw, admit) if key_raw is not None else None
        labels = (endpoint, model, tier, status, outcome, key, stream)
        series = self._series.get(labels)
        if series is None:
            if len(self._series) >= _MAX_CACHED:  # a bound on resolved bundles, not on series: resolving again is cheap
                self._series.clear()
            series = _Series(self, endpoint, model, tier, "" if status is None else str(status), outcome, key, "true" if stream else "false")
            self._series[labels] = series
        return series

    def _count_unmetered(self, endpoint: str, reason: Any) -> None:
        label = self._unmetered_reasons(reason) if isinstance(reason, str) else OTHER
        child = self._unmetered.get((endpoint, label))
        if child is None:
            child = self._unmetered[(endpoint, label)] = self.unmetered.labels(endpoint, label)
        child.inc()

    def _anomaly_child(self, endpoint: str, kind: str) -> Any:
        child = self._anomaly.get((endpoint, kind))
        if child is None:
            child = self._anomaly[(endpoint, kind)] = self.anomalies.labels(endpoint, kind)
        return child

    def _miss_child(self, model: str, reason: str) -> Any:
        child = self._miss.get((model, reason))
        if child is None:
            child = self._miss[(model, reason)] = self.cache_misses.labels(model, reason)
        return child

    # WebSocket relay -----------------------------------------------------------

    def websocket_opened(self) -> None:
        self.websockets.inc()

    def websocket_closed(self) -> None:
        self.websockets.dec()

    # admin ------------------------------------------------------------------------

    def render(self) -> bytes:
        self._add_ledger_counts()
        return generate_latest(self.registry)

    def _add_ledger_counts(self) -> None:
        """Bring the counters fed by the ledger writer thread up to its counts, at scrape time.

        Overflowed numbers belong to `meter_usage_anomalies_total` (kind
        `overflow`), a family also counted on the request path, so the writer's
        counts are added to the counters as increments rather than exported by a
        second collector under the same name.
        """
        stats = getattr(self.ledger, "stats", None)
        if stats is None:
            return
        for endpoint, total in _bounded_counts(getattr(stats, "overflows", None)).items():
            self._add_up("overflow", endpoint, total, lambda e: self._anomaly_child(e, "overflow"))
        for field, total in _bounded_counts(getattr(stats, "truncated", None)).items():
            self._add_up("truncated", field, total, self.truncated.labels)

    def _add_up(self, family: str, label: str, total: float, child: Any) -> None:
        done = self._from_ledger.get((family, label), 0)
        if total > done:  # the writer only counts up
            child(label).inc(total - done)
            self._from_ledger[(family, label)] = total

    def admin_routes(self, app: Any) -> None:
        from aiohttp import web

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app.router.add_get("/metrics", metrics)
