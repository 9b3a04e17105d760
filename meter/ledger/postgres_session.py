"""One asyncpg connection, driven from plain threads: the PostgreSQL store's building block.

asyncpg is asynchronous; the ledger writer, `meter report` and `meter reprice`
are not.  A `PostgresSession` owns an event loop of its own and runs each call
to completion on it, under a lock, so the proxy's event loop never waits on
the database.  It connects on first use; any failure drops the connection (the
next call connects afresh) and raises `PostgresLedgerError`, whose message
never carries the password (`redact_url`, and the driver's own exception is not
chained when its text holds it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..config import redact_url
from .store import LedgerRefused, LedgerUnavailable

T = TypeVar("T")


class PostgresLedgerError(LedgerUnavailable):
    """A PostgreSQL ledger operation failed; the message is safe to log (no password).

    An outage for the writer: the server is gone, or refuses the session (a lost
    schema, missing rights), whatever the records; `PostgresRefused` is the case
    where the values are the problem.
    """


class PostgresRefused(PostgresLedgerError, LedgerRefused):
    """PostgreSQL refused the batch for its values (SQLSTATE class 22 or 23, or a value
    the driver cannot encode); the server itself is working."""


class PostgresSession:
    """One connection and the event loop that drives it.  Thread-safe; blocking.

    `on_connect(session, connection)` runs on every new connection before it is used
    (the writer's migrations and staging table), with `wait` to run its statements.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        command_timeout: float | None,
        on_connect: Callable[[PostgresSession, Any], None] | None = None,
    ) -> None:
        self.url = url
        self.safe_url = redact_url(url)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.on_connect = on_connect
        self._password = _password_of(url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._con: Any = None
        self._lock = threading.RLock()

    def run(self, call: Callable[[Any], Awaitable[T]], what: str, *, again_if_lost: bool = False) -> T:
        """`call(connection)` run to completion; a failure drops the connection and raises
        `PostgresLedgerError` saying `what` failed, with a safe message.

        With `again_if_lost` (a call that may safely run twice: a read), a connection kept
        from an earlier call that turns out to be gone is replaced and the call made once
        more.  The session's loop runs only during calls, so a connection the server
        ended while it sat idle (a restart, a failover, pg_terminate_backend) is found
        dead only by the next call, which would otherwise fail with the server up."""
        if _loop_running_here():
            return _in_thread(lambda: self.run(call, what, again_if_lost=again_if_lost))
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
            try:
                kept = self._con is not None and not self._con.is_closed()
                try:
                    return self.wait(call(self._connection()))
                except Exception as exc:
                    if not (again_if_lost and kept and _connection_lost(exc)):
                        raise
                    self._drop()
                    return self.wait(call(self._connection()))
            except Exception as exc:  # noqa: BLE001 - every driver failure becomes one safe message
                self._drop()
                message = f"{what} on {self.safe_url} failed: {type(exc).__name__}: {exc}"
                if self._password:
                    message = message.replace(self._password, "***")
                raise PostgresLedgerError(message) from _scrubbed(exc, self._password)

    def wait(self, awaitable: Awaitable[T]) -> T:
        """Run one awaitable on this session's loop (inside `run` or `on_connect`)."""
        assert self._loop is not None
        return self._loop.run_until_complete(awaitable)

    def _connection(self) -> Any:
        """The open connection, or a new one (set up by `on_connect`)."""
        if self._con is not None and not self._con.is_closed():
            return self._con
        import asyncpg

        con = self.wait(
            asyncpg.connect(
                self.url,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                server_settings={"application_name": "meter", "timezone": "UTC"},
            )
        )
        try:
            if self.on_connect is not None:
                self.on_connect(self, con)
        except BaseException:
            con.terminate()
            raise
        self._con = con
        return con

    def _drop(self) -> None:
        """Forget the connection after any failure; the next call connects afresh."""
        con, self._con = self._con, None
        if con is not None and not con.is_closed():
            con.terminate()

    def close(self) -> None:
        if _loop_running_here():
            return _in_thread(self.close)
        with self._lock:
            loop, con = self._loop, self._con
            self._loop = self._con = None
            if loop is None:
                return
            try:
                if con is not None and not con.is_closed():
                    loop.run_until_complete(con.close(timeout=2))
            except Exception:  # noqa: BLE001 - closing politely failed; close hard
                con.terminate()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()


def _loop_running_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """For a caller on an event loop's thread (a test, an admin handler): the session's
    loop cannot run inside another, so run on a helper thread; the caller blocks, as
    it would on a DuckDB cursor."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meter-pg") as pool:
        return pool.submit(fn, *args).result()


def _connection_lost(exc: BaseException) -> bool:
    """The connection itself is gone (SQLSTATE class 08, the server shut the session
    down, or the socket failed), not the statement."""
    import asyncpg

    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.exceptions.AdminShutdownError, ConnectionError))


def _password_of(url: str) -> str | None:
    from yarl import URL

    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return None
    return parsed.password or parsed.query.get("password") or None  # asyncpg takes either


def _scrubbed(exc: BaseException, password: str | None) -> BaseException | None:
    """The cause to chain: the driver's own exception, unless its text holds the password."""
    if password and password in str(exc):
        return None
    return exc
