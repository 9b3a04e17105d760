"""Prometheus metrics (SPEC §6): one update per finished request, rendered for the admin port.

`Metrics` is an addon.  `request(flow)` raises the in-flight gauge of the flow's
endpoint; `done(flow, record)` lowers it again and counts the record: requests,
tokens by type, cost, web searches, cache misses, anomalies, unpriced and
unmetered requests (read from the record, as the report reads them), and the
latency histograms.  Nothing is counted per chunk.

What the ledger writer thread counts (pending, written, refused and truncated
records, numbers past the ledger's types) is `LedgerMetrics`, a collector of its
own that reads the writer at scrape time; the server registers it with
`Metrics.register`, so the addon holds no other addon.

The metrics live in the addon's own `Registry` (never a process-global one), so
several meters in one process (tests) do not share counters, and `GET /metrics`
on the admin port (mounted by the server) serves exactly the SPEC's families.

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
- `tag_<name>` (only with `metrics_tag_labels`, on requests, tokens and cost):
  the record's tag of that name, `""` when absent; each tag has a budget of
  `metrics_max_keys` like `key` (see `meter.tag_labels`).
- A value from outside is the text the ledger stores (`clean_text`: a lone
  surrogate or a control character is U+FFFD), so that the exposition always
  encodes as UTF-8 and a label equals its rows' value.
- `endpoint` is from the fixed list of SPEC §4; a missing value is `""`.
  Unmetered reasons and the field names of truncated values are meter's own
  words, bounded all the same.

Hot path: `done` runs once per request on the event loop.  The counters and
histograms are plain numbers (`_Counter`, `_Histogram`), exported at scrape
time: prometheus-client's children take a lock per update, about 1 µs each and
ten of them per request, and here both `done` and the scrape run on the event
loop, so nothing needs a lock.  Cost is summed as the exact Decimal each record
carries and made a float at scrape time: the counter is then the ledger's sum
to the nano-dollar (a float sum drifts from it), and a Decimal's float() is a
string round trip that cost ~0.2 us per request.  The cells of one label combination are resolved
once and kept in a `_Series` bundle keyed by the combination's tuple of label
values, so a repeated combination costs one dict lookup.  The raw values of a
request are looked up in that same dict: they hit only when each of them
already is its own label, so only requests carrying a value that is not (yet)
a label take the slower path through the budgets, and the dict holds label
values only, never a raw value a client sent.

The scrape runs on the event loop too, so every request waits while it does:
the plain-number families are written to text here (`_Counter.text`), each
label value escaped once a scrape, about six times faster than through
prometheus-client's samples (30,000 label combinations: 0.3 s rather than
1.7 s), and byte for byte the same text; the other collectors (the ledger's,
the budgets', the process's) give families (`Metric`) written by `exposition`.

prometheus-client is not imported: the families, the process and GC collectors
and the text writer are in `meter.exposition`, byte for byte what
prometheus-client writes (tests/test_metrics.py compares them).
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from operator import itemgetter
from typing import Any, Protocol, cast

from .exposition import (
    Collector,
    CounterMetricFamily,
    GaugeMetricFamily,
    GCCollector,
    HistogramMetricFamily,
    Metric,
    ProcessCollector,
    exposition,
    family_head,
    go_float,
    label_value,
    series_names,
)
from .ledger.sanitise import clean_text
from .record import Record
from .tag_labels import TagReader, tag_label_name

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
OTHER = "other"
NO_KEY = "none"
_ZERO = Decimal(0)

# `le` label values as prometheus-client writes them (`1.0`, `+Inf`): dashboards match on them.
_LE = (*(go_float(b) for b in LATENCY_BUCKETS), "+Inf")


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
    names kept are the same at every scrape and `other` never decreases.  A name
    still at zero is left out, as a labelled counter appears at its first count.
    """
    if not counts:
        return {}
    out: dict[str, float] = {}
    kept = 0
    other = 0
    # `dict(d)` copies in one step under the GIL: safe while the writer thread adds names.
    for name, n in dict(counts).items():
        if kept < limit and isinstance(name, str) and len(name) <= MAX_LABEL_CHARS and name != OTHER:
            kept += 1  # a name counted at zero keeps its place, so the kept names never change
            if n:
                out[name] = n
        else:
            other += n
    if other:
        out[OTHER] = other
    return out


