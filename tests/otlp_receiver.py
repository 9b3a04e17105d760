"""A minimal OTLP/HTTP receiver for tests: a real HTTP server on a real port.

It accepts `POST /v1/traces` with a protobuf `ExportTraceServiceRequest` and
`POST /v1/metrics` with an `ExportMetricsServiceRequest` (optionally gzip- or
deflate-compressed), decodes every span into a `ReceivedSpan` and every data
point into a `ReceivedPoint`, attributes as plain dicts, and answers with the
protobuf `Export...ServiceResponse`, as a collector would.

    async with OTLPReceiver() as receiver:
        env OTEL_EXPORTER_OTLP_ENDPOINT = receiver.url
        spans = await receiver.wait_for(lambda s: s.name == "chat gpt-4o")
        points = await receiver.wait_for_points(lambda p: p.name == "gen_ai.client.token.usage")
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web
from google.protobuf.message import Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest, ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

PROTOBUF = "application/x-protobuf"


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str  # 32 lowercase hex
    span_id: str  # 16 lowercase hex
    parent_span_id: str  # "" for a root span
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 1 internal, 2 server, 3 client
    start_time_unix_nano: int
    end_time_unix_nano: int
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""
    trace_state: str = ""


@dataclass
class ReceivedPoint:
    """One data point of a metric, as exported (cumulative unless the exporter was told otherwise)."""

    name: str
    unit: str
    description: str
    kind: str  # the Metric's data field: "histogram", "sum", "gauge", "exponential_histogram", ...
    temporality: int  # AggregationTemporality: 1 delta, 2 cumulative (0 for a gauge)
    attributes: dict[str, Any]
    count: int = 0  # histograms
    sum: float = 0.0  # histograms; a sum's or gauge's value
    bucket_counts: list[int] = field(default_factory=list)
    explicit_bounds: list[float] = field(default_factory=list)
    min: float | None = None
    max: float | None = None
    time_unix_nano: int = 0
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""
    request: int = 0  # which export request (1, 2, ...) carried it


def _points(metric: Any, resource: dict[str, Any], scope: str, request: int) -> list[ReceivedPoint]:
    kind = metric.WhichOneof("data")
    if kind is None:
        return []
    data = getattr(metric, kind)
    temporality = getattr(data, "aggregation_temporality", 0)
    points = []
    for dp in data.data_points:
        point = ReceivedPoint(
            name=metric.name, unit=metric.unit, description=metric.description, kind=kind, temporality=temporality,
            attributes=attributes(dp.attributes), time_unix_nano=dp.time_unix_nano, resource=resource, scope=scope, request=request,
        )
        if kind == "histogram":
            point.count, point.sum = dp.count, dp.sum
            point.bucket_counts, point.explicit_bounds = list(dp.bucket_counts), list(dp.explicit_bounds)
            point.min = dp.min if dp.HasField("min") else None
            point.max = dp.max if dp.HasField("max") else None
        elif kind == "exponential_histogram":
            point.count, point.sum = dp.count, dp.sum
        elif kind in ("sum", "gauge"):
            point.sum = dp.as_double if dp.WhichOneof("value") == "as_double" else dp.as_int
        points.append(point)
    return points


class OTLPReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.spans: list[ReceivedSpan] = []
        self.points: list[ReceivedPoint] = []
        self.requests = 0
        self.metric_requests = 0
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> OTLPReceiver:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @staticmethod
    async def _read(request: web.Request, message: Message) -> web.Response | None:
        """Parse the request's protobuf body into `message`; the error answer when it is not one."""
        if request.content_type != PROTOBUF:
            return web.Response(status=415, text=f"expected {PROTOBUF}, got {request.content_type}")
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        try:
            message.ParseFromString(body)
        except Exception as exc:  # noqa: BLE001 - a collector answers 400 to garbage
            return web.Response(status=400, text=f"bad protobuf: {exc}")
        return None

    async def _metrics(self, request: web.Request) -> web.Response:
        message = ExportMetricsServiceRequest()
        refused = await self._read(request, message)
        if refused is not None:
            return refused
        self.metric_requests += 1
        for resource_metrics in message.resource_metrics:
            resource = attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    self.points.extend(_points(metric, resource, scope_metrics.scope.name, self.metric_requests))
        self._changed.set()
        return web.Response(body=ExportMetricsServiceResponse().SerializeToString(), content_type=PROTOBUF)

    async def _traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        refused = await self._read(request, message)
        if refused is not None:
            return refused
        self.requests += 1
        for resource_spans in message.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start_time_unix_nano=span.start_time_unix_nano,
                            end_time_unix_nano=span.end_time_unix_nano,
                            status_code=span.status.code,
                            status_message=span.status.message,
                            attributes=attributes(span.attributes),
                            resource=resource,
                            scope=scope_spans.scope.name,
                            trace_state=span.trace_state,
                        )
                    )
        self._changed.set()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type=PROTOBUF)

    async def wait_for(self, predicate: Callable[[ReceivedSpan], bool], count: int = 1, timeout: float = 10.0) -> list[ReceivedSpan]:
        """Spans matching `predicate`, once at least `count` arrived (AssertionError after `timeout`)."""
        return await self._wait(self.spans, predicate, count, timeout, "spans")

    async def wait_for_points(
        self, predicate: Callable[[ReceivedPoint], bool], count: int = 1, timeout: float = 10.0
    ) -> list[ReceivedPoint]:
        """Data points (of every export so far) matching `predicate`, once at least `count` arrived."""
        return await self._wait(self.points, predicate, count, timeout, "data points")

    def latest(self) -> dict[tuple[str, frozenset[tuple[str, Any]]], ReceivedPoint]:
        """Each metric stream (name and attributes) as its last export had it: with
        cumulative temporality, its totals so far."""
        streams: dict[tuple[str, frozenset[tuple[str, Any]]], ReceivedPoint] = {}
        for point in self.points:  # in arrival order: a later export replaces an earlier one
            streams[(point.name, frozenset(point.attributes.items()))] = point
        return streams

    async def _wait(self, items: list[Any], predicate: Callable[[Any], bool], count: int, timeout: float, what: str) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = [s for s in items if predicate(s)]
            if len(found) >= count:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                names = sorted({s.name for s in items})
                raise AssertionError(f"{len(found)} of {count} expected {what} arrived in {timeout}s; received: {names}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.2))
            except TimeoutError:
                pass
