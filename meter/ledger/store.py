"""What every ledger store is: the `Store` protocol, and the errors a store raises.

Three stores implement the protocol: `DuckDBStore` (a DuckDB file, in the
process that opens it), `ChildProcessStore` (the same, run in a child process:
what `meter serve` writes through) and `PostgresStore` (one database for a
fleet).  The writer, `meter report`, `meter reprice` and the admin API go
through this protocol and nothing else, so none of them asks which store it
has beyond `dialect`, the one thing SQL text must know.

The errors say whose fault a failure is, by type, so callers never read
messages: `LedgerRefused` (these records' values), `LedgerUnavailable` (the
store cannot answer now: an outage, a lost child, a store not yet open; the
admin API answers 503), `LedgerUnusable` (the ledger can never be used: start-up
fails with its one line), `LedgerReadError` (a reader could not open the
ledgers it was given; one line for the CLI).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from itertools import islice
from typing import Any, Protocol

from ..errors import StartupError
from ..record import Record
from .alert_claims import AlertClaim
from .prune import Pruned
from .sanitise import Cuts


class Store(Protocol):
    """A place records are written to and read from.

    `write` raises `LedgerRefused` when the store refuses the records for their
    values, anything else when it cannot be written.  A store whose class says
    `sanitises = True` (`ChildProcessStore`: in its own process) sanitises what
    it is given and answers what it cut; the writer sanitises for any other; `probe` is a write that
    must succeed while the store works (see `LedgerWriter`).  Reads take one
    read-only statement with `$1`-style parameters on every dialect.
    """

    dialect: str  # "duckdb" or "postgresql"

    def open(self) -> None: ...

    def write(self, records: Sequence[Record]) -> Cuts | None:
        """None, or, from a store that `sanitises`, what sanitising these records cut
        (counted once: only a write that succeeded answers)."""
        ...

    def probe(self) -> None: ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Column names and every row."""
        ...

    def iter_query(self, sql: str, params: Sequence[Any] = (), *, batch_rows: int = 50_000) -> Iterator[list[tuple[Any, ...]]]:
        """The same rows in batches of at most `batch_rows`: memory bounded whatever the result's size."""
        ...

    def set_costs(self, changes: Iterable[tuple[str, Decimal | None]]) -> int:
        """Rewrite `requests.cost_usd` of these ids in one transaction, taking the
        iterable lazily (it may be fed by an `iter_query` on this same store); the
        number of rows updated."""
        ...

    def prune(self, before: datetime) -> Pruned:
        """Delete the rows started before `before`, with the usage and alert claims that
        follow them (`prune`), in one transaction; what was deleted."""
        ...

    # Budget alerts (SPEC §11): the claims in `alert_claims`, see `alert_claims`.

    def claim_alert(self, alert: AlertClaim, owner: str, lease_until: datetime) -> bool:
        """Claim an alert for `owner`; True only for the one claim that won."""
        ...

    def update_alert(self, alert: AlertClaim, owner: str, lease_until: datetime | None, sent: bool) -> bool:
        """Record its delivered webhooks, renew or release (None) the lease, mark it sent;
        False when `owner` no longer holds the claim."""
        ...

    def take_alerts(self, owner: str, now: datetime, lease_until: datetime) -> list[AlertClaim]:
        """The unsent claims `owner` is to send: its own, released ones, and those whose lease ran out."""
        ...

    def close(self) -> None: ...


class LedgerRefused(Exception):
    """The store is working but will not take these records (a value it refuses)."""


class LedgerUnavailable(Exception):
    """The store cannot answer now (it is down, lost, or not open yet); the records
    or the query are not at fault, and a later try may succeed."""

    kind = "outage"  # what the writer makes of it (see `failure_kind`)


class LedgerLost(LedgerUnavailable):
    """The store's own process or connection is gone (the ledger process was killed):
    a fresh open is expected to work, so even a shutdown tries one."""


class LedgerNotOpen(LedgerUnavailable):
    """The store has not been opened yet (or was closed after a failure)."""


class LedgerUnusable(StartupError):
    """The ledger cannot be used at all (not a ledger, held by another process, no
    such directory): start-up fails with this one line."""


class LedgerReadError(Exception):
    """The ledgers a reader asked for cannot be opened; one line, no password."""


# Exception classes that say "these values", whatever the store: Python's and
# Arrow's conversion errors (ArrowInvalid is a ValueError) and DuckDB's data and
# constraint errors.  OSError, memory and connection errors say "the store".
_REFUSED_NAMES = {"ConversionException", "OutOfRangeException", "TypeMismatchException", "DataError", "ConstraintException", "IntegrityError", "InvalidInputException"}
_OUTAGE_NAMES = {"IOException", "OperationalError", "OutOfMemoryException", "FatalException", "InternalException", "TransactionException", "PermissionException"}


def failure_kind(exc: BaseException) -> str:
    """`refused`, `outage` or `unknown` (the writer then asks the store with a probe)."""
    if isinstance(exc, LedgerRefused):
        return "refused"
    if isinstance(exc, (OSError, MemoryError, EOFError, TimeoutError)):
        return "outage"
    if isinstance(exc, (ValueError, TypeError, OverflowError, UnicodeError)):
        return "refused"
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _OUTAGE_NAMES:
        return "outage"
    if names & _REFUSED_NAMES:
        return "refused"
    kind = getattr(exc, "kind", None)  # a store that already knows (the ledger child)
    return kind if kind in ("refused", "outage") else "unknown"


# `set_costs` takes its changes this many at a time into the store's staging table.
COST_CHUNK_ROWS = 50_000


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of at most `size` items, taken from `items` only as each is needed."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
