"""A fake of OpenAI's organisation APIs, run as a real HTTP server, for `meter reconcile`.

It speaks the documented shapes of

    GET /v1/organization/usage/completions   ?start_time&end_time&bucket_width=1d&group_by&project_ids&limit&page
    GET /v1/organization/costs               ?start_time&end_time&bucket_width=1d&group_by&project_ids&limit&page
    GET /v1/organization/projects            ?limit&after
    GET /v1/organization/projects/{id}/api_keys   ?limit&after

(`{"object": "page", "data": [buckets], "has_more", "next_page"}` with one bucket
per UTC day from `start_time`, each `{"object": "bucket", "start_time",
"end_time", "results": [...]}`; lists `{"object": "list", "data", "first_id",
"last_id", "has_more"}`), summing its usage over the fields `group_by` does not
name (their values are null, as the real API's are).  It wants
`Authorization: Bearer <the admin key>` (401 otherwise).

Control routes: `PUT /__fake/state` with {"admin_key", "usage": [{day, model,
project_id, api_key_id, service_tier, input_tokens, input_cached_tokens,
output_tokens, num_model_requests}], "costs": [{day, project_id, line_item,
value}], "keys": {project_id: [{id, redacted_value, name}]}, "page_days": N
(buckets per page, at most the request's `limit`), "page_items": N (list items
per page), "rate_limit_once": bool (the next API request gets 429 with
`Retry-After: 1`), "answers": {path: body} (an API path answered 200 with that
JSON body, whatever the query: a provider's malformed or endless answers)};
`GET /__fake/requests` lists {path_qs, status} of every API
request since the last PUT.

Run it with `python -m tests.fake_provider [--host H] [--port P]`: it prints
`READY http://H:<port>` once listening.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

DAY = 86_400
GROUPS = ("model", "project_id", "api_key_id", "service_tier", "batch", "user_id", "line_item")
COUNTS = ("input_tokens", "input_cached_tokens", "output_tokens", "num_model_requests")

_lock = threading.Lock()
STATE: dict[str, Any] = {
    "admin_key": "",
    "usage": [],
    "costs": [],
    "keys": {},
    "page_days": 31,
    "page_items": 100,
    "rate_limit_once": False,
    "answers": {},
}
REQUESTS: list[dict[str, Any]] = []


def _epoch(day: str) -> int:
    return int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp())


def _buckets(items: Iterable[dict[str, Any]], query: dict[str, list[str]], costs: bool) -> dict[str, Any]:
    start = int(query["start_time"][0])
    end = int(query.get("end_time", [str(start + 7 * DAY)])[0])
    group_by = set(query.get("group_by", []))
    projects = set(query.get("project_ids", []))
    limit = min(int(query.get("limit", ["7"])[0]), STATE["page_days"])
    first = int(query.get("page", ["0"])[0] or 0)
    days = list(range(start - start % DAY, end, DAY))
    page = days[first : first + limit]
    data = []
    for day_start in page:
        sums: dict[tuple[Any, ...], dict[str, Any]] = {}
        for item in items:
            if _epoch(item["day"]) != day_start or (projects and item.get("project_id") not in projects):
                continue
            key = tuple(item.get(g) if g in group_by else None for g in GROUPS)
            if costs:
                row = sums.setdefault(key, {"object": "organization.costs.result", "amount": {"value": 0.0, "currency": "usd"}})
                row["amount"]["value"] += float(item["value"])
            else:
                row = sums.setdefault(key, {"object": "organization.usage.completions.result", **{c: 0 for c in COUNTS}})
                for c in COUNTS:
                    row[c] += int(item.get(c, 0))
            for g, v in zip(GROUPS, key):
                if costs and g not in ("project_id", "line_item"):
                    continue
                if not costs and g == "line_item":
                    continue
                row[g] = v
        data.append({"object": "bucket", "start_time": day_start, "end_time": day_start + DAY, "results": list(sums.values())})
    more = first + limit < len(days)
    return {"object": "page", "data": data, "has_more": more, "next_page": str(first + limit) if more else None}


def _list(items: list[dict[str, Any]], query: dict[str, list[str]]) -> dict[str, Any]:
    after = query.get("after", [None])[0]
    start = next((i + 1 for i, x in enumerate(items) if x["id"] == after), 0) if after else 0
    limit = min(int(query.get("limit", ["20"])[0]), STATE["page_items"])
    page = items[start : start + limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + limit < len(items),
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read /__fake/requests
        pass

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        with _lock:
            STATE.update(body)
            REQUESTS.clear()
        self._send(200, {"ok": True})

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/__fake/health":
            return self._send(200, {"ok": True})
        if url.path == "/__fake/requests":
            with _lock:
                return self._send(200, list(REQUESTS))
        with _lock:
            status, body, headers = self._answer(url.path, query)
            REQUESTS.append({"path_qs": self.path, "status": status})
        self._send(status, body, headers)

    def _answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
        if not path.startswith("/v1/organization/"):
            return 404, {"error": {"message": "not found", "type": "invalid_request_error"}}, {}
        if self.headers.get("Authorization") != f"Bearer {STATE['admin_key']}":
            return 401, {"error": {"message": "Invalid authorization header", "type": "invalid_request_error"}}, {}
        if STATE["rate_limit_once"]:
            STATE["rate_limit_once"] = False
            return 429, {"error": {"message": "Rate limit reached", "type": "requests"}}, {"Retry-After": "1"}
        if path in STATE["answers"]:
            return 200, STATE["answers"][path], {}
        if path == "/v1/organization/usage/completions":
            return 200, _buckets(STATE["usage"], query, costs=False), {}
        if path == "/v1/organization/costs":
            return 200, _buckets(STATE["costs"], query, costs=True), {}
        if path == "/v1/organization/projects":
            projects = [{"object": "organization.project", "id": p, "name": p, "status": "active"} for p in STATE["keys"]]
            return 200, _list(projects, query), {}
        parts = path.split("/")
        if len(parts) == 6 and parts[3] == "projects" and parts[5] == "api_keys":
            keys = [{"object": "organization.project.api_key", "created_at": 1730419200, **k} for k in STATE["keys"].get(parts[4], [])]
            return 200, _list(keys, query), {}
        return 404, {"error": {"message": "not found", "type": "invalid_request_error"}}, {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"READY http://{args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
