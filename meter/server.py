"""Assembly: settings in, a running meter out.

Builds the shared upstream session, the addon list (`default_addons`:
enrichers first, then the sinks) and its registry, the proxy port and the
separate admin app (probes, `/metrics`, `/api/report`; behind a bearer token
when one is set, and never off loopback without one: meter/admin.py), and owns
the shutdown order: stop accepting, let in-flight requests finish within the
grace period, then flush every record.  A start-up that fails part-way (an
addon that cannot start, such as an unusable ledger) releases what it had
bound and stops what it had started before the error reaches the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from .access_log import AccessLog
from .admin import bearer_auth, check_admin_exposure, is_loopback_host, loopback_hosts_only, same_origin_only
from .attribution import SessionChains
from .budgets.alerts import Alerter, AlertMetrics
from .budgets.command import budget_rows_json
from .budgets.gate import BudgetGate
from .budgets.metrics import BudgetMetrics
from .budgets.spend import Budgets
from .budgets.sync import BudgetSync
from .config import Settings, StartupError, parse_host_port, redact_url, upstream_path_warning
from .console import Console
from .enrich import CountUsageOnce, Pricing
from .exposition import CONTENT_TYPE
from .flow import Addons
from .identity import KeyIdentities
from .ledger import LedgerWriter, Store, store_for
from .metrics import LedgerMetrics, Metrics
from .prices import Pricer
from .proxy import Proxy
from .reconcile.schedule import ReconcileMetrics, ReconcileSchedule, RunSummary, scheduled_run
from .report import ReportAPI
from .report.sql_api import SqlAPI
from .runtime import settle_after_start
from .websocket import WebSocketRelay

if TYPE_CHECKING:
    from .otel_metrics import OtelMetrics
    from .tracing import Tracing

log = logging.getLogger("meter")


HEADER_LIMIT = 64 * 1024

# Seconds a request handler still running after the shutdown grace period gets once
# cancelled (see `Meter.start`).
HANDLER_CANCEL_WAIT = 1.0


def make_session(settings: Settings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout, sock_read=settings.upstream_timeout)
    # auto_decompress=False: the client gets the upstream's bytes, compressed or not.
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        max_line_size=HEADER_LIMIT,
        max_field_size=HEADER_LIMIT,
    )


def default_addons(
    pricer: Pricer,
    metrics: Metrics,
    tracing: Tracing | None,
    ledger: LedgerWriter,
    extra: Iterable[object] = (),
    otel_metrics: OtelMetrics | None = None,
    budgets: tuple[BudgetGate, BudgetSync] | None = None,
    access_log: AccessLog | None = None,
) -> list[object]:
    """A meter's addons in the order their hooks run (`meter.flow.HOOKS`).

    Enrichers first (usage once, prices), then the sinks; the ledger last, so a
    record is queued only when every other addon has seen (and completed) it.
    Budgets: the gate just before the ledger (it counts priced records and marks
    their ids before the writer sees them), the sync just after it (its first
    read needs the ledger open, before the first request is admitted).
    """
    # SessionChains first: a chain's session is settled before any sink sees the record.
    addons: list[object] = [SessionChains(), CountUsageOnce(), Pricing(pricer), metrics]
    if tracing is not None:
        addons.append(tracing)
    if otel_metrics is not None:
        addons.append(otel_metrics)
    if access_log is not None:
        addons.append(access_log)
    if budgets is None:
        return [*addons, *extra, ledger]
    gate, sync = budgets
    return [*addons, *extra, gate, ledger, sync]


def telemetry_from_env(settings: Settings) -> tuple[OtelMetrics | None, Tracing | None]:
    """The OpenTelemetry metrics and tracing addons the `OTEL_*` environment asks for.

    Both are off unless some `OTEL_*` variable is set; only then is OpenTelemetry's SDK
    imported (about 5 MiB of a proxy that exports nothing).  Metrics first: a bad
    metrics variable stops start-up before the tracer's thread starts.
    """
    if not any(name.startswith("OTEL_") for name in os.environ):
        return None, None
    from .otel_metrics import otel_metrics_from_env
    from .tracing import tracing_from_env

    return otel_metrics_from_env(settings), tracing_from_env(settings)


def _bind(address: str, setting: str) -> socket.socket:
    host, port = parse_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"{setting}: cannot listen on {address}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Meter:
    """A running meter: `await start()`, then `await stop()` (or `run()` until SIGTERM)."""

    def __init__(
        self, settings: Settings, *, extra_addons: list[Any] | None = None, store: Store | None = None,
        reconcile_run: Callable[[], RunSummary] | None = None,
    ) -> None:
        self.settings = settings
        self.identities = KeyIdentities(settings.keys)
        self.store = store or store_for(settings)
        self.ledger = LedgerWriter(
            self.store,
            flush_interval=settings.flush_interval,
            max_pending=settings.ledger_max_pending,
            spool_path=settings.spool_path(),
        )
        try:
            self.pricer = Pricer(provider_id=settings.price_provider, upstream_url=settings.upstream, overrides=settings.price_overrides)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.extra_addons = extra_addons or []
        # --reconcile-every: the blocking run (a test may give its own), scheduled off the request path.
        self.reconcile: ReconcileSchedule | None = None
        if settings.reconcile_every is not None:
            run = reconcile_run or scheduled_run(
                settings.upstream, self.store, admin_key_env=settings.reconcile.admin_key_env,
                project_ids=settings.reconcile.projects, tolerance=settings.reconcile.tolerance,
            )
            self.reconcile = ReconcileSchedule(run, settings.reconcile_every)
        # Budget state outlives start/stop; an alerter is given by assigning `budgets.alerter`.
        self.budgets = Budgets(settings.budgets, settings.keys)
        # Budget alerts leave through the alerter: claimed in the ledger, POSTed off the request path.
        self.alerter = self.budgets.alerter = Alerter(self.store, settings.alerts.webhooks)
        self.metrics: Metrics | None = None
        self.tracing: Tracing | None = None
        self.otel_metrics: OtelMetrics | None = None
        self.report_api: ReportAPI | None = None
        self.websocket_relay: WebSocketRelay | None = None
        self.addons: Addons | None = None
        self.session: aiohttp.ClientSession | None = None
        self.proxy: Proxy | None = None
        self._proxy_runner: web.BaseRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._proxy_site: web.SockSite | None = None
        self.proxy_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.accepting = False

    def build_admin_app(self, report_api: ReportAPI) -> web.Application:
        # With a token, every admin path but the probes needs it (meter/admin.py).
        token = self.settings.admin_token
        # Without a token an admin port is on loopback (or --admin-insecure): on loopback,
        # only requests addressed to it are answered (DNS rebinding: `loopback_hosts_only`);
        # either way none a browser sent for another origin's page (`same_origin_only`).
        if token:
            guards = [bearer_auth(token)]
        elif is_loopback_host(parse_host_port(self.settings.admin_listen)[0]):
            guards = [loopback_hosts_only(), same_origin_only()]
        else:
            guards = [same_origin_only()]
        app = web.Application(middlewares=guards)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/budgets", self._budgets)
        report_api.admin_routes(app)
        SqlAPI(self.store, self.ledger).admin_routes(app)
        Console(report_api, token_required=bool(token)).admin_routes(app)  # `/`: the web console
        return app

    def build_websocket_relay(self, addons: Addons) -> WebSocketRelay:
        assert self.session is not None
        return WebSocketRelay(
            self.settings.upstream,
            self.session,
            addons,
            self.identities,
            max_message_bytes=self.settings.max_request_bytes,
            max_metered_bytes=self.settings.max_metered_bytes,
        )

    async def start(self) -> None:
        # Before anything is bound or opened: an exposed admin port needs a token.
        check_admin_exposure(self.settings.admin_listen, self.settings.admin_token, self.settings.admin_insecure)
        doubled = upstream_path_warning(self.settings.upstream)
        if doubled is not None:
            log.warning("%s", doubled)
        proxy_sock = _bind(self.settings.listen, "listen")
        try:
            admin_sock = _bind(self.settings.admin_listen, "admin-listen")
        except StartupError:
            proxy_sock.close()
            raise
        try:
            await self._start_on(proxy_sock, admin_sock)
        except BaseException:
            # An addon that cannot start (an unusable ledger) must not leave ports bound,
            # a session open or a ledger process running behind the one-line error.
            await self._abandon_start(proxy_sock, admin_sock)
            raise

    async def _start_on(self, proxy_sock: socket.socket, admin_sock: socket.socket) -> None:
        self.session = make_session(self.settings)
        self.metrics = Metrics(self.settings)
        self.metrics.register(LedgerMetrics(self.ledger))
        self.metrics.registry.register(BudgetMetrics(self.budgets))
        self.metrics.registry.register(AlertMetrics(self.alerter))
        if self.reconcile is not None:
            self.metrics.registry.register(ReconcileMetrics(self.reconcile))
        budget_addons = None
        if self.budgets.states:
            budget_addons = (BudgetGate(self.budgets, self.identities), BudgetSync(self.budgets, self.store, self.settings.flush_interval))
        self.otel_metrics, self.tracing = telemetry_from_env(self.settings)
        self.addons = addons = Addons(
            default_addons(
                self.pricer, self.metrics, self.tracing, self.ledger, self.extra_addons, otel_metrics=self.otel_metrics, budgets=budget_addons,
                access_log=AccessLog() if self.settings.access_log else None,
            )
        )
        self.report_api = ReportAPI(self.settings, self.store, self.ledger)
        admin_app = self.build_admin_app(self.report_api)
        await addons.start()
        self.websocket_relay = self.build_websocket_relay(addons)
        self.proxy = Proxy(
            self.settings.upstream,
            self.session,
            addons,
            self.identities,
            max_request_bytes=self.settings.max_request_bytes,
            client_timeout=self.settings.client_timeout,
            max_metered_bytes=self.settings.max_metered_bytes,
            max_buffered_request_bytes=self.settings.max_buffered_request_bytes,
            max_metered_bytes_total=self.settings.max_metered_bytes_total,
            websocket=self.websocket_relay.handle,
        )

        loop = asyncio.get_running_loop()
        max_body = self.settings.max_request_bytes

        def make_request(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
            return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=max_body)

        # Header limits well above aiohttp's 8 KiB default: the upstream, not meter,
        # decides what is too large, and every request it sees gets a row.
        server = web.Server(
            self.proxy.handle,
            request_factory=make_request,
            handler_cancellation=True,
            access_log=None,
            max_line_size=HEADER_LIMIT,
            max_field_size=HEADER_LIMIT,
            # An idle connection, or one stalled mid-way through its request head, is
            # closed after --client-timeout (aiohttp's own default is 75 s).
            keepalive_timeout=self.settings.client_timeout,
            # A compressed request body is forwarded as sent, still compressed: aiohttp
            # would decode it (and refuse a coding it lacks, such as zstd).
            auto_decompress=False,
        )
        # `stop` waits the grace period for in-flight requests itself; the runner's own
        # timeout is only what a handler still running after it gets once cancelled (to
        # write its row).  aiohttp waits it twice per handler, before and after the
        # cancel: with the grace here, a stop took three graces (6.1 s for 2 s).
        self._proxy_runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=HANDLER_CANCEL_WAIT)
        await self._proxy_runner.setup()
        self._proxy_site = web.SockSite(self._proxy_runner, proxy_sock)
        await self._proxy_site.start()
        self._admin_runner = web.AppRunner(admin_app, handle_signals=False, access_log=None)
        await self._admin_runner.setup()
        await web.SockSite(self._admin_runner, admin_sock).start()
        self.proxy_address = proxy_sock.getsockname()[:2]
        self.admin_address = admin_sock.getsockname()[:2]
        # The replica's name in alert claims: the same after a restart, so its unsent ones come back at once.
        await self.alerter.start(owner=f"{socket.gethostname()} {self.proxy_address[0]}:{self.proxy_address[1]}")
        if self.reconcile is not None:
            self.reconcile.start()
        self.accepting = True
        log.info(
            "meter forwarding http://%s:%d -> %s; admin and console on http://%s:%d/; ledger %s",
            *self.proxy_address, redact_url(self.settings.upstream), *self.admin_address, redact_url(self.settings.ledger),
        )

    async def _abandon_start(self, *socks: socket.socket) -> None:
        """Undo a start() that failed part-way, quietly: the caller's error is the one line."""
        self.accepting = False
        for runner in (self._proxy_runner, self._admin_runner):
            if runner is not None:
                with contextlib.suppress(Exception):
                    await runner.cleanup()
        self._proxy_runner = self._admin_runner = self._proxy_site = None
        for sock in socks:
            sock.close()  # a no-op for one a site already closed
        if self.session is not None:
            with contextlib.suppress(Exception):
                await self.session.close()
        await self.alerter.stop()
        if self.reconcile is not None:
            await self.reconcile.stop()
        if self.addons is not None:
            await self.addons.stop()  # the ledger writer closes its store; each failure is logged, none raised
        await self._stop_report_api()

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests within the grace period, flush records."""
        self.accepting = False
        if self._proxy_site is not None:
            await self._proxy_site.stop()
        if self.websocket_relay is not None:
            self.websocket_relay.shutdown()  # idle sockets close now (1001), busy ones after their response
        if self.proxy is not None and self.proxy.in_flight:
            log.info("draining %d in-flight requests (grace %.0fs)", self.proxy.in_flight, self.settings.shutdown_grace)
            try:
                await asyncio.wait_for(self.proxy.idle.wait(), self.settings.shutdown_grace)
            except TimeoutError:
                log.warning("%d requests still in flight after the grace period; closing them", self.proxy.in_flight)
                if self.websocket_relay is not None:
                    self.websocket_relay.close_all()  # with a close frame (1001), before the runner cancels them
        if self.proxy is not None:
            self.proxy.shutting_down = True  # what the runner cancels now is cut by meter
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()
        if self.proxy is not None:
            self.proxy.finished.drain()  # the last turn's records, before the ledger flushes
        if self.session is not None:
            await self.session.close()
        await self.alerter.stop()  # before the ledger closes: what is unsent is released there
        if self.reconcile is not None:
            await self.reconcile.stop()  # before the ledger closes: a run reads it
        if self.addons is not None:
            await self.addons.stop()
        await self._stop_report_api()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        log.info("meter stopped; %d records written", self.ledger.stats.written)

    async def _stop_report_api(self) -> None:
        if self.report_api is not None:
            try:
                await self.report_api.stop()
            except Exception:  # like an addon's stop: logged, and shutting down goes on
                log.exception("report API stop failed")

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        # The handlers come first: start-up binds the ports before it opens the ledger
        # (which may wait for a killed meter's ledger process), and a signal meanwhile
        # must not kill meter with clients queued on them.  One that came during
        # start-up stops meter in order as soon as it has started.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        settle_after_start()  # the collector, now that start-up's objects are made
        if stop.is_set():
            log.info("asked to stop during start-up")
        await stop.wait()
        log.info("stopping")
        await self.stop()

    # admin -------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self.metrics is not None  # the admin app is served only once start-up built it
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _budgets(self, request: web.Request) -> web.Response:
        """Each budget's window, spend, limit, remaining, share and state (`meter budgets --url`)."""
        return web.Response(body=budget_rows_json(self.budgets.rows()), content_type="application/json")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        # Ready means able to forward.  A failing ledger keeps its records (memory,
        # then spool) and shows here and in metrics, but must not take the replica
        # out of a load balancer.  States only: this path needs no token, and a
        # store's error text names hosts, users and files (it is in the log).
        stats = self.ledger.stats
        ready = self.accepting and self.session is not None and not self.session.closed
        body = {
            "ready": ready,
            "ledger": "ok" if stats.healthy else "failing",
            "ledger_pending_records": self.ledger.unwritten,
        }
        return web.json_response(body, status=200 if ready else 503)
