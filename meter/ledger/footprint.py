"""The ledger process's footprint on the machine it shares with the proxy: the CPU
it takes (`yield_the_cpu`) and the memory DuckDB's code holds (`page_out_code`).

DuckDB's library is ~66 MB of code and read-only data.  Opening a ledger runs a
good part of it once (registering every function, type and setting of the
built-in extensions), and the pages it touched stay in the process's RSS: 38 MiB
of the ledger process's 75 MiB when idle.  Those pages are clean copies of the
file: `MADV_PAGEOUT` (Linux 5.4) hands them back after each step of opening
(`child_store`: once connected, once the ledger is open), and the ones
writing needs are read back at their first use.  Under
scripts/bench.py's JSON load (32 connections, ~5,000 requests/s for 30 s, two
runs each way) the ledger process peaked at 106 MiB with it, 121-122 MiB
without; the library's resident pages at that peak were 24 MiB against 38.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("meter.ledger")

MADV_PAGEOUT = 21  # linux/mman.h


def yield_the_cpu() -> None:
    """Batch writes can wait; requests cannot.  SCHED_IDLE: the ledger process runs on
    CPU no one else wants and gives way at once to a waking proxy, upstream or client.
    At nice 10 a batch's insert (tens of ms) delayed whatever woke on its core by a
    scheduler slice: p99 at one connection 2.6 ms, against 1.0 ms under SCHED_IDLE
    (scripts/bench.py; the proxy pinned to one core, the rest on the other).  On a
    machine kept busy to the last cycle the ledger process gets little, and records
    wait in the proxy (bounded, then the spool), never lost; meter_ledger_pending_records
    shows it.  Where SCHED_IDLE is refused, nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused
        try:
            os.nice(19)
        except OSError:
            pass


def duckdb_library() -> str | None:
    """The file of DuckDB's compiled module as loaded (`_duckdb` since DuckDB 1.2,
    `duckdb.duckdb` before)."""
    for name in ("_duckdb", "duckdb.duckdb"):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            return os.path.realpath(path)
    return None


def page_out_code(library: str | None) -> int:
    """Hand back the resident pages of the read-only mappings of the file `library`
    (its code and constants; never a writable one); the bytes advised, 0 where the
    system has no `MADV_PAGEOUT` (not Linux, a kernel before 5.4).  Advice only:
    nothing the process does changes, a page it needs again is read back in."""
    if library is None:
        return 0
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            # address perms offset dev inode path (which may hold spaces)
            rows = [line.rstrip("\n").split(maxsplit=5) for line in maps]
        ranges = [_range(fields[0]) for fields in rows if len(fields) == 6 and fields[5] == library and "w" not in fields[1]]
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = 0
    for start, end in ranges:
        if madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
        else:
            log.debug("MADV_PAGEOUT refused (errno %d): the code of %s stays resident", ctypes.get_errno(), library)
            break
    return advised


def _range(field: str) -> tuple[int, int]:
    start, end = field.split("-")
    return int(start, 16), int(end, 16)
