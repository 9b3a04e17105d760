"""OpenTelemetry GenAI client metrics over OTLP (SPEC §10, "Exports"), besides Prometheus.

`otel_metrics_from_env(settings)` returns an `OtelMetrics` addon when
`OTEL_METRICS_EXPORTER` names `otlp` (or `console`) and `OTEL_SDK_DISABLED` is
not true, else None: nothing is created, no exporter, no thread.  Unlike the
OpenTelemetry default, unset means off: Prometheus is meter's own metrics, a
second export must be asked for.

Instruments, named as in the GenAI semantic conventions, with their
recommended buckets: `gen_ai.client.token.usage` (`{token}`; input and output
tokens the upstream reported, `gen_ai.token.type`; a background response's
usage on the retrieval that first shows it, as in the ledger),
`gen_ai.client.operation.duration` (`s`; arrival to last byte, `error.type`
when the call did not complete), `gen_ai.client.operation.time_to_first_chunk`
(`s`; streamed calls, to the first output delta, as on the spans).  Only model
calls are recorded.  Attributes come from the record, never a header, so no
key reaches them; values from outside (models, tiers, error types) are bounded
as the Prometheus labels are, past a budget `_OTHER` (the conventions' fallback),
and their text is what the ledger stores (a lone surrogate or a control
character is U+FFFD).

Hot path: the SDK's `Histogram.record` cleans and hashes the attributes on
every call, about 10 µs each, 40 µs per streamed call (the Prometheus addon
takes 1 µs in all).  So, as `meter.metrics` does, the histograms are plain
cells (count, sum, min, max, buckets) per attribute set, whose dicts are built
once: a request costs a dict lookup and a few additions under one uncontended
lock.  A thread of the addon's own turns the cells into the SDK's
`MetricsData` every `OTEL_METRIC_EXPORT_INTERVAL` for the SDK's OTLP/HTTP
exporter (`OTEL_EXPORTER_OTLP_[METRICS_]*`), with the traces' resource;
`stop()` exports what is left, waiting for it only briefly
(`tracing.finish_in_background`).  Temporality: cumulative, or delta when
`OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE` says `delta`/`lowmemory`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from bisect import bisect_left
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from yarl import URL

from .config import StartupError
from .ledger.sanitise import clean_text
from .record import Record
from .tracing import MODEL_CALLS, OK_OUTCOMES, finish_in_background, make_resource

log = logging.getLogger("meter")

# The GenAI semantic conventions' ExplicitBucketBoundaries.
TOKEN_BUCKETS = (1.0, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
SECONDS_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_USAGE = "gen_ai.client.token.usage"
OPERATION_DURATION = "gen_ai.client.operation.duration"
TIME_TO_FIRST_CHUNK = "gen_ai.client.operation.time_to_first_chunk"
PROVIDER = "openai"  # the API flavour meter speaks, whoever hosts the models (as on the spans)
OTHER = "_OTHER"
MAX_VALUE_CHARS = 128  # a longer value from outside counts as `_OTHER`
MAX_MODELS = 1000  # distinct model names (requested and served share the budget)
MAX_TIERS = 16  # service tiers besides the ones OpenAI defines
KNOWN_TIERS = ("auto", "default", "flex", "scale", "priority")
MAX_ERROR_TYPES = 64
# Where usage shows without the call that caused it: a background response's poll.
_USAGE_ONLY = {"responses.retrieve": "chat"}
_TRUE = ("true", "1", "yes", "on")
_KNOWN_EXPORTERS = frozenset({"otlp", "console", "none", "prometheus"})


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _millis(name: str, default: float) -> float:
    raw = _env(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise StartupError(f"{name}: expected a positive number of milliseconds, got {raw!r}")
    return value


def _temporality() -> AggregationTemporality:
    raw = _env("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE").lower() or "cumulative"
    if raw == "cumulative":
        return AggregationTemporality.CUMULATIVE
    if raw in ("delta", "lowmemory"):  # both make histograms delta
        return AggregationTemporality.DELTA
    raise StartupError(f"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE: expected cumulative, delta or lowmemory, got {raw!r}")


def otel_metrics_from_env(settings: Any) -> OtelMetrics | None:
    """The OtelMetrics addon the `OTEL_*` environment asks for, or None (no export)."""
    if _env("OTEL_SDK_DISABLED").lower() in _TRUE:
        return None
    exporters = [e.strip().lower() for e in _env("OTEL_METRICS_EXPORTER").split(",") if e.strip()]
    unknown = sorted(set(exporters) - _KNOWN_EXPORTERS)
    if unknown:
        log.warning("OTEL_METRICS_EXPORTER: %s not supported (otlp, console, none); ignored", ", ".join(unknown))
    if "none" in exporters or not {"otlp", "console"} & set(exporters):
        return None  # unset, or only `prometheus`: meter's /metrics is that already
    interval = _millis("OTEL_METRIC_EXPORT_INTERVAL", 60_000)
    timeout = _millis("OTEL_METRIC_EXPORT_TIMEOUT", 30_000)
    temporality = _temporality()
    aggregation = _env("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION").lower()
    if aggregation not in ("", "explicit_bucket_histogram"):
        log.warning("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=%s is not supported; exporting explicit buckets", aggregation)
    metric_exporters: list[MetricExporter] = []
    if "otlp" in exporters:  # the endpoint defaults to http://localhost:4318, as the standard says
        metric_exporters.append(_otlp_exporter())
    if "console" in exporters:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        metric_exporters.append(ConsoleMetricExporter())
    return OtelMetrics(settings, metric_exporters, interval_ms=interval, timeout_ms=timeout, temporality=temporality)


def _otlp_exporter() -> MetricExporter:
    protocol = (_env("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").lower()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc; metrics go over HTTP")
        else:
            return GrpcExporter()
    elif protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not supported; exporting metrics over http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()  # endpoint, headers, timeout, compression from OTEL_EXPORTER_OTLP_[METRICS_]*


class _Bounded:
    """A value from outside as itself once admitted (from an accepted call, short, within budget), else `_OTHER`."""

    __slots__ = ("_fixed", "_limit", "_seen")

    def __init__(self, limit: int, fixed: tuple[str, ...] = ()) -> None:
        self._seen: set[str] = set()
        self._limit = limit
        self._fixed = frozenset(fixed)

    def __call__(self, value: str, admit: bool) -> str:
        if value in self._seen or value in self._fixed:
            return value
        if not admit or len(value) > MAX_VALUE_CHARS or len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


def _accepted(record: Record) -> bool:
    """Whether the upstream accepted the call (HTTP 2xx; on a WebSocket, it created the response)."""
    status = record.status_code
    if status is not None and 200 <= status < 300:
        return True
    return status == 101 and record.transport == "websocket" and record.response_id is not None


def _error_type(r: Record) -> str | None:
    """`error.type` of a call that did not complete, as on its span; None when it did."""
    if r.outcome in OK_OUTCOMES:
        return None
    status = r.status_code
    return r.error_type or (str(status) if status is not None and status >= 400 else r.outcome)


class _Instrument:
    """One histogram: a cell per attribute set, `[count, sum, min, max, *bucket_counts]`."""

    __slots__ = ("bounds", "description", "name", "streams", "unit")

    def __init__(self, name: str, unit: str, description: str, bounds: tuple[float, ...]) -> None:
        self.name, self.unit, self.description, self.bounds = name, unit, description, bounds
        self.streams: list[tuple[dict[str, Any], list[float]]] = []  # appended under the addon's lock

    def cell(self, attributes: dict[str, Any]) -> list[float]:
        cell = _empty(len(self.bounds))
        self.streams.append((attributes, cell))
        return cell

    def metric(self, start: int, now: int, temporality: AggregationTemporality) -> Metric | None:
        """The data points of the cells that counted anything (the caller holds the lock)."""
        points = []
        bounds = list(self.bounds)
        for attributes, cell in self.streams:
            if not cell[0]:
                continue
            points.append(
                HistogramDataPoint(
                    attributes=attributes,
                    start_time_unix_nano=start,
                    time_unix_nano=now,
                    count=int(cell[0]),
                    sum=cell[1],
                    bucket_counts=[int(c) for c in cell[4:]],
                    explicit_bounds=bounds,
                    min=cell[2],
                    max=cell[3],
                )
            )
            if temporality is AggregationTemporality.DELTA:
                cell[:] = _empty(len(self.bounds))
        if not points:
            return None
        return Metric(name=self.name, description=self.description, unit=self.unit, data=Histogram(points, temporality))


def _empty(n_bounds: int) -> list[float]:
    return [0, 0.0, math.inf, -math.inf, *([0] * (n_bounds + 1))]


def _observe(cell: list[float], value: float, bounds: tuple[float, ...]) -> None:
    cell[0] += 1
    cell[1] += value
    cell[2] = min(cell[2], value)
    cell[3] = max(cell[3], value)
    cell[4 + bisect_left(bounds, value)] += 1  # a bucket holds (bound before, its bound]


class _Series:
    """The cells of one combination of operation, models and tier, with their attribute dicts built once."""

    __slots__ = ("_duration", "base", "duration", "errors", "input", "output", "ttfc")

    def __init__(self, m: OtelMetrics, operation: str, requested: str | None, served: str | None, tier: str | None) -> None:
        ttfc = {"gen_ai.operation.name": operation, **m.common}
        if requested is not None:
            ttfc["gen_ai.request.model"] = requested
        if served is not None:
            ttfc["gen_ai.response.model"] = served
        base = dict(ttfc)
        if tier is not None:  # the OpenAI refinement of token usage and duration, not of time to first chunk
            base["openai.response.service_tier"] = tier
        self.base = base
        self._duration = m.duration
        self.input = m.token_usage.cell({**base, "gen_ai.token.type": "input"})
        self.output = m.token_usage.cell({**base, "gen_ai.token.type": "output"})
        self.duration = m.duration.cell(base)
        self.ttfc = m.ttfc.cell(ttfc)
        self.errors: dict[str, list[float]] = {}

    def failed(self, error: str) -> list[float]:
        cell = self.errors.get(error)
        if cell is None:
            cell = self.errors[error] = self._duration.cell({**self.base, "error.type": error})
        return cell


class OtelMetrics:
    """Addon: the GenAI client histograms, one update per finished model call, exported by a thread."""

    def __init__(
        self,
        settings: Any,
        exporters: list[MetricExporter],
        interval_ms: float = 60_000,
        timeout_ms: float = 30_000,
        temporality: AggregationTemporality = AggregationTemporality.CUMULATIVE,
    ) -> None:
        from . import __version__

        self.exporters = exporters
        self.interval = interval_ms / 1000.0
        self.timeout_ms = timeout_ms
        self.temporality = temporality
        self.resource = make_resource()
        self.scope = InstrumentationScope("meter", __version__)
        self.token_usage = _Instrument(TOKEN_USAGE, "{token}", "Number of input and output tokens used.", TOKEN_BUCKETS)
        self.duration = _Instrument(OPERATION_DURATION, "s", "GenAI operation duration.", SECONDS_BUCKETS)
        self.ttfc = _Instrument(TIME_TO_FIRST_CHUNK, "s", "Time to receive the first chunk of a streamed response.", SECONDS_BUCKETS)
        upstream = URL(getattr(settings, "upstream", "https://api.openai.com"))
        self.common: dict[str, Any] = {"gen_ai.provider.name": PROVIDER}
        if upstream.host:
            self.common["server.address"] = upstream.host
            if upstream.port is not None:
                self.common["server.port"] = upstream.port
        self._models = _Bounded(MAX_MODELS)
        self._tiers = _Bounded(MAX_TIERS, KNOWN_TIERS)
        # Error types come from the upstream's error bodies (and meter's own words), not
        # from the client: every one is admitted, up to the budget.
        self._errors = _Bounded(MAX_ERROR_TYPES)
        # (operation, requested, served, tier) as received -> its series; raw values hit
        # only once each of them is its own attribute value (see _new_series).
        self._series: dict[tuple[str, str | None, str | None, str | None], _Series] = {}
        self._lock = threading.Lock()  # the event loop counts, the export thread reads
        self._since = time.time_ns()  # start of the cumulative (or of the current delta) period
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._export_lock = threading.Lock()  # the last export at stop never overlaps a periodic one

    # hooks ----------------------------------------------------------------------

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="meter-otel-metrics", daemon=True)
        self._thread.start()

    def done(self, flow: Any, record: Record) -> None:
        endpoint = record.endpoint
        model_call = MODEL_CALLS.get(endpoint)
        operation = model_call[0] if model_call is not None else _USAGE_ONLY.get(endpoint)
        if operation is None:
            return
        with self._lock:
            series = self._series.get((operation, record.model_requested, record.model, record.service_tier))
            if series is None:
                series = self._new_series(operation, record)
            n = record.input_tokens
            if n is not None and n >= 0:
                _observe(series.input, n, TOKEN_BUCKETS)
            n = record.output_tokens
            if n is not None and n >= 0:
                _observe(series.output, n, TOKEN_BUCKETS)
            if model_call is None:
                return  # a poll: its usage counts, its duration is not the operation's
            if record.duration_ms is not None:
                error = _error_type(record)
                cell = series.duration if error is None else series.failed(self._errors(clean_text(error), True))
                _observe(cell, record.duration_ms / 1000.0, SECONDS_BUCKETS)
            if record.stream and record.ttft_ms is not None:
                _observe(series.ttfc, record.ttft_ms / 1000.0, SECONDS_BUCKETS)

    async def stop(self) -> None:
        # Joins the thread, exports what is left and shuts the exporters: off the event loop,
        # and not in the way of the ledger's last flush when the collector does not answer.
        await finish_in_background(self._shutdown, "metrics")

    # internals ----------------------------------------------------------------------

    def _new_series(self, operation: str, r: Record) -> _Series:
        """The series of a call whose raw values are not all attribute values yet: through the budgets."""
        admit = _accepted(r)
        # Text as the ledger stores it: one lone surrogate in an attribute made every later
        # export fail to encode (the cumulative cells keep it), so nothing was exported again.
        requested = None if r.model_requested is None else self._models(clean_text(r.model_requested), admit)
        served = None if r.model is None else self._models(clean_text(r.model), admit)
        tier = None if r.service_tier is None else self._tiers(clean_text(r.service_tier), admit)
        bounded = (operation, requested, served, tier)
        series = self._series.get(bounded)
        if series is None:
            # Stored under the bounded values only: when they are the raw ones, the next
            # call finds it directly; a raw value never becomes a key.
            series = self._series[bounded] = _Series(self, operation, requested, served, tier)
        return series

    def collect(self) -> MetricsData | None:
        """What the cells hold now, as the SDK's data model (None when nothing counted)."""
        now = time.time_ns()
        with self._lock:
            start = self._since
            metrics = [m for i in (self.token_usage, self.duration, self.ttfc) if (m := i.metric(start, now, self.temporality)) is not None]
            if self.temporality is AggregationTemporality.DELTA:
                self._since = now
        if not metrics:
            return None
        scope_metrics = ScopeMetrics(scope=self.scope, metrics=metrics, schema_url="")
        return MetricsData(resource_metrics=[ResourceMetrics(resource=self.resource, scope_metrics=[scope_metrics], schema_url="")])

    def _export(self) -> None:
        with self._export_lock:
            data = self.collect()
            if data is None:
                return
            for exporter in self.exporters:
                try:
                    exporter.export(data, timeout_millis=self.timeout_ms)  # logs its own failures
                except Exception:  # an exporter must not end the thread
                    log.exception("OTLP metrics export failed")

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self._export()

    def _shutdown(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._export()
        for exporter in self.exporters:
            try:
                exporter.shutdown()
            except Exception:
                log.exception("OTLP metrics exporter shutdown failed")