def _number(value: Any) -> str:
    """A sample's value as prometheus-client writes it (`floatToGoString`), counts written
    directly: a scrape writes one per line, and nearly every line is a count."""
    if value.__class__ is int and -1_000_000 < value < 1_000_000:
        return f"{value}.0"  # what floatToGoString writes for these
    return go_float(value)


class _Escaped(dict[str, str]):
    """Label values in the text format, each escaped once a scrape (prometheus-client's
    escapes, so the text is the same)."""

    def __missing__(self, value: str) -> str:
        text = self[value] = label_value(value)
        return text


_LabelText = Callable[[tuple[str, ...], _Escaped], str]


def _label_text(sorted_labels: list[tuple[str, int]]) -> _LabelText:
    """What writes `name="value",...` of a series' labels, for (name, position) pairs in order."""
    if not sorted_labels:
        return lambda labels, escaped: ""
    template = ",".join(f'{name}="{{}}"' for name, _ in sorted_labels).format
    positions = [i for _, i in sorted_labels]
    pick: Callable[[tuple[str, ...]], Iterable[str]]
    pick = itemgetter(*positions) if len(positions) > 1 else lambda labels: (labels[positions[0]],)
    # One format of the values picked and escaped, all in C but the lookups' misses.
    return lambda labels, escaped: template(*map(escaped.__getitem__, pick(labels)))


class _Counter:
    """A counter family as plain numbers: label values -> a one-item list, added to in place.

    The attribute names are prometheus-client's (`_name`, `_labelnames`), so a
    tool that lists a registry's metric objects and their labels reads these alike.

    `text` writes the family in the text format itself, byte for byte what
    prometheus-client's `generate_latest` makes of `family` (labels sorted by
    name), without a `Sample` and a dict per series: a scrape runs on the event
    loop, and through prometheus-client 30,000 label combinations (300 models and
    100 keys, well within the budgets) held every request for 1.6 s a scrape.
    """

    __slots__ = ("_doc", "_labelnames", "_labels", "_name", "_sorted", "cells")

    TYPE = "counter"

    def __init__(self, name: str, doc: str, labelnames: Iterable[str]) -> None:
        self._name = name  # without `_total`: the exposition adds it
        self._doc = doc
        self._labelnames = tuple(labelnames)
        # (name, position) of each label, in the order the text format writes them.
        self._sorted = sorted((label, i) for i, label in enumerate(self._labelnames))
        self._labels = _label_text(self._sorted)
        self.cells: dict[tuple[str, ...], list[float]] = {}

    def _head(self, out: list[str], name: str) -> None:
        out.append(family_head(name, self._doc, self.TYPE))

    def text(self, out: list[str], escaped: _Escaped, extra: dict[tuple[str, ...], float] | None = None) -> None:
        name = self._name + "_total"
        self._head(out, name)
        cells = self.cells
        labels_of = self._labels
        for labels, cell in cells.items():
            value = cell[0] + extra.get(labels, 0) if extra else cell[0]
            out.append(f"{name}{{{labels_of(labels, escaped)}}} {_number(value)}\n")
        if extra:
            for labels, n in extra.items():
                if labels not in cells:
                    out.append(f"{name}{{{labels_of(labels, escaped)}}} {_number(n)}\n")

    def cell(self, labels: tuple[str, ...]) -> list[float]:
        cell = self.cells.get(labels)
        if cell is None:
            cell = self.cells[labels] = [0]
        return cell

    def family(self, extra: dict[tuple[str, ...], float] | None = None) -> Metric:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        cells = self.cells
        for labels, cell in cells.items():
            # float(): the cost cells hold exact Decimal sums (see `Metrics.done`).
            family.add_metric(labels, float(cell[0] + (extra.get(labels, 0) if extra else 0)))
        if extra:
            for labels, n in extra.items():
                if labels not in cells:
                    family.add_metric(labels, n)
        return family


