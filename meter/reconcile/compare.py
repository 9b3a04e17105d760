"""Meter's groups beside the provider's, and a verdict for each: pure but for the two reads.

`reconcile(store, provider, since, until, by, tolerance)` sums meter's ledger
with the report query (`meter.report.query.report`) and the provider's daily
usage (and, grouped by day and project only, its costs: the Costs API has no
model, key or tier), joins them per group and gives each a verdict:

- `match`: every number agrees within `tolerance` (a fraction: 0.01 is 1%);
- `meter_missing`: the provider saw traffic meter did not (it bypassed the proxy);
- `provider_missing`: meter saw traffic the provider does not report;
- `differs`: both saw it and a number disagrees.

Days are UTC, as the provider's buckets are; a request is in the day its
`started_at` falls in.  meter's side counts what the completions usage counts:
requests of the Responses, Chat Completions and compaction endpoints that did
not fail, and their tokens; cost is every priced row.  Keys are joined honestly: the provider's `api_key_id`
becomes the `sk-...` hint of its redacted value's last four characters (from
the project API-key listing), which is what meter stores as `key_hint`.  A
provider key absent from every listing is `unmapped:<api_key_id>`; a hint two
provider keys or two meter keys share is `ambiguous:<hint>`, never one of them.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from ..ledger import Store
from ..report.query import report
from ..report.window import ReportArgs

BY_FIELDS = ("day", "model", "project", "key", "tier")
VERDICTS = ("match", "meter_missing", "provider_missing", "differs")
NUMBERS = ("requests", "input_tokens", "cached_tokens", "output_tokens", "cost_usd")
# The provider's completions usage counts a model request once, where meter records it
# (Responses, Chat Completions, compaction), and its tokens wherever meter found them
# (a background response's usage may come with a retrieve); embeddings have their own
# usage API, and a failed request (meter's `errors`) is not a model request.
REQUEST_ENDPOINTS = frozenset({"responses", "chat.completions", "responses.compact"})
TOKEN_ENDPOINTS = REQUEST_ENDPOINTS | {"responses.retrieve", "responses.cancel"}
# meter's field -> the provider's group_by / result field
_PROVIDER_FIELD = {"model": "model", "project": "project_id", "key": "api_key_id", "tier": "service_tier"}


class Provider(Protocol):
    """What `reconcile` reads of the provider (`ProviderClient`)."""

    def usage(
        self, since: dt.datetime, until: dt.datetime, group_by: list[str], project_ids: Sequence[str] = ()
    ) -> list[dict[str, Any]]: ...

    def costs(
        self, since: dt.datetime, until: dt.datetime, group_by: list[str], project_ids: Sequence[str] = ()
    ) -> list[dict[str, Any]]: ...

    def projects(self) -> list[str]: ...

    def api_keys(self, project_id: str) -> dict[str, str]: ...


@dataclass
class Totals:
    """One side's numbers for a group; `cost_usd` None when that side has no cost for it."""

    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal | None = None

    def add_cost(self, value: Decimal) -> None:
        self.cost_usd = value if self.cost_usd is None else self.cost_usd + value


@dataclass
class Group:
    """One group (`values` in the order of `by`), both sides, the verdict and why."""

    values: tuple[str | None, ...]
    meter: Totals | None
    provider: Totals | None
    verdict: str
    differing: list[str] = field(default_factory=list)


@dataclass
class Reconciliation:
    by: list[str]
    since: dt.datetime
    until: dt.datetime
    groups: list[Group]
    notes: list[str] = field(default_factory=list)  # ambiguous or unmapped keys, costs not compared

    @property
    def ok(self) -> bool:
        return all(g.verdict == "match" for g in self.groups)

    def counts(self) -> dict[str, int]:
        found = Counter(g.verdict for g in self.groups)
        return {v: found.get(v, 0) for v in VERDICTS}


def hint_of(redacted: str) -> str | None:
    """meter's key_hint for a provider's redacted key value (its last four characters)."""
    tail = redacted.strip()[-4:]
    return "sk-..." + tail if len(tail) == 4 and "*" not in tail and "." not in tail else None


