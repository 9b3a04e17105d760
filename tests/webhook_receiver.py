"""A webhook receiver for the budget alert tests: a real HTTP server in a process of its own.

    python -m tests.webhook_receiver --port 0 [--fail 2] [--status 500] [--delay 0.5] [--stall 30]

prints `READY http://127.0.0.1:PORT` once listening (as `tests.conftest.UpstreamProcess`
expects).  Every `POST` to any other path is recorded when it arrives (path,
headers, body as sent, the JSON it parses to, the status it will get, when) and
answered `200`, or `--status` for the first `--fail` POSTs, each after
`--delay` seconds; with `--stall`, the status line and headers go out at once
and the answer's body only that many seconds later.

- `GET /__received`: every POST so far, as a JSON list, accepted or not;
- `PUT /__mode` with `{"fail": n, "status": s, "delay": d, "stall": t}`: change the answers from now on;
- `DELETE /__received`: forget what was recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from typing import Any

from aiohttp import web


class Receiver:
    def __init__(self, fail: int = 0, status: int = 500, delay: float = 0.0, stall: float = 0.0) -> None:
        self.fail = fail
        self.status = status
        self.delay = delay
        self.stall = stall
        self.received: list[dict[str, Any]] = []

    async def hook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = None
        status = 200
        if self.fail > 0:
            self.fail -= 1
            status = self.status
        # Recorded on arrival (`at`), answered after the delay: a test sees a POST in flight.
        self.received.append(
            {
                "path": request.path_qs,
                "headers": dict(request.headers),
                "body": raw.decode("utf-8", "replace"),
                "json": parsed,
                "status": status,
                "at": time.time(),
            }
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        text = b"ok" if status == 200 else b"failing on purpose"
        if self.stall:
            answer = web.StreamResponse(status=status, headers={"Content-Type": "text/plain", "Content-Length": str(len(text))})
            await answer.prepare(request)  # the status line and headers go out now, the body later
            await asyncio.sleep(self.stall)
            await answer.write(text)
            return answer
        return web.Response(status=status, body=text, content_type="text/plain")

    async def list_received(self, request: web.Request) -> web.Response:
        return web.json_response(self.received)

    async def forget(self, request: web.Request) -> web.Response:
        self.received.clear()
        return web.json_response({"ok": True})

    async def mode(self, request: web.Request) -> web.Response:
        change = await request.json()
        self.fail = int(change.get("fail", self.fail))
        self.status = int(change.get("status", self.status))
        self.delay = float(change.get("delay", self.delay))
        self.stall = float(change.get("stall", self.stall))
        return web.json_response({"fail": self.fail, "status": self.status, "delay": self.delay, "stall": self.stall})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/__received", self.list_received)
        app.router.add_delete("/__received", self.forget)
        app.router.add_put("/__mode", self.mode)
        app.router.add_post("/{tail:.*}", self.hook)
        return app


async def serve(host: str, port: int, receiver: Receiver) -> None:
    sock = socket.socket()
    sock.bind((host, port))
    runner = web.AppRunner(receiver.app(), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    print(f"READY http://{host}:{sock.getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A webhook receiver that records every POST (meter's alert tests).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fail", type=int, default=0, help="answer the first N POSTs with --status")
    parser.add_argument("--status", type=int, default=500)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--stall", type=float, default=0.0, help="seconds between an answer's headers and its body")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port, Receiver(args.fail, args.status, args.delay, args.stall)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