class _Gauge(_Counter):
    """A gauge family as plain numbers (`in_flight`: raised by `request`, lowered by `done`)."""

    __slots__ = ()

    TYPE = "gauge"

    def family(self, extra: dict[tuple[str, ...], float] | None = None) -> Metric:
        family = GaugeMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, cell in self.cells.items():
            family.add_metric(labels, cell[0])
        return family

    def text(self, out: list[str], escaped: _Escaped, extra: dict[tuple[str, ...], float] | None = None) -> None:
        name = self._name
        self._head(out, name)
        labels_of = self._labels
        for labels, cell in self.cells.items():
            out.append(f"{name}{{{labels_of(labels, escaped)}}} {_number(cell[0])}\n")


class _Histogram(_Counter):
    """A histogram family of `LATENCY_BUCKETS` as plain numbers.

    A cell holds the count of each bucket alone (the last one `+Inf`) and then
    the sum; the exposition makes the counts cumulative.
    """

    __slots__ = ()

    TYPE = "histogram"

    def cell(self, labels: tuple[str, ...]) -> list[float]:
        cell = self.cells.get(labels)
        if cell is None:
            cell = self.cells[labels] = [0] * len(_LE) + [0.0]
        return cell

    def family(self, extra: dict[tuple[str, ...], float] | None = None) -> Metric:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, cell in self.cells.items():
            total = 0.0
            buckets = []
            for le, n in zip(_LE, cell):
                total += n
                buckets.append((le, total))
            family.add_metric(labels, buckets, sum_value=cell[-1])
        return family

    def text(self, out: list[str], escaped: _Escaped, extra: dict[tuple[str, ...], float] | None = None) -> None:
        name = self._name
        self._head(out, name)
        # `le` takes its sorted place among the labels.
        split = sum(1 for label, _ in self._sorted if label < "le")
        labels_before, labels_after = _label_text(self._sorted[:split]), _label_text(self._sorted[split:])
        for labels, cell in self.cells.items():
            before = labels_before(labels, escaped)
            after = labels_after(labels, escaped)
            if before:
                before += ","
            if after:
                after = "," + after
            total: float = 0  # an int while the counts are (they are): written faster by `_number`
            for le, n in zip(_LE, cell):
                total += n
                out.append(f'{name}_bucket{{{before}le="{le}"{after}}} {_number(total)}\n')
            every = self._labels(labels, escaped)
            out.append(f"{name}_count{{{every}}} {_number(total)}\n{name}_sum{{{every}}} {go_float(cell[-1])}\n")


class _Series:
    """The cells of one (endpoint, model, tier, status, outcome, key, stream, tags) combination."""

    __slots__ = ("_key", "_keyed", "_labels", "_m", "cost", "duration", "requests", "tokens", "ttfb", "ttft", "unpriced", "web_search")

    def __init__(
        self, m: Metrics, endpoint: str, model: str, tier: str, status: str, outcome: str, key: str | None, stream: str,
        tags: tuple[str, ...] = (),
    ) -> None:
        self._m = m
        self._labels = (endpoint, model, tier)
        self._key: tuple[str, ...] = (key,) if key is not None else ()
        self._keyed = (*self._key, *tags)  # key and tag labels: requests, tokens and cost carry both
        self.requests = m.requests.cell((endpoint, model, tier, status, outcome, *self._keyed))
        # Created on first use, so a type never reported (no cache writes, say) has no series.
        self.tokens: list[list[float] | None] = [None] * len(TOKEN_TYPES)
        self.cost: list[Decimal] | None = None  # an exact sum (see `Metrics.done`)
        self.web_search: list[float] | None = None
        self.unpriced: list[float] | None = None
        self.duration = m.duration.cell((endpoint, model, stream))
        self.ttft: list[float] | None = None
        self.ttfb: list[float] | None = None

    def token(self, index: int) -> list[float]:
        cell = self.tokens[index] = self._m.tokens.cell((*self._labels, *self._keyed, TOKEN_TYPES[index]))
        return cell

    def cost_cell(self) -> list[Decimal]:
        # The cost family's cells start at 0 and only ever have Decimals added.
        self.cost = cast("list[Decimal]", self._m.cost.cell((self._labels[1], self._labels[2], *self._keyed)))
        return self.cost

    def web_search_cell(self) -> list[float]:
        self.web_search = self._m.web_search.cell((self._labels[1], *self._key))
        return self.web_search

    def unpriced_cell(self) -> list[float]:
        self.unpriced = self._m.unpriced.cell((self._labels[1],))
        return self.unpriced

    def ttft_cell(self) -> list[float]:
        self.ttft = self._m.ttft.cell(self._labels[:2])
        return self.ttft

    def ttfb_cell(self) -> list[float]:
        self.ttfb = self._m.ttfb.cell(self._labels[:2])
        return self.ttfb