def key_labels(provider: Provider, project_ids: Iterable[str]) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """api_key_id -> the label its usage is grouped under (a hint, or `ambiguous:<hint>`),
    notes, and hint -> the project of the one provider key with that hint."""
    hints: dict[str, str | None] = {}
    projects: dict[str, str] = {}
    for project in dict.fromkeys(project_ids):
        for key_id, redacted in provider.api_keys(project).items():
            hints[key_id] = hint_of(redacted)
            projects[key_id] = project
    shared = Counter(h for h in hints.values() if h)
    labels: dict[str, str] = {}
    notes: list[str] = []
    for key_id, hint in sorted(hints.items()):
        if hint is None:
            labels[key_id] = f"unmapped:{key_id}"
            notes.append(f"provider key {key_id}: its redacted value shows no last four characters; not matched")
        elif shared[hint] > 1:
            labels[key_id] = f"ambiguous:{hint}"
            notes.append(f"provider key {key_id}: {shared[hint]} provider keys end in {hint}; not matched to any meter key")
        else:
            labels[key_id] = hint
    key_project = {hint: projects[key_id] for key_id, hint in hints.items() if hint and shared[hint] == 1}
    return labels, notes, key_project


def within(a: int | Decimal, b: int | Decimal, tolerance: float) -> bool:
    return abs(Decimal(a) - Decimal(b)) <= Decimal(str(tolerance)) * max(abs(Decimal(a)), abs(Decimal(b)))


def verdict(meter: Totals | None, provider: Totals | None, tolerance: float) -> tuple[str, list[str]]:
    if meter is None:
        return "meter_missing", []
    if provider is None:
        return "provider_missing", []
    differing = []
    for name in NUMBERS:
        a, b = getattr(meter, name), getattr(provider, name)
        if a is None or b is None:
            continue  # a cost only one side has is not compared
        if not within(a, b, tolerance):
            differing.append(name)
    return ("differs" if differing else "match"), differing


def reconcile(
    store: Store,
    provider: Provider,
    since: dt.datetime,
    until: dt.datetime,
    by: Sequence[str],
    tolerance: float = 0.0,
    project_ids: Sequence[str] = (),
) -> Reconciliation:
    """meter's ledger `store` beside `provider` over [since, until) (UTC), grouped `by`
    a subset of `BY_FIELDS`, each group with its verdict; `project_ids` limits both sides."""
    rows = report(store, ReportArgs(by=meter_by(by, project_ids), since=since, until=until))
    return compare(rows, provider, since, until, by, tolerance, project_ids)


def meter_by(by: Sequence[str], project_ids: Sequence[str] = ()) -> list[str]:
    """The report grouping meter's side needs: its endpoint (only completions are in the
    provider's completions usage), and its project and key when projects matter."""
    extra = ["endpoint"]
    if "project" in by or project_ids:
        extra += [f for f in ("project", "key") if f not in by]  # the key tells a request's project without the header
    return list(by) + extra


