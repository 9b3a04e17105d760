"""The provider's organisation APIs, read with an admin key: usage, costs, project API keys.

OpenAI's `GET /v1/organization/usage/completions` (buckets of `results` with
`input_tokens`, `input_cached_tokens`, `output_tokens`, `num_model_requests`
and the `group_by` fields), `GET /v1/organization/costs` (`amount.value` per
bucket, `project_id`) and `GET /v1/organization/projects/{id}/api_keys`
(`id`, `redacted_value`).  Pages are followed to the end (`has_more` with
`next_page` for usage and costs, `last_id` as `after` for lists); a 429 waits
its `Retry-After` (else a doubling backoff) and tries again.  An answer is
checked against those shapes as it is read (lists of objects, whole-number
counts, finite amounts, text group values, a cursor that is text): anything
else is a `ProviderError`, one line, as are pages that do not end (a cursor
given again, or past `MAX_PAGES`), which would otherwise be asked for ever.  The admin key
goes into the Authorization header only: never into a message or a log, and
never to another host, as urllib's redirects would send it (`meter.outbound`
refuses them).
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any

from ..bounds import short_key
from ..config import redact_url
from ..outbound import RedirectRefused, fetch

RETRIES = 5
TIMEOUT = 30.0  # each wait on the socket
# One page of usage or costs, as a whole: far past any real page (a month of daily
# buckets grouped by model, project, key and tier), short of what could hurt the
# process that serves when it reconciles (`--reconcile-every`).
PAGE_MAX_BYTES = 64 << 20
PAGE_WAITS = 10  # a page as a whole within this many socket waits (300 s by default)
# Pages of one listing: a year of daily buckets is 12, an organisation's keys 100 a page.
MAX_PAGES = 10_000
# What compare reads of a usage result: the counts, and the group_by values it joins on.
USAGE_COUNTS = ("input_tokens", "input_cached_tokens", "output_tokens", "num_model_requests")
GROUP_VALUES = ("model", "project_id", "api_key_id", "service_tier")


class ProviderError(Exception):
    """The provider could not be read: one line, never holding the admin key."""


class ProviderClient:
    """A reader of one provider's organisation APIs at `base_url` (the `--upstream`)."""

    def __init__(self, base_url: str, admin_key: str, *, sleep: Callable[[float], None] = time.sleep, timeout: float = TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.shown_url = redact_url(self.base_url)  # in errors: a gateway's URL may hold a password
        self._key = admin_key
        self._sleep = sleep
        self._timeout = timeout
        self.retried = 0  # 429s waited out, for the caller to report

    def _get(self, path: str, query: list[tuple[str, str]]) -> dict[str, Any]:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(query)}" if query else f"{self.base_url}{path}"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self._key}", "Accept": "application/json"})
        delay = 1.0
        for attempt in range(RETRIES + 1):
            try:
                raw, _ = fetch(request, self._timeout, max_bytes=PAGE_MAX_BYTES, within=PAGE_WAITS * self._timeout)
                body = json.loads(raw.decode("utf-8"))
                if not isinstance(body, dict):
                    raise ProviderError(f"{path}: the answer is not a JSON object")
                return body
            except RedirectRefused as exc:
                raise ProviderError(f"{path}: {self.shown_url} {exc}") from None
            except urllib.error.HTTPError as exc:
                if exc.code == 429 and attempt < RETRIES:
                    self.retried += 1
                    self._sleep(_retry_after(exc.headers.get("Retry-After"), delay))
                    delay *= 2
                    continue
                if exc.code == 404:
                    raise ProviderError(
                        f"{self.shown_url} has no organisation usage API ({path} answered 404); reconcile works with OpenAI's API only"
                    ) from None
                if exc.code in (401, 403):
                    raise ProviderError(f"{path}: the provider refused the admin key (HTTP {exc.code})") from None
                raise ProviderError(f"{path}: HTTP {exc.code}") from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise ProviderError(f"cannot reach {self.shown_url}: {reason}") from None
            except ValueError:
                raise ProviderError(f"{path}: the answer is not JSON") from None
        raise ProviderError(f"{path}: still rate limited after {RETRIES} retries")

    def _buckets(self, path: str, query: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        cursors = _Cursors(path)
        page: str | None = None
        while True:
            body = self._get(path, query + ([("page", page)] if page else []))
            yield from _objects(path, body.get("data"), "data")
            page = cursors.next(body.get("has_more"), body.get("next_page"))
            if page is None:
                return

    def usage(self, since: dt.datetime, until: dt.datetime, group_by: list[str], project_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Daily completions usage results, each with its bucket's `start_time` as `day` (YYYY-MM-DD, UTC)."""
        path = "/organization/usage/completions"
        query = _window(since, until) + [("group_by", g) for g in group_by] + [("project_ids", p) for p in project_ids]
        return _flatten(path, self._buckets(path, query), _check_usage)

    def costs(self, since: dt.datetime, until: dt.datetime, group_by: list[str], project_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Daily cost results (`amount.value` in USD), each with `day`."""
        path = "/organization/costs"
        query = _window(since, until) + [("group_by", g) for g in group_by] + [("project_ids", p) for p in project_ids]
        return _flatten(path, self._buckets(path, query), _check_cost)

    def _list(self, path: str) -> Iterator[dict[str, Any]]:
        cursors = _Cursors(path)
        after: str | None = None
        while True:
            body = self._get(path, [("limit", "100")] + ([("after", after)] if after else []))
            data = _objects(path, body.get("data"), "data")
            yield from data
            after = cursors.next(body.get("has_more"), body.get("last_id") or (data[-1].get("id") if data else None))
            if after is None:
                return

    def projects(self) -> list[str]:
        """Every project id of the organisation."""
        return [p["id"] for p in self._list("/organization/projects") if isinstance(p.get("id"), str)]

    def api_keys(self, project_id: str) -> dict[str, str]:
        """api_key_id -> its redacted value, for one project."""
        path = f"/organization/projects/{urllib.parse.quote(project_id, safe='')}/api_keys"
        return {k["id"]: str(k.get("redacted_value") or "") for k in self._list(path) if isinstance(k.get("id"), str)}


def _retry_after(value: str | None, fallback: float) -> float:
    try:
        return max(0.0, min(float(value), 60.0)) if value else fallback
    except ValueError:
        return fallback


def _window(since: dt.datetime, until: dt.datetime) -> list[tuple[str, str]]:
    return [("start_time", str(int(since.timestamp()))), ("end_time", str(int(until.timestamp()))), ("bucket_width", "1d"), ("limit", "31")]


def _shape(path: str, what: str) -> ProviderError:
    return ProviderError(f"{path}: the answer is not in the documented shape ({what})")


def _objects(path: str, value: Any, what: str) -> list[dict[str, Any]]:
    """A list of JSON objects (absent: none)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise _shape(path, f"{what} is not a list of objects")
    return value


class _Cursors:
    """The cursors one listing is paged with: each is text, new, and there are at most
    `MAX_PAGES` of them.  A provider that hands back a cursor it gave before, or never
    stops, would be asked for ever, its pages held in memory meanwhile."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: set[str] = set()

    def next(self, has_more: Any, cursor: Any) -> str | None:
        """The cursor of the next page, None when this page is the last."""
        if not has_more or cursor is None or cursor == "":
            return None
        if not isinstance(cursor, str):
            raise _shape(self.path, "its page cursor is not text")
        key = short_key(cursor)  # what is kept of it: a long cursor as its digest
        if key in self.seen:
            raise ProviderError(f"{self.path}: the pages do not end (a page cursor came again)")
        if len(self.seen) >= MAX_PAGES:
            raise ProviderError(f"{self.path}: the pages do not end (more than {MAX_PAGES})")
        self.seen.add(key)
        return cursor


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_usage(path: str, result: dict[str, Any]) -> None:
    for name in USAGE_COUNTS:
        if result.get(name) is not None and not _is_int(result[name]):
            raise _shape(path, f"{name} is not a whole number")
    for name in GROUP_VALUES:
        if result.get(name) is not None and not isinstance(result[name], str):
            raise _shape(path, f"{name} is not text")


def _check_cost(path: str, result: dict[str, Any]) -> None:
    if result.get("project_id") is not None and not isinstance(result["project_id"], str):
        raise _shape(path, "project_id is not text")
    amount = result.get("amount")
    if amount is None:
        return
    if not isinstance(amount, dict):
        raise _shape(path, "amount is not an object")
    value = amount.get("value")
    if value is None:
        return
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float, str)) and Decimal(str(value)).is_finite()
    except ArithmeticError:  # a string that is no number
        finite = False
    if not finite:
        raise _shape(path, "amount.value is not a number")


def _flatten(path: str, buckets: Iterator[dict[str, Any]], check: Callable[[str, dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Every bucket's results, each checked by `check` and given its bucket's UTC `day`."""
    rows = []
    for bucket in buckets:
        start = bucket.get("start_time", 0)
        try:
            if not _is_int(start):
                raise ValueError(start)
            day = dt.datetime.fromtimestamp(start, dt.UTC).strftime("%Y-%m-%d")
        except (ValueError, OverflowError, OSError):
            raise _shape(path, "a bucket's start_time is not a time in seconds") from None
        for result in _objects(path, bucket.get("results"), "a bucket's results"):
            check(path, result)
            rows.append({**result, "day": day})
    return rows
