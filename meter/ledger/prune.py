"""Retention: what `meter prune` deletes from a ledger, and how a DuckDB file shrinks after.

Every store's `prune(before)` runs `statements(before)` in one transaction, in
this order, and returns what each deleted (`Pruned`).  Nothing is fetched into
Python: each step is one DELETE, so a prune of millions of rows takes no more
memory than a small one.

- `usage_claims`: a claim goes with the row that holds its usage.  A claim
  exists so that a background response's usage counts once in the ledger; once
  its row is deleted, the ledger no longer counts that usage anywhere, so a
  claim left behind would only make a later row of the same response lose its
  usage with nothing to show for it.  The claims that go are those whose row is
  deleted, and those older than the cut-off whose row is gone already (deleted by
  hand).  A claim is never chosen by `claimed_at` alone: the claim is written
  when its row is, after `started_at` (a long background stream started before
  the cut-off may be claimed after it), and on PostgreSQL by the database's clock,
  not the replica's.  The provider keeps a stored response for 30 days, so after
  a prune of more than that no later poll can show the usage again.
- `alert_claims`: a claim says an alert of one budget window was sent; deleted
  within its window, the alert would be sent again.  The ones that go were sent
  and belong to a window that ended before the cut-off (the longest window, a
  calendar month, lasts at most 31 days).  An unsent claim stays: it is still
  being delivered.
- `requests`: every row whose `started_at` is before the cut-off.

A DuckDB file does not shrink when rows are deleted (their blocks are kept for
reuse, and the deletion itself grows it), so `compact` copies the ledger into a
fresh file beside it (`COPY FROM DATABASE`: tables, keys, defaults and the
`schema_version` view) and moves it into place.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

# The longest budget window (a calendar month) lasts at most this long.
LONGEST_WINDOW = timedelta(days=31)

# Every table a prune touches; a ledger made by an old meter may lack the claim tables.
PRUNED_TABLES = ("usage_claims", "alert_claims", "requests")
PRESENT_TABLES_SQL = (
    "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
    "AND table_name IN ('usage_claims', 'alert_claims', 'requests')"
)

_DELETE = {
    "usage_claims": (
        "DELETE FROM usage_claims WHERE request_id IN (SELECT id FROM requests WHERE started_at < $1) "
        "OR (claimed_at < $1 AND NOT EXISTS (SELECT 1 FROM requests AS r WHERE r.id = usage_claims.request_id))"
    ),
    "alert_claims": "DELETE FROM alert_claims WHERE sent_at IS NOT NULL AND window_start < $1",
    "requests": "DELETE FROM requests WHERE started_at < $1",
}

COUNT_SQL = "SELECT count(*) FROM requests WHERE started_at < $1"

# DuckDB's buffer pool for a prune: by default it keeps up to 80% of RAM of the ledger's
# blocks while copying them (a 2M-row ledger: 286 MiB peak; 219 MiB with this limit, 174
# MiB at 64 MB); past the limit it writes them out and reads them again.  What the limit
# does not bound is DuckDB's undo of the deleted rows, about 46 bytes each, held until
# the one commit: the price of a prune that is all or nothing.
PRUNE_MEMORY_LIMIT = "128MB"


def bound_memory(con: Any) -> None:
    """Keep a DuckDB prune's memory to `PRUNE_MEMORY_LIMIT`, without a progress bar on stdout."""
    con.execute(f"SET memory_limit = '{PRUNE_MEMORY_LIMIT}'")
    con.execute("SET enable_progress_bar = false")


@dataclass(frozen=True)
class Pruned:
    """What one prune deleted."""

    rows: int = 0
    usage_claims: int = 0
    alert_claims: int = 0


def statements(before: datetime, present: set[str]) -> list[tuple[str, str, list[Any]]]:
    """(table, DELETE, parameters) for each table present, claims before the rows they follow."""
    cutoffs = {"usage_claims": before, "alert_claims": before - LONGEST_WINDOW, "requests": before}
    return [(table, _DELETE[table], [cutoffs[table]]) for table in PRUNED_TABLES if table in present]


def tally(deleted: dict[str, int]) -> Pruned:
    return Pruned(rows=deleted.get("requests", 0), usage_claims=deleted.get("usage_claims", 0), alert_claims=deleted.get("alert_claims", 0))


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _identifier(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def compact(con: Any, path: str) -> None:
    """Rewrite the DuckDB file `path`, open for writing on `con`, without its free space;
    closes `con`.  The copy is made beside the file and moved over it only once it is
    whole, so a failure leaves the ledger as it was (pruned, not compacted)."""
    target = os.path.realpath(path)  # a symlinked ledger stays a symlink
    fresh = f"{target}.compact"
    for leftover in (fresh, fresh + ".wal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(leftover)  # a compaction interrupted earlier
    try:
        bound_memory(con)
        con.execute("CHECKPOINT")
        row = con.execute("SELECT current_database()").fetchone()
        name = row[0] if row else "memory"
        con.execute(f"ATTACH {_sql_string(fresh)} AS meter_compact")
        try:
            con.execute(f"COPY FROM DATABASE {_identifier(name)} TO meter_compact")
        finally:
            con.execute("DETACH meter_compact")
    except BaseException:
        con.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(fresh)
        raise
    con.close()
    if os.path.exists(path + ".wal") or os.path.exists(fresh + ".wal"):
        # Never move a file over one whose WAL would then be replayed into it.
        os.remove(fresh)
        raise RuntimeError(f"{path} still has a write-ahead log after closing; not compacted")
    os.chmod(fresh, stat.S_IMODE(os.stat(target).st_mode))  # the ledger keeps the mode its operator gave it
    with open(fresh, "rb") as f:
        os.fsync(f.fileno())
    os.replace(fresh, target)
    directory = os.open(os.path.dirname(target), os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
