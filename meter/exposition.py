"""Prometheus' text format, as meter writes it for `GET /metrics`: metric families
(`Metric` and its counter, gauge and histogram kinds, with prometheus-client's
attribute names so that its tools read them alike), `exposition` (the text of a
list of families), and the process's and Python collector's own families
(`ProcessCollector`, `GCCollector`).

meter does not import prometheus-client: these are the few parts of it meter
used, and every byte written is what its `generate_latest` writes of the same
families (tests/test_metrics.py compares them).  Importing it cost the idle proxy
30 modules (its HTTP and WSGI servers among them), ~1 MB of Python allocations
and 0.4-0.5 MiB of resident memory.  `meter.metrics` holds meter's own families
and writes the plain-number ones itself, faster (see its doc).
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

# What `Metrics.render` writes: Prometheus' text format, for the `/metrics` answer
# (prometheus-client's `CONTENT_TYPE_LATEST`).
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"


def go_float(d: Any) -> str:
    """A sample's value as Prometheus' text format has it (`+Inf`, `NaN`, `1.0`, `5e+06`):
    what prometheus-client's `floatToGoString` writes, to the byte."""
    d = float(d)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    # Go switches to exponents sooner than Python (only positive values matter here).
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def label_value(value: str) -> str:
    """A label value as the text format writes it (prometheus-client's escapes)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def family_head(name: str, documentation: str, typ: str) -> str:
    """A family's `# HELP` and `# TYPE` lines (its help escaped as prometheus-client does)."""
    doc = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {typ}\n"


# Families and their exposition -----------------------------------------------------------
#
# What a collector's `collect` gives, with prometheus-client's attribute names (`name`,
# `documentation`, `type`, `samples` of `name`, `labels`, `value`, `timestamp`), so that
# its tools (`generate_latest`, the tests' parser) read a family alike.  meter writes the
# text itself and does not import prometheus-client (see the module doc).
# No `_created` samples: they double every counter and histogram in Prometheus for no use here.


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float
    timestamp: float | None = None
    exemplar: None = None


class Metric:
    """One family: its name (a counter's without `_total`), help, type and samples."""

    __slots__ = ("_labelnames", "documentation", "name", "samples", "type")

    def __init__(self, name: str, documentation: str, typ: str, labels: Sequence[str] | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.type = typ
        self._labelnames = tuple(labels or ())
        self.samples: list[Sample] = []


class CounterMetricFamily(Metric):
    """A counter family: one sample (`value`) or one per `add_metric` (`labels`)."""

    __slots__ = ()

    def __init__(self, name: str, documentation: str, value: float | None = None, labels: Sequence[str] | None = None) -> None:
        super().__init__(name.removesuffix("_total"), documentation, "counter", labels)
        if value is not None:
            self.add_metric((), value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name + "_total", dict(zip(self._labelnames, labels)), value))


class GaugeMetricFamily(Metric):
    """A gauge family: one sample (`value`) or one per `add_metric` (`labels`)."""

    __slots__ = ()

    def __init__(self, name: str, documentation: str, value: float | None = None, labels: Sequence[str] | None = None) -> None:
        super().__init__(name, documentation, "gauge", labels)
        if value is not None:
            self.add_metric((), value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name, dict(zip(self._labelnames, labels)), value))


class HistogramMetricFamily(Metric):
    """A histogram family: per `add_metric`, its cumulative buckets (`+Inf` last), count and sum."""

    __slots__ = ()

    def __init__(self, name: str, documentation: str, labels: Sequence[str] | None = None) -> None:
        super().__init__(name, documentation, "histogram", labels)

    def add_metric(self, labels: Sequence[str], buckets: Sequence[tuple[str, float]], sum_value: float) -> None:
        named = list(zip(self._labelnames, labels))
        for le, value in buckets:
            self.samples.append(Sample(self.name + "_bucket", dict([*named, ("le", le)]), value))
        self.samples.append(Sample(self.name + "_count", dict(named), buckets[-1][1]))
        self.samples.append(Sample(self.name + "_sum", dict(named), sum_value))