def compare(
    rows: Sequence[Mapping[str, Any]],
    provider: Provider,
    since: dt.datetime,
    until: dt.datetime,
    by: Sequence[str],
    tolerance: float = 0.0,
    project_ids: Sequence[str] = (),
) -> Reconciliation:
    """`reconcile` over meter's report `rows` (grouped `meter_by(by, project_ids)`), from
    a ledger or a running meter's admin API alike."""
    by = list(by)
    notes: list[str] = []
    meter_groups: dict[tuple[str | None, ...], Totals] = {}
    group_by = [_PROVIDER_FIELD[f] for f in by if f in _PROVIDER_FIELD]
    if "key" in by and "project_id" not in group_by:
        group_by.append("project_id")  # the key listing is per project
    results = provider.usage(since, until, group_by, project_ids)
    labels: dict[str, str] = {}
    key_project: dict[str, str] = {}
    if "key" in by or "project" in by or project_ids:
        # every project's keys (not only those with usage), so that two keys sharing a
        # last four anywhere in the organisation are seen as ambiguous; a request sent
        # without an OpenAI-Project header is in the project of its (project) key
        listed = list(project_ids) or provider.projects()
        labels, key_notes, key_project = key_labels(provider, listed + [r["project_id"] for r in results if r.get("project_id")])
        notes += key_notes if "key" in by else []
    meter_keys: dict[str, set[str]] = {}
    for row in rows:
        if "key" in by and row["key_hint"]:
            meter_keys.setdefault(row["key_hint"], set()).add(str(row["key"]))
    shared = {hint for hint, keys in meter_keys.items() if len(keys) > 1}
    for row in rows:
        project = row.get("project") or key_project.get(row.get("key_hint") or "")
        if project_ids and project not in project_ids:
            continue
        endpoint = row.get("endpoint")
        tokens = endpoint in TOKEN_ENDPOINTS
        requests = int(row["requests"]) - int(row["errors"]) if endpoint in REQUEST_ENDPOINTS else 0
        if not (tokens or requests or row["cost_usd"]):
            continue  # a model list, a refused call: nothing the provider counts
        key = tuple(_meter_key(row, shared) if f == "key" else project if f == "project" else row[f] for f in by)
        t = meter_groups.setdefault(key, Totals())
        t.requests += requests
        if tokens:
            t.input_tokens += int(row["input_tokens"])
            t.cached_tokens += int(row["cached_tokens"])
            t.output_tokens += int(row["output_tokens"])
        if row["cost_usd"] is not None:
            t.add_cost(Decimal(row["cost_usd"]))  # the Costs API holds every line item

    provider_groups: dict[tuple[str | None, ...], Totals] = {}
    for r in results:
        key = tuple(_provider_value(r, f, labels, shared) for f in by)
        t = provider_groups.setdefault(key, Totals())
        t.requests += int(r.get("num_model_requests") or 0)
        t.input_tokens += int(r.get("input_tokens") or 0)
        t.cached_tokens += int(r.get("input_cached_tokens") or 0)
        t.output_tokens += int(r.get("output_tokens") or 0)
    if set(by) <= {"day", "project"}:
        for c in provider.costs(since, until, ["project_id"] if "project" in by else [], project_ids):
            key = tuple(_provider_value(c, f, labels, shared) for f in by)
            value = Decimal(str((c.get("amount") or {}).get("value") or 0))
            provider_groups.setdefault(key, Totals()).add_cost(value)
    else:
        notes.append("costs are compared by day and project only (the Costs API has no model, key or tier)")
    for hint in sorted(shared):
        notes.append(f"meter keys {', '.join(sorted(meter_keys[hint]))} share the hint {hint}: compared together as ambiguous:{hint}")
    unmapped = sorted({str(r["api_key_id"]) for r in results if "key" in by and r.get("api_key_id") and r["api_key_id"] not in labels})
    notes += [f"provider key {k}: in no project's API-key listing; not matched" for k in unmapped]
    groups = []
    for key in sorted(set(meter_groups) | set(provider_groups), key=lambda k: tuple("" if v is None else str(v) for v in k)):
        m, p = meter_groups.get(key), provider_groups.get(key)
        if p is not None and p.requests == 0 and p.input_tokens == 0 and m is None and not p.cost_usd:
            continue  # an empty provider bucket is not traffic
        v, differing = verdict(m, p, tolerance)
        groups.append(Group(key, m, p, v, differing))
    return Reconciliation(by, since, until, groups, notes)


def _meter_key(row: Mapping[str, Any], shared: AbstractSet[str]) -> str | None:
    hint = row["key_hint"]
    return f"ambiguous:{hint}" if hint in shared else hint


def _provider_value(result: Mapping[str, Any], name: str, labels: Mapping[str, str], shared: AbstractSet[str] = frozenset()) -> str | None:
    if name == "day":
        return str(result["day"])
    value = result.get(_PROVIDER_FIELD[name])
    if name == "key" and value is not None:
        label = labels.get(value, f"unmapped:{value}")
        return f"ambiguous:{label}" if label in shared else label
    return None if value is None else str(value)