class CountedElsewhere(Protocol):
    """A collector whose counts join two of `Metrics`' families at scrape time."""

    def describe(self) -> list[Metric]: ...
    def collect(self) -> list[Metric]: ...
    def anomalies(self) -> dict[tuple[str, ...], float]: ...  # by (endpoint, kind)
    def truncated(self) -> dict[tuple[str, ...], float]: ...  # by (field,)


class _Families:
    """The plain-number families, exported in one collector at scrape time."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def describe(self) -> list[Metric]:
        return [f.family() for f in self.m.families()]

    def collect(self) -> list[Metric]:
        return [f.family(extra) for f, extra in self._with_extra()]

    def text(self) -> str:
        """The families in the text format, as `generate_latest` writes what `collect` returns."""
        out: list[str] = []
        escaped = _Escaped()
        for f, extra in self._with_extra():
            f.text(out, escaped, extra)
        return "".join(out)

    def _with_extra(self) -> list[tuple[_Counter, dict[tuple[str, ...], float] | None]]:
        """Each family, with the counts kept elsewhere that join it."""
        m = self.m
        anomalies: dict[tuple[str, ...], float] = {}
        truncated: dict[tuple[str, ...], float] = {}
        for other in m.elsewhere:
            for labels, n in other.anomalies().items():
                anomalies[labels] = anomalies.get(labels, 0) + n
            for labels, n in other.truncated().items():
                truncated[labels] = truncated.get(labels, 0) + n
        return [(f, anomalies if f is m.anomalies else truncated if f is m.truncated else None) for f in m.families()]


class Registry:
    """The addon's own registry (never a process-global one, so several meters in one
    process, as in tests, share no counters): the plain-number families, then every
    collector in the order registered.

    `collect` gives every family, as prometheus-client's registry does; `render` writes
    the plain-number families itself (`_Families.text`) and the rest through
    `exposition`.  As prometheus-client's, it refuses a collector whose `describe` names
    a series another one has (a counter `x` is also `x_total`)."""

    def __init__(self, families: _Families) -> None:
        self.families = families
        self._collectors: list[Collector] = []
        self._names: set[str] = set(series_names(families))

    def register(self, collector: Collector) -> None:
        names = series_names(collector)
        taken = self._names.intersection(names)
        if taken:
            raise ValueError(f"Duplicated timeseries in the registry: {sorted(taken)}")
        self._names.update(names)
        self._collectors.append(collector)

    def collect(self) -> Iterator[Metric]:
        yield from self.families.collect()
        yield from self.registered()

    def registered(self) -> Iterator[Metric]:
        """The registered collectors' families, without the plain-number ones."""
        for collector in list(self._collectors):
            yield from collector.collect()


