"""The provider's organisation APIs, read with an admin key: usage, costs, project API keys.

OpenAI's `GET /v1/organization/usage/completions` (buckets of `results` with
`input_tokens`, `input_cached_tokens`, `output_tokens`, `num_model_requests`
and the `group_by` fields), `GET /v1/organization/costs` (`amount.value` per
bucket, `project_id`) and `GET /v1/organization/projects/{id}/api_keys`
(`id`, `redacted_value`).  Pages are followed to the end (`has_more` with
`next_page` for usage and costs, `last_id` as `after` for lists); a 429 waits
its `Retry-After` (else a doubling backoff) and tries again.  The admin key
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
from typing import Any

from ..config import redact_url
from ..outbound import RedirectRefused, fetch

RETRIES = 5
TIMEOUT = 30.0


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
                raw, _ = fetch(request, self._timeout)
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
        page: str | None = None
        while True:
            body = self._get(path, query + ([("page", page)] if page else []))
            yield from body.get("data") or []
            page = body.get("next_page")
            if not body.get("has_more") or not page:
                return

    def usage(self, since: dt.datetime, until: dt.datetime, group_by: list[str], project_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Daily completions usage results, each with its bucket's `start_time` as `day` (YYYY-MM-DD, UTC)."""
        query = _window(since, until) + [("group_by", g) for g in group_by] + [("project_ids", p) for p in project_ids]
        return _flatten(self._buckets("/organization/usage/completions", query))

    def costs(self, since: dt.datetime, until: dt.datetime, group_by: list[str], project_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Daily cost results (`amount.value` in USD), each with `day`."""
        query = _window(since, until) + [("group_by", g) for g in group_by] + [("project_ids", p) for p in project_ids]
        return _flatten(self._buckets("/organization/costs", query))

    def _list(self, path: str) -> Iterator[dict[str, Any]]:
        after: str | None = None
        while True:
            body = self._get(path, [("limit", "100")] + ([("after", after)] if after else []))
            data = body.get("data") or []
            yield from data
            after = body.get("last_id") or (data[-1].get("id") if data else None)
            if not body.get("has_more") or not after:
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


def _flatten(buckets: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for bucket in buckets:
        day = dt.datetime.fromtimestamp(int(bucket.get("start_time", 0)), dt.UTC).strftime("%Y-%m-%d")
        rows += [{**result, "day": day} for result in bucket.get("results") or []]
    return rows
