"""Traces (SPEC §7): one OpenTelemetry span per proxied request, exported over OTLP.

`tracing_from_env(settings)` returns a `Tracing` addon when the standard `OTEL_*`
variables ask for traces (an OTLP endpoint is set, `OTEL_TRACES_EXPORTER` is not
`none`, `OTEL_SDK_DISABLED` is not true), else None.  The addon owns its own
`TracerProvider` (the process-global one is left alone): resource from
`OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` (service name `meter` by
default), sampler from `OTEL_TRACES_SAMPLER[_ARG]`, and a `BatchSpanProcessor`
(`OTEL_BSP_*`) feeding an OTLP/HTTP protobuf exporter (`OTEL_EXPORTER_OTLP_*`),
so a span's export happens on the processor's thread, never on a request.

Hooks:

- `request(flow)` starts the span at the flow's arrival time, as a child of the
  client's W3C `traceparent`/`tracestate` when one came in, replaces those
  headers in what goes upstream with our own context (so the upstream's spans
  hang under ours), and sets `flow.trace_id` (the ledger's `trace_id`).
- `done(flow, record)` names the span, sets the attributes from the finished,
  priced record and ends it at the record's `finished_at`.

Span kind is CLIENT: the span stands for meter's call to the model provider, as
the GenAI conventions' inference span does, and the upstream's own (server)
span is its child through the `traceparent` meter sends.  Model calls
(Responses, its compact form, Chat Completions, Embeddings) are named
`{gen_ai.operation.name} {gen_ai.request.model}`; everything else gets a plain
HTTP span `{method} {endpoint}`.  Attributes come only from the record (never
from a header), so the API key cannot reach a span; their text is what the
ledger stores (a lone surrogate or a control character is U+FFFD), which the
exporter can always encode.

The WebSocket relay reuses the same two hooks per response: give `request` a
Flow whose `started_at` is the response's start, and `done` its Record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from .ledger.sanitise import clean_text
from .record import Record

log = logging.getLogger("meter")

# endpoint -> (gen_ai.operation.name, openai.api.type)
MODEL_CALLS: dict[str, tuple[str, str | None]] = {
    "responses": ("chat", "responses"),
    "responses.compact": ("chat", "responses"),
    "chat.completions": ("chat", "chat_completions"),
    "embeddings": ("embeddings", None),
}
ERROR_OUTCOMES = frozenset({"error", "failed", "upstream_unreachable", "upstream_timeout"})
OK_OUTCOMES = frozenset({"completed", "in_progress"})
_SPAN_KEY = "tracing.span"
_ROOT = Context()
_TRUE = ("true", "1", "yes", "on")
# How long, at stop, the last export may hold up what stops after it: the ledger's
# last flush.  A collector that is down or silent would hold it for the exporter's
# whole timeout (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s an export, retries included; the span
# processor's shutdown waits up to 30 s), for traces and again for metrics: past an
# orchestrator's grace period the process is killed with records still in memory.  A
# collector that answers takes milliseconds.
LAST_EXPORT_WAIT = 1.0  # seconds


async def finish_in_background(work: Callable[[], None], what: str, wait: float = LAST_EXPORT_WAIT) -> None:
    """Run `work` (an exporter's shutdown: the last export, then closing) in a thread of
    its own, and wait for it at most `wait` seconds.  Whatever is left goes on while
    meter stops; the thread is not a daemon, so the process exits once it ends (within
    the exporter's own timeout), after the ledger is flushed."""
    finished = threading.Event()

    def run() -> None:
        try:
            work()
        finally:
            finished.set()

    threading.Thread(target=run, name=f"meter-{what}-shutdown", daemon=False).start()
    if not await asyncio.get_running_loop().run_in_executor(None, finished.wait, wait):
        log.warning("%s: the collector has not taken the last export in %.1fs; it goes on while meter stops", what, wait)


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def tracing_from_env(settings: Any) -> Tracing | None:
    """The Tracing addon the `OTEL_*` environment asks for, or None (traces off)."""
    if _env("OTEL_SDK_DISABLED").lower() in _TRUE:
        return None
    exporters = [e.strip().lower() for e in (_env("OTEL_TRACES_EXPORTER") or "otlp").split(",") if e.strip()]
    endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")
    use_otlp = bool(endpoint) and "otlp" in exporters
    use_console = "console" in exporters  # an explicit debugging choice needs no endpoint
    if "none" in exporters or not (use_otlp or use_console):
        return None
    span_exporters: list[SpanExporter] = []
    if use_otlp:
        span_exporters.append(_otlp_exporter())
    if use_console:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        span_exporters.append(ConsoleSpanExporter())
    return Tracing(settings, span_exporters)


def _otlp_exporter() -> SpanExporter:
    protocol = (_env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").lower()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc; exporting over http/protobuf")
        else:
            return GrpcExporter()
    elif protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not supported; exporting over http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, compression from OTEL_EXPORTER_OTLP_*


def make_resource() -> Resource:
    from . import __version__

    resource = Resource.create({"service.version": __version__})  # + OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "meter"}))
    return resource


class Tracing:
    """Addon: a span per flow, ended with the record's attributes."""

    def __init__(self, settings: Any, exporters: list[SpanExporter], provider: TracerProvider | None = None) -> None:
        if provider is None:
            provider = TracerProvider(resource=make_resource(), shutdown_on_exit=False)
            for exporter in exporters:
                provider.add_span_processor(BatchSpanProcessor(exporter))
        self.provider = provider
        self.tracer = provider.get_tracer("meter")
        self.propagator = TraceContextTextMapPropagator()
        upstream = URL(getattr(settings, "upstream", "https://api.openai.com"))
        self.server_address = upstream.host
        self.server_port = upstream.port
        self.path_prefix = upstream.path.rstrip("/")

    # hooks ----------------------------------------------------------------------

    def request(self, flow: Any) -> None:
        span = self._start(flow, flow.started_at)
        flow.state[_SPAN_KEY] = span
        headers = flow.upstream_headers
        if headers is not None:
            # Our context replaces the client's: the upstream's spans are children of ours.
            # (Written directly: the W3C format is one line, the propagator's inject costs more.)
            for name in ("traceparent", "tracestate"):
                if name in headers:
                    del headers[name]
            ctx = span.get_span_context()
            headers["traceparent"] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
            if ctx.trace_state:
                headers["tracestate"] = ctx.trace_state.to_header()

    def done(self, flow: Any, record: Record) -> None:
        span = flow.state.pop(_SPAN_KEY, None) if flow is not None else None
        if span is None:
            # Refused before forwarding (413): no request hook ran, the span starts now.
            span = self._start(flow, record.started_at)
            if record.trace_id is None:  # sinks after us (the ledger) see it
                record.trace_id = format(span.get_span_context().trace_id, "032x")
        end = int(record.finished_at * 1e9)
        if not span.is_recording():
            span.end(end_time=end)
            return
        self._annotate(span, record)
        span.end(end_time=end)

    async def stop(self) -> None:
        # shutdown() flushes the batch processor and joins its thread: off the event loop,
        # and not in the way of the ledger's last flush when the collector does not answer.
        await finish_in_background(self.provider.shutdown, "traces")

    # internals ----------------------------------------------------------------------

    def _start(self, flow: Any, started_at: float) -> Any:
        parent = _ROOT  # never the ambient context: each request is its own trace unless the client says otherwise
        headers = getattr(flow, "headers", None)
        if headers is not None and "traceparent" in headers:
            parent = self.propagator.extract(headers, context=_ROOT)
        method = getattr(flow, "method", "") or ""
        endpoint = getattr(flow, "endpoint", "") or ""
        span = self.tracer.start_span(
            f"{method} {endpoint}", context=parent, kind=SpanKind.CLIENT, start_time=int(started_at * 1e9)
        )
        if flow is not None:
            flow.trace_id = format(span.get_span_context().trace_id, "032x")
        return span

    def _annotate(self, span: Any, r: Record) -> None:
        attrs: dict[str, Any] = {}
        model_call = MODEL_CALLS.get(r.endpoint)
        if model_call is not None:
            operation, api_type = model_call
            span.update_name(f"{operation} {clean_text(r.model_requested)}" if r.model_requested else operation)
            attrs["gen_ai.operation.name"] = operation
            attrs["gen_ai.provider.name"] = "openai"
            if api_type is not None:
                attrs["openai.api.type"] = api_type
            _put(attrs, "gen_ai.request.model", r.model_requested)
            _put(attrs, "gen_ai.response.model", r.model)
            _put(attrs, "gen_ai.response.id", r.response_id)
            attrs["gen_ai.request.stream"] = bool(r.stream)
            _put(attrs, "gen_ai.usage.input_tokens", r.input_tokens)
            _put(attrs, "gen_ai.usage.output_tokens", r.output_tokens)
            _put(attrs, "gen_ai.usage.cache_read.input_tokens", r.cached_tokens)
            _put(attrs, "gen_ai.usage.cache_creation.input_tokens", r.cache_write_tokens)
            _put(attrs, "gen_ai.usage.reasoning.output_tokens", r.reasoning_tokens)
            if r.ttft_ms is not None:
                attrs["gen_ai.response.time_to_first_chunk"] = r.ttft_ms / 1000.0
            _put(attrs, "openai.request.service_tier", r.service_tier_requested)
            _put(attrs, "openai.response.service_tier", r.service_tier)
        else:
            span.update_name(f"{r.method} {r.endpoint}")
        _put(attrs, "server.address", self.server_address)
        _put(attrs, "server.port", self.server_port)
        _put(attrs, "http.request.method", r.method)
        _put(attrs, "http.response.status_code", r.status_code)
        _put(attrs, "url.path", self.path_prefix + r.path)  # the path sent upstream; never the query
        if r.cost_usd is not None:
            attrs["meter.cost_usd"] = float(r.cost_usd)
        outcome = r.outcome
        if outcome not in OK_OUTCOMES:
            status = r.status_code
            _put(attrs, "error.type", r.error_type or (str(status) if status is not None and status >= 400 else outcome))
        span.set_attributes(attrs)
        if outcome in ERROR_OUTCOMES:
            span.set_status(Status(StatusCode.ERROR, clean_text(r.error_code or outcome)))


def _put(attrs: dict[str, Any], name: str, value: Any) -> None:
    if value is not None:
        # Text as the ledger stores it: the exporter encodes a span's strings as UTF-8, and
        # one lone surrogate (valid JSON: "\ud800") made it drop the whole batch of spans.
        attrs[name] = clean_text(value) if isinstance(value, str) else value