class _Level:
    """A gauge without labels, raised and lowered on the event loop (open WebSockets)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation, value=self.value)]


class LedgerMetrics:
    """The ledger writer's own counters, read at scrape time so they are always current.

    Its own families (pending, written, failed and refused records), plus what joins
    `Metrics`' families: numbers past the ledger's types are usage anomalies (kind
    `overflow`) and values cut to the stored size are `meter_values_truncated`, one
    family each rather than a second one.  Both are found by the writer thread.
    """

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    def describe(self) -> list[Metric]:
        return self._families(None, None)

    def collect(self) -> list[Metric]:
        ledger = self.ledger
        return self._families(ledger, getattr(ledger, "stats", None))

    def anomalies(self) -> dict[tuple[str, ...], float]:
        overflows = getattr(getattr(self.ledger, "stats", None), "overflows", None)
        return {(endpoint, "overflow"): n for endpoint, n in _bounded_counts(overflows).items()}

    def truncated(self) -> dict[tuple[str, ...], float]:
        truncated = getattr(getattr(self.ledger, "stats", None), "truncated", None)
        return {(field,): n for field, n in _bounded_counts(truncated).items()}

    @staticmethod
    def _families(ledger: Any, stats: Any) -> list[Metric]:
        def value(obj: Any, name: str) -> float | None:
            return getattr(obj, name, 0) if ledger is not None else None  # describe(): no value

        return [
            GaugeMetricFamily(
                "meter_ledger_pending_records", "Records waiting to be written to the ledger.", value=value(ledger, "pending"),
            ),
            GaugeMetricFamily(
                "meter_ledger_spooled_records", "Records in the spool file, waiting to be written to the ledger.", value=value(ledger, "spooled"),
            ),
            CounterMetricFamily("meter_ledger_written_records", "Records written to the ledger.", value=value(stats, "written")),
            CounterMetricFamily("meter_ledger_write_errors", "Failed ledger writes (batches).", value=value(stats, "write_errors")),
            CounterMetricFamily(
                "meter_ledger_rejected_records", "Records the store refused, appended to <ledger>.rejected.jsonl.",
                value=value(stats, "rejected"),
            ),
            CounterMetricFamily(
                "meter_ledger_dropped_records", "Records dropped while neither the ledger nor the spool took them, past twice --ledger-max-pending.",
                value=value(stats, "dropped"),
            ),
        ]


class Metrics:
    """Addon: SPEC §6 metrics in an own registry; `render()` is what `GET /metrics` answers."""

    def __init__(self, settings: Any) -> None:
        self._families = _Families(self)
        self.elsewhere: list[CountedElsewhere] = []  # read at scrape time (`register`)
        self.key_label = getattr(settings, "metrics_key_label", "on") != "off"
        self._keys = _Bounded(getattr(settings, "metrics_max_keys", 100), fixed=(NO_KEY, OTHER))
        self._models = _Bounded(MAX_MODELS, fixed=("", OTHER))
        self._tiers = _Bounded(MAX_TIERS, fixed=("", OTHER, *KNOWN_TIERS))
        self._reasons = _Bounded(MAX_CACHE_MISS_REASONS, fixed=(OTHER,))
        self._unmetered_reasons = _Bounded(MAX_UNMETERED_REASONS, fixed=(OTHER,))
        tag_names = tuple(getattr(settings, "metrics_tag_labels", ()) or ())
        # None unless tags are chosen: then `done` never looks at a record's tags.
        self._tag_reader = TagReader(tag_names, OTHER, MAX_LABEL_CHARS) if tag_names else None
        self._tag_bounds = tuple(_Bounded(getattr(settings, "metrics_max_keys", 100), fixed=("", OTHER)) for _ in tag_names)
        key = ["key"] if self.key_label else []
        tags = [tag_label_name(name) for name in tag_names]
        # Counter names without `_total`: the exposition adds it, so the exposed names are SPEC §6's.
        self.requests = _Counter(
            "meter_requests", "Proxied requests (and WebSocket responses).",
            ["endpoint", "model", "service_tier", "status_code", "outcome", *key, *tags],
        )
        self.tokens = _Counter(
            "meter_tokens", "Tokens by type, as reported by the upstream.", ["endpoint", "model", "service_tier", *key, *tags, "type"],
        )
        self.web_search = _Counter("meter_web_search_calls", "Hosted web search calls.", ["model", *key])
        self.cache_misses = _Counter(
            "meter_prompt_cache_misses", "Requests whose prompt cache diagnostics report a miss, by reason.", ["model", "reason"],
        )
        self.anomalies = _Counter(
            "meter_usage_anomalies", "Usage blocks that break an invariant, or numbers past the ledger's types (kind overflow).",
            ["endpoint", "kind"],
        )
        self.unmetered = _Counter(
            "meter_unmetered_requests", "Model calls that completed without usage meter could read, by reason.", ["endpoint", "reason"],
        )
        self.truncated = _Counter("meter_values_truncated", "Values from outside cut to the size the ledger stores, by field.", ["field"])
        self.cost = _Counter("meter_cost_usd", "Cost in US dollars of priced requests.", ["model", "service_tier", *key, *tags])
        self.duration = _Histogram(
            "meter_request_duration_seconds", "From the request's arrival to the last byte relayed.", ["endpoint", "model", "stream"],
        )
        self.ttft = _Histogram(
            "meter_time_to_first_token_seconds", "From the request's arrival to the first output delta of a stream.", ["endpoint", "model"],
        )
        self.ttfb = _Histogram(
            "meter_upstream_ttfb_seconds", "From the request's arrival to the upstream's response headers.", ["endpoint", "model"],
        )
        self.in_flight = _Gauge("meter_in_flight_requests", "Requests being forwarded now.", ["endpoint"])
        self.unpriced = _Counter("meter_unpriced_requests", "Requests with usage but no price (cost_usd NULL).", ["model"])
        self.registry = r = Registry(self._families)
        self.websockets = _Level("meter_websocket_connections", "Open client WebSocket connections.")
        r.register(self.websockets)
        # The proxy process's own: its memory and CPU, and what the cyclic collector did
        # (read at scrape time from /proc and gc.get_stats(); nothing per request).
        r.register(ProcessCollector())
        r.register(GCCollector())
        # Keyed by label values (see the module doc): (endpoint, model, tier, status, outcome, key, stream, tags).
        self._series: dict[tuple[str, str, str, int | None, str, str | None, bool, tuple[str, ...]], _Series] = {}

    def register(self, collector: CountedElsewhere) -> None:
        """Export a collector of counts kept elsewhere (`LedgerMetrics`) with these metrics."""
        self.registry.register(collector)
        self.elsewhere.append(collector)

    def families(self) -> tuple[_Counter, ...]:
        return (
            self.requests, self.tokens, self.web_search, self.cache_misses, self.anomalies, self.unmetered, self.truncated,
            self.cost, self.duration, self.ttft, self.ttfb, self.in_flight, self.unpriced,
        )

    # hooks ----------------------------------------------------------------------

    def request(self, flow: Any) -> None:
        cell = self.in_flight.cell((flow.endpoint or "",))
        cell[0] += 1
        # done() lowers exactly what was raised: flows refused before the request hook
        # (413) never raised it, and a second done() for one flow finds nothing.
        flow.state["metrics.in_flight"] = cell

    def done(self, flow: Any, record: Record) -> None:
        endpoint = record.endpoint or ""
        if flow is not None:
            raised = flow.state.pop("metrics.in_flight", None)
            if raised is not None:
                raised[0] -= 1
        if record.error_type == "unmetered":
            # From the record, as the report counts it (`unmetered_requests`): only a model
            # call answered 2xx is unmetered there, whatever the observer said of an error
            # page, a cancel or a delete, so the metric and the report always agree.
            self._count_unmetered(endpoint, record.error_code)
        model_raw = record.model or record.model_requested or ""
        tier_raw = record.service_tier or ""
        # A value too long to be a label is `other` before it is hashed for the lookup
        # (a client's 4 MiB model name would otherwise cost milliseconds to hash).
        if len(model_raw) > MAX_LABEL_CHARS:
            model_raw = OTHER
        if len(tier_raw) > MAX_LABEL_CHARS:
            tier_raw = OTHER
        if self.key_label:
            key_raw = record.key_name or record.key_id or NO_KEY
        else:
            key_raw = None
        # The tags' JSON is read only when tag labels are chosen; else the tags part is ().
        tags_raw = self._tag_reader.raw(record.tags) if self._tag_reader is not None else ()
        ident = (endpoint, model_raw, tier_raw, record.status_code, record.outcome or "", key_raw, record.stream, tags_raw)
        series = self._series.get(ident)
        if series is None:
            series = self._new_series(ident, _accepted(record))
        series.requests[0] += 1

        # A cell is a non-empty list, so `cell or create()` reads as "the cell, made on first use".
        tokens = series.tokens
        n = record.input_tokens
        if n is not None and n >= 0:
            (tokens[0] or series.token(0))[0] += n
        n = record.cached_tokens
        if n is not None and n >= 0:
            (tokens[1] or series.token(1))[0] += n
        n = record.cache_write_tokens
        if n is not None and n >= 0:
            (tokens[2] or series.token(2))[0] += n
        n = record.output_tokens
        if n is not None and n >= 0:
            (tokens[3] or series.token(3))[0] += n
        n = record.reasoning_tokens
        if n is not None and n >= 0:
            (tokens[4] or series.token(4))[0] += n
        n = record.web_search_calls
        if n is not None and n >= 0:
            (series.web_search or series.web_search_cell())[0] += n

        cost = record.cost_usd
        if cost is not None:
            if cost >= _ZERO:
                # Summed as the exact Decimal it is (made a float at scrape time): the sum
                # is the ledger's to the nano-dollar, and a Decimal's float() costs a
                # string round trip (~0.2 us) per request.
                (series.cost or series.cost_cell())[0] += cost
        elif record.has_usage:
            (series.unpriced or series.unpriced_cell())[0] += 1

        if record.anomalies:
            for kind in record.anomalies:  # meter's own words (observe.usage_anomalies): a fixed set
                self.anomalies.cell((endpoint, kind))[0] += 1
        status = record.cache_status
        if status is not None and status.startswith("miss:"):
            reason = self._reasons(clean_text(status[5:]), _accepted(record))
            self.cache_misses.cell((series._labels[1], reason))[0] += 1

        # The histograms, written out rather than called (a call each per request):
        # `le` is inclusive, and bisect_left puts a value equal to a bound in its bucket.
        ms = record.duration_ms
        if ms is not None:
            seconds = ms / 1000.0
            cell = series.duration
            cell[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            cell[-1] += seconds
        ms = record.ttft_ms
        if ms is not None:
            seconds = ms / 1000.0
            cell = series.ttft or series.ttft_cell()
            cell[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            cell[-1] += seconds
        ms = record.ttfb_ms
        if ms is not None:
            seconds = ms / 1000.0
            cell = series.ttfb or series.ttfb_cell()
            cell[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            cell[-1] += seconds

    def _new_series(self, ident: tuple[Any, ...], admit: bool) -> _Series:
        """The series of a request whose raw values are not all labels yet: through the budgets."""
        endpoint, model_raw, tier_raw, status, outcome, key_raw, stream, tags_raw = ident
        # As the ledger stores them (SPEC §2b): a lone surrogate in a label would make every
        # later scrape fail to encode, and a control character would differ from the row.
        model = self._models(clean_text(model_raw), admit)
        tier = self._tiers(clean_text(tier_raw), admit)
        key = self._keys(key_raw, admit) if key_raw is not None else None
        tags = tuple(bound(value, admit) for bound, value in zip(self._tag_bounds, tags_raw))
        labels = (endpoint, model, tier, status, outcome, key, stream, tags)
        series = self._series.get(labels)
        if series is None:
            # Never dropped: the bundles hold the counts.  Their number is that of the
            # label combinations, which the budgets bound.
            series = self._series[labels] = _Series(
                self, endpoint, model, tier, "" if status is None else str(status), outcome, key, "true" if stream else "false", tags,
            )
        return series

    def _count_unmetered(self, endpoint: str, reason: Any) -> None:
        label = self._unmetered_reasons(clean_text(reason)) if isinstance(reason, str) else OTHER
        self.unmetered.cell((endpoint, label))[0] += 1

    # WebSocket relay -----------------------------------------------------------

    def websocket_opened(self) -> None:
        self.websockets.inc()

    def websocket_closed(self) -> None:
        self.websockets.dec()

    # scrape ------------------------------------------------------------------------

    def render(self) -> bytes:
        """The exposition `GET /metrics` answers, in the text format `CONTENT_TYPE` names:
        the plain-number families written here, then every registered collector."""
        return (self._families.text() + exposition(self.registry.registered())).encode()
