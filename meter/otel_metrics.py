"""OpenTelemetry GenAI client metrics over OTLP (SPEC §10, "Exports"), besides Prometheus.

`otel_metrics_from_env(settings)` returns an `OtelMetrics` addon when
`OTEL_METRICS_EXPORTER` names `otlp` (or `console`) and `OTEL_SDK_DISABLED` is
not true, else None: without it nothing is created, no provider, no thread.
Unlike the OpenTelemetry default (`otlp`), an unset `OTEL_METRICS_EXPORTER`
means off here, because Prometheus on the admin port is meter's own metrics
and a second export must be asked for.

The addon owns its own `MeterProvider` (the process-global one is left alone),
with the resource of the traces (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`;
service name `meter` by default) and a `PeriodicExportingMetricReader`
(`OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_METRIC_EXPORT_TIMEOUT`) feeding an
OTLP/HTTP protobuf exporter (`OTEL_EXPORTER_OTLP_[METRICS_]*`: endpoint,
headers, timeout, compression, temporality preference).  Collection and export
run on the reader's thread; `stop()` collects and exports what is left.

Instruments, as the GenAI semantic conventions name them, with their
recommended bucket boundaries (given as the instruments' advice, so an
`OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION` still applies):

- `gen_ai.client.token.usage` (`{token}`): a record's `input_tokens` and
  `output_tokens`, as `gen_ai.token.type` `input` / `output`, when the upstream
  reported them (unknown usage is not recorded as 0).  A background response's
  usage counts on the retrieval that first shows it, as in the ledger.
- `gen_ai.client.operation.duration` (`s`): from the request's arrival to the
  last byte relayed, with `error.type` when the call did not complete.
- `gen_ai.client.operation.time_to_first_chunk` (`s`): streamed calls only, to
  the first output delta (the spans' `gen_ai.response.time_to_first_chunk`).

Only model calls (Responses, its compact form, Chat Completions, Embeddings)
are GenAI operations; other requests are not recorded here.  Attributes come
from the record only (never a header), so no key can reach them.  Values from
outside (models, tiers, error types) are bounded like the Prometheus labels: a
new value is admitted only from a call the upstream accepted, up to a budget,
then counts as `_OTHER` (the conventions' fallback).

Hot path: `done` runs once per request on the event loop.  The attribute dicts
of a combination are built once and kept, so a request costs one dict lookup
and three or four `Histogram.record` calls (in-memory aggregation).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from yarl import URL

from .record import Record
from .tracing import MODEL_CALLS, OK_OUTCOMES, make_resource

log = logging.getLogger("meter")

# The GenAI semantic conventions' ExplicitBucketBoundaries.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
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


def otel_metrics_from_env(settings: Any) -> OtelMetrics | None:
    """The OtelMetrics addon the `OTEL_*` environment asks for, or None (no export)."""
    if _env("OTEL_SDK_DISABLED").lower() in _TRUE:
        return None
    exporters = [e.strip().lower() for e in _env("OTEL_METRICS_EXPORTER").split(",") if e.strip()]
    unknown = sorted(set(exporters) - _KNOWN_EXPORTERS)
    if unknown:
        log.warning("OTEL_METRICS_EXPORTER: %s not supported (otlp, console, none); ignored", ", ".join(unknown))
    if "none" in exporters:
        return None
    metric_exporters: list[MetricExporter] = []
    if "otlp" in exporters:  # the endpoint defaults to http://localhost:4318, as the standard says
        metric_exporters.append(_otlp_exporter())
    if "console" in exporters:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        metric_exporters.append(ConsoleMetricExporter())
    if not metric_exporters:  # unset, or only `prometheus`: meter's /metrics is that already
        return None
    return OtelMetrics(settings, metric_exporters)


def _otlp_exporter() -> MetricExporter:
    protocol = (_env("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").lower()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc; exporting metrics over http/protobuf")
        else:
            return GrpcExporter()
    elif protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not supported; exporting metrics over http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()  # endpoint, headers, timeout, compression, temporality from OTEL_EXPORTER_OTLP_*


class _Bounded:
    """Raw values from outside to themselves once admitted, else `_OTHER`.

    Admitted: the upstream accepted the call it came with, it is at most
    `MAX_VALUE_CHARS` long, and fewer than `limit` values were admitted before.
    """

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


class _Attributes:
    """The attribute dicts of one combination of operation, models and tier, built once."""

    __slots__ = ("base", "errors", "input", "output", "ttfc")

    def __init__(self, common: dict[str, Any], operation: str, requested: str | None, served: str | None, tier: str | None) -> None:
        ttfc = {"gen_ai.operation.name": operation, **common}
        if requested is not None:
            ttfc["gen_ai.request.model"] = requested
        if served is not None:
            ttfc["gen_ai.response.model"] = served
        base = dict(ttfc)
        if tier is not None:  # the OpenAI refinement of token usage and duration, not of time to first chunk
            base["openai.response.service_tier"] = tier
        self.ttfc = ttfc
        self.base = base
        self.input = {**base, "gen_ai.token.type": "input"}
        self.output = {**base, "gen_ai.token.type": "output"}
        self.errors: dict[str, dict[str, Any]] = {}

    def failed(self, error: str) -> dict[str, Any]:
        attrs = self.errors.get(error)
        if attrs is None:
            attrs = self.errors[error] = {**self.base, "error.type": error}
        return attrs


class OtelMetrics:
    """Addon: the GenAI client histograms, one update per finished model call."""

    def __init__(self, settings: Any, exporters: list[MetricExporter], provider: MeterProvider | None = None) -> None:
        if provider is None:
            readers = [PeriodicExportingMetricReader(exporter) for exporter in exporters]
            provider = MeterProvider(metric_readers=readers, resource=make_resource(), shutdown_on_exit=False)
        self.provider = provider
        meter = provider.get_meter("meter")
        self.token_usage = meter.create_histogram(
            TOKEN_USAGE, unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.duration = meter.create_histogram(
            OPERATION_DURATION, unit="s", description="GenAI operation duration.", explicit_bucket_boundaries_advisory=SECONDS_BUCKETS
        )
        self.ttfc = meter.create_histogram(
            TIME_TO_FIRST_CHUNK, unit="s", description="Time to receive the first chunk of a streamed response.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        upstream = URL(getattr(settings, "upstream", "https://api.openai.com"))
        self._common: dict[str, Any] = {"gen_ai.provider.name": PROVIDER}
        if upstream.host:
            self._common["server.address"] = upstream.host
            if upstream.port is not None:
                self._common["server.port"] = upstream.port
        self._models = _Bounded(MAX_MODELS)
        self._tiers = _Bounded(MAX_TIERS, KNOWN_TIERS)
        # Error types come from the upstream's error bodies (and meter's own words), not
        # from the client: every one is admitted, up to the budget.
        self._errors = _Bounded(MAX_ERROR_TYPES)
        # (operation, requested, served, tier) as received -> the dicts; raw values hit
        # only once each of them is its own attribute value (see _attributes).
        self._cache: dict[tuple[str, str | None, str | None, str | None], _Attributes] = {}

    # hooks ----------------------------------------------------------------------

    def done(self, flow: Any, record: Record) -> None:
        endpoint = record.endpoint
        model_call = MODEL_CALLS.get(endpoint)
        operation = model_call[0] if model_call is not None else _USAGE_ONLY.get(endpoint)
        if operation is None:
            return
        attrs = self._attributes(operation, record)
        n = record.input_tokens
        if n is not None and n >= 0:
            self.token_usage.record(n, attrs.input)
        n = record.output_tokens
        if n is not None and n >= 0:
            self.token_usage.record(n, attrs.output)
        if model_call is None:
            return  # a poll: its usage counts, its duration is not the operation's
        if record.duration_ms is not None:
            error = _error_type(record)
            self.duration.record(record.duration_ms / 1000.0, attrs.base if error is None else attrs.failed(self._errors(error, True)))
        if record.stream and record.ttft_ms is not None:
            self.ttfc.record(record.ttft_ms / 1000.0, attrs.ttfc)

    async def stop(self) -> None:
        # shutdown() collects, exports and joins the reader's thread: off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.provider.shutdown)

    # internals ----------------------------------------------------------------------

    def _attributes(self, operation: str, r: Record) -> _Attributes:
        ident = (operation, r.model_requested, r.model, r.service_tier)
        attrs = self._cache.get(ident)
        if attrs is None:
            admit = _accepted(r)
            requested = None if r.model_requested is None else self._models(r.model_requested, admit)
            served = None if r.model is None else self._models(r.model, admit)
            tier = None if r.service_tier is None else self._tiers(r.service_tier, admit)
            bounded = (operation, requested, served, tier)
            attrs = self._cache.get(bounded)
            if attrs is None:
                attrs = self._cache[bounded] = _Attributes(self._common, operation, requested, served, tier)
            if bounded == ident:  # only attribute values are keys: a raw value never sits here
                self._cache[ident] = attrs
        return attrs