def exposition(families: Iterable[Metric]) -> str:
    """Families in the text format: what prometheus-client's `generate_latest` writes of
    them (names and label names are Prometheus' plain ones, as every family here has)."""
    out: list[str] = []
    for family in families:
        name = family.name + "_total" if family.type == "counter" else family.name
        out.append(family_head(name, family.documentation, family.type))
        for sample in family.samples:
            if sample.labels:
                labels = ",".join(f'{label}="{label_value(value)}"' for label, value in sorted(sample.labels.items()))
                out.append(f"{sample.name}{{{labels}}} {go_float(sample.value)}\n")
            else:
                out.append(f"{sample.name} {go_float(sample.value)}\n")
    return "".join(out)


class Collector(Protocol):
    """What a registry reads at scrape time; `describe` (optional) names its families."""

    def collect(self) -> Iterable[Metric]: ...


# A family's own series names besides its name, which no other collector may take.
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def series_names(collector: Collector) -> list[str]:
    describe = getattr(collector, "describe", None)
    if describe is None:
        return []
    return [name for family in describe() for name in (family.name, *(family.name + s for s in _SUFFIXES.get(family.type, ())))]


def _boot_time() -> float:
    with open("/proc/stat", "rb") as stat:
        for line in stat:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


class ProcessCollector:
    """The proxy process's memory, CPU, start time and file descriptors, read from /proc at
    scrape time: prometheus-client's `ProcessCollector` (its families, help and values)."""

    def __init__(self) -> None:
        try:
            self._ticks = float(os.sysconf("SC_CLK_TCK"))
        except (ValueError, OSError, AttributeError):
            self._ticks = 100.0
        try:
            self._pagesize = os.sysconf("SC_PAGESIZE")
        except (ValueError, OSError, AttributeError):
            self._pagesize = 4096
        try:
            self._btime = _boot_time()  # 0 where there is no /proc: no families then
        except OSError:
            self._btime = 0.0

    def collect(self) -> list[Metric]:
        if not self._btime:
            return []
        result: list[Metric] = []
        try:
            with open("/proc/self/stat", "rb") as stat:
                parts = stat.read().split(b")")[-1].split()
            result += [
                GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", value=float(parts[20])),
                GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.", value=float(parts[21]) * self._pagesize),
                GaugeMetricFamily(
                    "process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                    value=float(parts[19]) / self._ticks + self._btime,
                ),
                CounterMetricFamily(
                    "process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                    value=float(parts[11]) / self._ticks + float(parts[12]) / self._ticks,
                ),
            ]
        except OSError:
            pass
        try:
            max_fds = None
            with open("/proc/self/limits", "rb") as limits:
                for line in limits:
                    if line.startswith(b"Max open file"):
                        max_fds = GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.", value=float(line.split()[3]))
                        break
            open_fds = GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", value=len(os.listdir("/proc/self/fd")))
            result += [open_fds] if max_fds is None else [open_fds, max_fds]
        except OSError:
            pass
        return result


class GCCollector:
    """What Python's cyclic collector did, by generation (`gc.get_stats()`):
    prometheus-client's `GCCollector` (its families, help and values)."""

    def collect(self) -> list[Metric]:
        collected = CounterMetricFamily("python_gc_objects_collected", "Objects collected during gc", labels=["generation"])
        uncollectable = CounterMetricFamily("python_gc_objects_uncollectable", "Uncollectable objects found during GC", labels=["generation"])
        collections = CounterMetricFamily("python_gc_collections", "Number of times this generation was collected", labels=["generation"])
        for generation, stat in enumerate(gc.get_stats()):
            collected.add_metric([str(generation)], stat["collected"])
            uncollectable.add_metric([str(generation)], stat["uncollectable"])
            collections.add_metric([str(generation)], stat["collections"])
        return [collected, uncollectable, collections]
