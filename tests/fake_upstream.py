"""A fake of the OpenAI provider, run as its own process for meter's tests.

It speaks the Responses API (JSON, SSE, background mode, retrieve, cancel,
delete, compact, input_tokens, WebSocket), Chat Completions and Embeddings, and
replays recorded real traffic from `shared/fixtures` on request.  Tests steer it
with request headers:

- `x-fake-fixture: <file>#<i>`   replay that recorded interaction's answer
- `x-fake-usage: {json}`         usage to report (input_tokens, cached_tokens,
  cache_write_tokens, output_tokens, reasoning_tokens, total_tokens, web_search_calls)
- `x-fake-cache-diagnostics: {json}`  `prompt_cache_diagnostics` of the response
- `x-fake-deltas: N`, `x-fake-chunk-delay-ms: MS`, `x-fake-chunk-bytes: N`
- `x-fake-terminal: incomplete|failed`, `x-fake-polls: N` (background)
- `x-fake-delay-ms: MS` before the headers
- `x-fake-scenario`: reset-mid-stream, stall, stall-before-headers, truncated-json,
  non-utf8, no-terminal, big-body, gzip, status:<code>

`GET /__fake/requests` lists what it received (method, path_qs, headers in
order, body_b64); `DELETE` clears the list.  Start: `python -m tests.fake_upstream
--port 0`, which prints `READY http://127.0.0.1:<port>`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import sys
import uuid
import zlib
from collections import deque
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "openai"
if not FIXTURES.exists():
    FIXTURES = Path("/work/shared/fixtures/openai")

CREATED_AT = 1_780_000_000  # fixed, so two identical calls give identical answers
SNAPSHOTS = {"gpt-4o": "gpt-4o-2024-08-06", "gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-5": "gpt-5-2025-08-07"}


def served_tier(asked: Any) -> str:
    if asked in (None, "auto", "default"):
        return "default"
    if asked == "fast":
        return "priority"
    return str(asked)


def error_json(status: int, message: str | None = None, code: str | None = None, kind: str | None = None) -> bytes:
    defaults = {
        400: ("invalid_request_error", None, "Invalid request."),
        401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
        404: ("invalid_request_error", "not_found", "Not found."),
        429: ("rate_limit_exceeded", "rate_limit_exceeded", "Rate limit reached."),
        500: ("server_error", "server_error", "The server had an error while processing your request."),
    }
    d_kind, d_code, d_msg = defaults.get(status, ("server_error", str(status), f"Error {status}."))
    return json.dumps({"error": {"message": message or d_msg, "type": kind or d_kind, "param": None, "code": code if code is not None else d_code}}).encode()


class Usage:
    def __init__(self, forced: dict[str, Any] | None, seed: int) -> None:
        f = forced or {}
        self.input = int(f.get("input_tokens", 10 + seed % 97))
        self.cached = int(f.get("cached_tokens", 0))
        self.cache_write = int(f.get("cache_write_tokens", 0))
        self.output = int(f.get("output_tokens", 5 + seed % 13))
        self.reasoning = int(f.get("reasoning_tokens", 0))
        self.total = int(f.get("total_tokens", self.input + self.output))
        self.web_search = f.get("web_search_calls")

    def responses(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input,
            "input_tokens_details": {"cached_tokens": self.cached, "cache_write_tokens": self.cache_write},
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.total,
        }

    def chat(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.input,
            "completion_tokens": self.output,
            "total_tokens": self.total,
            "prompt_tokens_details": {"cached_tokens": self.cached, "cache_write_tokens": self.cache_write},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning},
        }


def sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'))}\n\n".encode()


class FakeProvider:
    def __init__(self) -> None:
        self.received: deque[dict[str, Any]] = deque(maxlen=10_000)
        self.background: dict[str, dict[str, Any]] = {}  # id -> {response, polls_left, events}

    # --- building answers -----------------------------------------------------

    def response_object(self, req: dict[str, Any], headers: Any, status: str = "completed", rid: str | None = None, usage: Usage | None = None) -> dict[str, Any]:
        rid = rid or "resp_" + uuid.uuid4().hex
        model = req.get("model") if isinstance(req.get("model"), str) else "gpt-4o"
        deltas = int(headers.get("x-fake-deltas", 5))
        text = "".join(f"word{i} " for i in range(deltas))
        final = status in ("completed", "incomplete", "failed")
        obj: dict[str, Any] = {
            "id": rid,
            "object": "response",
            "created_at": CREATED_AT,
            "status": status,
            "background": bool(req.get("background")),
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": SNAPSHOTS.get(model, model),
            "output": [{"id": "msg_" + rid[5:], "type": "message", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}] if final else [],
            "previous_response_id": req.get("previous_response_id"),
            "service_tier": served_tier(req.get("service_tier")) if final else "auto",
            "metadata": req.get("metadata") or {},
            "usage": (usage.responses() if usage else None) if final else None,
        }
        if status == "failed":
            obj["error"] = {"code": "server_error", "message": "The model failed."}
        if final and usage is not None and usage.web_search is not None:
            obj["tool_usage"] = {"web_search": {"num_requests": int(usage.web_search)}}
        diagnostics = headers.get("x-fake-cache-diagnostics")
        if final and diagnostics:
            obj["prompt_cache_diagnostics"] = json.loads(diagnostics)
        return obj

    def stream_events(self, final: dict[str, Any], deltas: int) -> list[bytes]:
        start = {**final, "status": "in_progress", "service_tier": "auto", "usage": None, "output": [], "error": None, "incomplete_details": None}
        if "tool_usage" in start:
            del start["tool_usage"]
        start.pop("prompt_cache_diagnostics", None)
        msg_id = "msg_" + final["id"][5:]
        events = [sse("response.created", {"response": start}), sse("response.in_progress", {"response": start})]
        events.append(sse("response.output_item.added", {"output_index": 0, "item": {"id": msg_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}}))
        events.append(sse("response.content_part.added", {"item_id": msg_id, "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}))
        for i in range(deltas):
            events.append(sse("response.output_text.delta", {"item_id": msg_id, "output_index": 0, "content_index": 0, "delta": f"word{i} "}))
        text = "".join(f"word{i} " for i in range(deltas))
        events.append(sse("response.output_text.done", {"item_id": msg_id, "output_index": 0, "content_index": 0, "text": text}))
        events.append(sse("response.content_part.done", {"item_id": msg_id, "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}}))
        events.append(sse("response.output_item.done", {"output_index": 0, "item": final["output"][0] if final["output"] else {"id": msg_id, "type": "message"}}))
        terminal = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}[final["status"]]
        events.append(sse(terminal, {"response": final}))
        return [e.replace(b'"type"', b'"sequence_number":%d,"type"' % n, 1) for n, e in enumerate(events)]

    # --- HTTP -----------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/__fake/"):
            return await self.control(request)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.websocket(request)
        body = await request.read()
        self.received.append(
            {"method": request.method, "path_qs": request.raw_path, "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers], "body_b64": base64.b64encode(body).decode()}
        )
        headers = request.headers
        delay = headers.get("x-fake-delay-ms")
        if delay:
            await asyncio.sleep(int(delay) / 1000)
        fixture = headers.get("x-fake-fixture")
        if fixture:
            return await self.replay(request, fixture)
        scenario = headers.get("x-fake-scenario", "")
        if scenario:
            answer = await self.scenario(request, scenario, body)
            if answer is not None:
                return answer
        return await self.route(request, body)

    async def control(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/__fake/requests":
            if request.method == "DELETE":
                self.received.clear()
                return web.json_response({"cleared": True})
            return web.json_response(list(self.received))
        return web.json_response({"ok": True})

    async def replay(self, request: web.BaseRequest, fixture: str) -> web.StreamResponse:
        name, _, index = fixture.partition("#")
        inter = json.loads((FIXTURES / name).read_text())["interactions"][int(index or 0)]
        recorded = inter["response"]
        keep = {k: v for k, v in recorded["headers"].items() if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
        body = recorded["body"].encode()
        if not recorded["stream"]:
            return web.Response(status=recorded["status"], body=body, headers=keep)
        return await self.send_stream(request, self.split(body, request.headers), status=recorded["status"], headers=keep)

    @staticmethod
    def split(body: bytes, headers: Any) -> list[bytes]:
        size = headers.get("x-fake-chunk-bytes")
        if size:
            n = max(1, int(size))
            return [body[i : i + n] for i in range(0, len(body), n)]
        parts = body.split(b"\n\n")
        return [p + b"\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])

    async def send_stream(self, request: web.BaseRequest, chunks: list[bytes], status: int = 200, headers: dict[str, str] | None = None, gzipped: bool = False) -> web.StreamResponse:
        delay = int(request.headers.get("x-fake-chunk-delay-ms", 0)) / 1000
        h = {"Content-Type": "text/event-stream; charset=utf-8", "x-request-id": "req_" + uuid.uuid4().hex[:16], "openai-processing-ms": "42"}
        h.update(headers or {})
        if gzipped:
            h["Content-Encoding"] = "gzip"
        resp = web.StreamResponse(status=status, headers=h)
        await resp.prepare(request)
        packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS) if gzipped else None
        for i, chunk in enumerate(chunks):
            if delay and i:
                await asyncio.sleep(delay)
            if packer is not None:
                chunk = packer.compress(chunk) + packer.flush(zlib.Z_SYNC_FLUSH)
            await resp.write(chunk)
        if packer is not None:
            await resp.write(packer.flush())
        await resp.write_eof()
        return resp

    def json_answer(self, obj: dict[str, Any], status: int = 200, gzipped: bool = False) -> web.Response:
        body = json.dumps(obj).encode()
        headers = {"Content-Type": "application/json", "x-request-id": "req_" + uuid.uuid4().hex[:16], "openai-processing-ms": "37"}
        if gzipped:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return web.Response(status=status, body=body, headers=headers)

    async def scenario(self, request: web.BaseRequest, scenario: str, body: bytes) -> web.StreamResponse | None:
        if scenario.startswith("status:"):
            status = int(scenario.split(":", 1)[1])
            return web.Response(status=status, body=error_json(status), content_type="application/json", headers={"x-request-id": "req_err"})
        if scenario == "stall-before-headers":
            await asyncio.sleep(float(request.headers.get("x-fake-stall-s", 3600)))
            return web.Response(status=200)
        if scenario == "stall":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(sse("response.created", {"response": {"id": "resp_stall", "status": "in_progress"}}))
            await asyncio.sleep(float(request.headers.get("x-fake-stall-s", 3600)))
            await resp.write_eof()
            return resp
        if scenario == "reset-mid-stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            final = self.response_object(self.parse(body), request.headers, usage=Usage(None, len(body)))
            for event in self.stream_events(final, 5)[:4]:
                await resp.write(event)
            await asyncio.sleep(0.05)
            if request.transport is not None:
                request.transport.abort()
            return resp
        if scenario == "truncated-json":
            whole = json.dumps(self.response_object(self.parse(body), request.headers, usage=Usage(None, 1))).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(len(whole))})
            await resp.prepare(request)
            await resp.write(whole[: len(whole) // 2])
            await asyncio.sleep(0.05)
            if request.transport is not None:
                request.transport.abort()
            return resp
        if scenario == "non-utf8":
            return web.Response(status=200, body=b'{"id": "resp_bad", "text": "\xff\xfe\xfa"}', headers={"Content-Type": "application/json"})
        if scenario == "no-terminal":
            final = self.response_object(self.parse(body), request.headers, usage=Usage(None, 1))
            return await self.send_stream(request, self.stream_events(final, int(request.headers.get("x-fake-deltas", 5)))[:-1])
        if scenario == "big-body":
            req = self.parse(body)
            obj = self.response_object(req, request.headers, usage=Usage(self.forced(request.headers), len(body)))
            obj["output"][0]["content"][0]["text"] = "x" * (10 * 1024 * 1024)
            return self.json_answer(obj)
        if scenario == "gzip":
            req = self.parse(body)
            obj = self.response_object(req, request.headers, usage=Usage(self.forced(request.headers), len(body)))
            if req.get("stream"):
                return await self.send_stream(request, self.stream_events(obj, int(request.headers.get("x-fake-deltas", 5))), gzipped=True)
            return self.json_answer(obj, gzipped=True)
        return None

    @staticmethod
    def parse(body: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(body) if body else {}
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}

    @staticmethod
    def forced(headers: Any) -> dict[str, Any] | None:
        raw = headers.get("x-fake-usage")
        return json.loads(raw) if raw else None

    async def route(self, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        segments = [s for s in request.path.split("/") if s]
        method = request.method
        if method == "POST" and body and not isinstance(self.parse_strict(body), dict):
            return web.Response(status=400, body=error_json(400, "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly.)"), content_type="application/json")
        req = self.parse(body)
        headers = request.headers
        if segments[-2:] == ["chat", "completions"] and method == "POST":
            return await self.chat(request, req)
        if segments[-1:] == ["embeddings"] and method == "POST":
            usage = Usage(self.forced(headers), len(body))
            return self.json_answer({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}], "model": req.get("model", "text-embedding-3-small"), "usage": {"prompt_tokens": usage.input, "total_tokens": usage.input}})
        if segments[-1:] == ["models"]:
            return self.json_answer({"object": "list", "data": [{"id": m, "object": "model", "created": CREATED_AT, "owned_by": "openai"} for m in ("gpt-4o", "gpt-5", "o3")]})
        if "responses" in segments:
            i = len(segments) - 1 - segments[::-1].index("responses")
            rest = segments[i + 1 :]
            if not rest and method == "POST":
                return await self.create(request, req, body)
            if rest == ["compact"] and method == "POST":
                usage = Usage(self.forced(headers), len(body))
                return self.json_answer({"id": "cmp_" + uuid.uuid4().hex, "object": "response.compaction", "created_at": CREATED_AT, "output": [], "usage": usage.responses()})
            if rest == ["input_tokens"] and method == "POST":
                return self.json_answer({"object": "response.input_tokens", "input_tokens": 10 + len(body) % 97})
            if len(rest) == 1 and method == "GET":
                return await self.retrieve(request, rest[0])
            if len(rest) == 1 and method == "DELETE":
                return self.json_answer({"id": rest[0], "object": "response.deleted", "deleted": True})
            if len(rest) == 2 and rest[1] == "cancel" and method == "POST":
                state = self.background.get(rest[0])
                obj = dict(state["final"]) if state else {"id": rest[0], "object": "response"}
                obj.update(status="cancelled", usage=None)
                return self.json_answer(obj)
        return web.Response(status=404, body=error_json(404, f"Unknown path {request.path}"), content_type="application/json")

    @staticmethod
    def parse_strict(body: bytes) -> Any:
        try:
            return json.loads(body)
        except ValueError:
            return None

    async def create(self, request: web.BaseRequest, req: dict[str, Any], body: bytes) -> web.StreamResponse:
        headers = request.headers
        usage = Usage(self.forced(headers), len(body))
        terminal = headers.get("x-fake-terminal", "completed")
        final = self.response_object(req, headers, status=terminal, usage=usage)
        deltas = int(headers.get("x-fake-deltas", 5))
        if req.get("background"):
            self.background[final["id"]] = {"final": final, "polls": int(headers.get("x-fake-polls", 1)), "deltas": deltas}
            if req.get("stream"):
                events = [e.replace(b'"status":"in_progress"', b'"status":"queued"', 1) if n == 0 else e for n, e in enumerate(self.stream_events(final, deltas))]
                self.background[final["id"]]["polls"] = 0
                return await self.send_stream(request, events)
            queued = self.response_object(req, headers, status="queued", rid=final["id"])
            return self.json_answer(queued)
        if req.get("stream"):
            return await self.send_stream(request, self.stream_events(final, deltas))
        return self.json_answer(final)

    async def retrieve(self, request: web.BaseRequest, rid: str) -> web.StreamResponse:
        state = self.background.get(rid)
        if state is None:
            return web.Response(status=404, body=error_json(404, f"Response with id '{rid}' not found."), content_type="application/json")
        final = state["final"]
        if request.query.get("stream") == "true":
            after = int(request.query.get("starting_after", -1))
            events = self.stream_events(final, state["deltas"])
            state["polls"] = 0
            return await self.send_stream(request, events[after + 1 :])
        if state["polls"] > 0:
            state["polls"] -= 1
            return self.json_answer({**final, "status": "in_progress", "usage": None, "output": [], "service_tier": "auto"})
        return self.json_answer(final)

    async def chat(self, request: web.BaseRequest, req: dict[str, Any]) -> web.StreamResponse:
        headers = request.headers
        usage = Usage(self.forced(headers), len(json.dumps(req)))
        model = SNAPSHOTS.get(req.get("model", "gpt-4o-mini"), req.get("model", "gpt-4o-mini"))
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        tier = served_tier(req.get("service_tier"))
        deltas = int(headers.get("x-fake-deltas", 5))
        words = [f"word{i} " for i in range(deltas)]
        if not req.get("stream"):
            return self.json_answer(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": CREATED_AT,
                    "model": model,
                    "service_tier": tier,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}],
                    "usage": usage.chat(),
                }
            )
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        base = {"id": cid, "object": "chat.completion.chunk", "created": CREATED_AT, "model": model, "service_tier": tier}

        def chunk(choices: list[dict[str, Any]], usage_block: Any = None) -> bytes:
            obj = {**base, "choices": choices}
            if include_usage:
                obj["usage"] = usage_block
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        chunks = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
        chunks += [chunk([{"index": 0, "delta": {"content": w}, "finish_reason": None}]) for w in words]
        chunks.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if include_usage:
            chunks.append(chunk([], usage.chat()))
        chunks.append(b"data: [DONE]\n\n")
        return await self.send_stream(request, chunks)

    # --- WebSocket --------------------------------------------------------------

    async def websocket(self, request: web.BaseRequest) -> web.StreamResponse:
        refuse = request.headers.get("x-fake-ws-refuse")
        if refuse:
            status = int(refuse)
            return web.Response(status=status, body=error_json(status), content_type="application/json")
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        ws = web.WebSocketResponse(protocols=offered[:1], max_msg_size=0)
        await ws.prepare(request)
        headers = request.headers
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
                continue
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                event = json.loads(msg.data)
            except ValueError:
                await ws.send_str(json.dumps({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_json", "message": "Invalid JSON"}}))
                continue
            if event.get("type") != "response.create":
                continue
            if await self.ws_response(ws, event, headers):
                break
        return ws

    async def ws_response(self, ws: web.WebSocketResponse, event: dict[str, Any], headers: Any) -> bool:
        """Answer one response.create; True when the socket was closed or dropped."""
        req = {k: v for k, v in event.items() if k != "type"}
        if isinstance(event.get("response"), dict):  # the nested form
            req.update(event["response"])
        metadata = req.get("metadata") or {}
        action = metadata.get("fake_action")
        stream_id = event.get("stream_id")
        forced = metadata.get("fake_usage") or self.forced(headers)
        usage = Usage(forced, len(json.dumps(req)))
        delay = int(headers.get("x-fake-chunk-delay-ms", 0)) / 1000
        if req.get("generate") is False:
            final = self.response_object(req, headers, usage=None)
            final["output"] = []
            events = [sse("response.created", {"response": {**final, "status": "in_progress", "service_tier": "auto"}}), sse("response.completed", {"response": final})]
        else:
            final = self.response_object(req, headers, usage=usage)
            events = self.stream_events(final, int(headers.get("x-fake-deltas", 5)))
        if action == "error":
            await ws.send_str(json.dumps({"type": "error", **({"stream_id": stream_id} if stream_id else {}), "error": {"type": "invalid_request_error", "code": "bad_thing", "message": "Something was wrong."}}))
            return False
        for n, raw in enumerate(events):
            text = raw.split(b"data: ", 1)[1].rstrip(b"\n").decode()
            if stream_id is not None:
                text = text[:-1] + f',"stream_id":{json.dumps(stream_id)}}}'
            if action in ("drop", "close") and n == 6:
                if action == "close":
                    await ws.close(code=1011, message=b"fake close")
                elif ws._req is not None and ws._req.transport is not None:  # noqa: SLF001
                    ws._req.transport.abort()  # noqa: SLF001
                return True
            if delay and n:
                await asyncio.sleep(delay)
            await ws.send_str(text)
        return False


async def start_fake(host: str = "127.0.0.1", port: int = 0) -> tuple[web.BaseRunner, str]:
    provider = FakeProvider()
    server = web.Server(provider.handle, access_log=None, max_field_size=65536, max_line_size=65536)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    sockets = site._server.sockets  # type: ignore[union-attr]  # noqa: SLF001
    bound = sockets[0].getsockname()[1]
    return runner, f"http://{host}:{bound}"


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI provider for meter's tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    async def run() -> None:
        _, url = await start_fake(args.host, args.port)
        print(f"READY {url}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
