"""The DuckDB ledger process's memory under sustained load (issue #16, item 3).

A real `meter serve` with its default DuckDB ledger, in front of the fake
upstream, takes non-streamed Responses calls from 32 concurrent clients for a
few seconds.  Its ledger process (`python -m meter.ledger`) must stay under a
peak RSS bound the whole time (VmHWM, read before the process stops), and every
answered request must be a row once meter has stopped.

The bound has its reasons: before the ledger process lost pyarrow and its eager
imports and got a DuckDB memory_limit, this test measured its peak at 177 MiB
(37,159 requests); after, 122 MiB (34,204 requests).  Python, DuckDB's code and
an open database alone are ~65 MiB of that before any row, and a checkpoint of
the `requests` table pins up to DuckDB's memory_limit (see `child_store`).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import duckdb
import pytest

from .conftest import SECRET_KEY

LEDGER_PEAK_MIB = 150  # the ledger process's VmHWM must stay under this
CLIENTS = 32
LOAD_SECONDS = 12.0
BODY = b'{"model":"gpt-4o","input":"hi"}'


def _status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {name} for process {pid}")


def _settled_rss_kib(pid: int) -> int:
    """VmRSS once it holds still for a second: the ledger process has opened the ledger."""
    last = -1
    for _ in range(50):
        rss = _status_kib(pid, "VmRSS")
        if rss == last:
            return rss
        last = rss
        time.sleep(1.0)
    return last


def _ledger_process(meter_pid: int) -> int:
    """The pid of `meter serve`'s ledger process (its child running meter.ledger)."""
    for _ in range(100):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == meter_pid and b"meter.ledger" in cmdline:
                return int(entry)
        time.sleep(0.1)
    raise AssertionError("meter serve has no ledger process")


async def _until_written(admin_url: str, records: int) -> None:
    """Until meter counts `records` written to the ledger (meter_ledger_written_records_total)."""
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(admin_url + "/metrics") as response:
                text = await response.text()
            written = next(float(line.split()[1]) for line in text.splitlines() if line.startswith("meter_ledger_written_records_total "))
            if written >= records:
                return
            assert time.monotonic() < deadline, f"{written:.0f} of {records} records written"
            await asyncio.sleep(0.05)


async def _client(session: aiohttp.ClientSession, url: str, until: float, answered: list[int]) -> None:
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}
    while time.monotonic() < until:
        async with session.post(url, data=BODY, headers=headers) as response:
            await response.read()
            answered[0] += 1


@pytest.mark.timeout(120)
async def test_ledger_process_stays_under_its_bound_and_keeps_every_record(upstream, meter_process, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.duckdb"
    meter = meter_process("--upstream", upstream.url, "--ledger", str(ledger))
    assert meter.proc is not None
    child = _ledger_process(meter.proc.pid)
    idle_kib = _settled_rss_kib(child)

    answered = [0]
    until = time.monotonic() + LOAD_SECONDS
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(_client(session, meter.url + "/v1/responses", until, answered) for _ in range(CLIENTS)))
    await _until_written(meter.admin_url, answered[0])  # the last batch has reached the ledger process
    peak_kib = _status_kib(child, "VmHWM")
    rss_kib = _status_kib(child, "VmRSS")
    meter.stop()
    assert meter.proc.returncode == 0

    con = duckdb.connect(str(ledger), read_only=True)
    try:
        ((rows,),) = con.execute("SELECT count(*) FROM requests WHERE endpoint = 'responses'").fetchall()
    finally:
        con.close()
    summary = (
        f"{answered[0]} requests; ledger process idle {idle_kib // 1024} MiB, "
        f"after the load {rss_kib // 1024} MiB, peak {peak_kib // 1024} MiB (bound {LEDGER_PEAK_MIB} MiB)"
    )
    print(summary)
    assert answered[0] > 5_000, summary  # enough load for several batches and a checkpoint
    assert rows == answered[0], f"{rows} rows for {answered[0]} answered requests"
    assert peak_kib < LEDGER_PEAK_MIB * 1024, summary


# --- DuckDB's start-up code, handed back once the ledger is open (meter/ledger/footprint.py)

CODE_RSS = """
import os
import sys
from meter.ledger import DuckDBStore
from meter.ledger.child_store import LEDGER_PROCESS_SETTINGS
from meter.ledger.footprint import duckdb_library
from tests.test_ledger_memory import _library_rss_kib
store = DuckDBStore(sys.argv[1], LEDGER_PROCESS_SETTINGS)
store.open()
library = duckdb_library()
assert library == sys.argv[2], library  # the copy, not the installed library
print(_library_rss_kib(os.getpid(), library))
store.close()
"""


def _library_rss_kib(pid: int, library: str) -> int:
    """KiB of the file `library`'s mappings resident in process `pid`."""
    rss, mapped = 0, None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if "-" in fields[0] and len(fields[0]) > 8:
            mapped = fields[5] if len(fields) == 6 else None
        elif fields[0] == "Rss:" and mapped == library:
            rss += int(fields[1])
    return rss


def test_the_ledger_process_hands_back_duckdbs_start_up_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a ledger runs much of DuckDB's code once; the ledger process keeps far
    less of it resident than a process that opened a ledger the same way, and still
    writes and reads.  A page another process maps stays (this one's DuckDB, after
    other tests), so both processes load a copy of DuckDB's library of their own."""
    import shutil
    import subprocess
    import sys

    from meter.ledger import ChildProcessStore
    from meter.ledger.footprint import duckdb_library

    from .test_ledger_hostile import make_record

    installed = duckdb_library()
    assert installed is not None
    copy = tmp_path / "lib"
    copy.mkdir()
    shutil.copy(installed, copy)
    library = str((copy / Path(installed).name).resolve())
    monkeypatch.setenv("PYTHONPATH", str(copy))  # found before the installed one, by both processes below
    out = subprocess.run([sys.executable, "-c", CODE_RSS, str(tmp_path / "plain.duckdb"), library], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    plain_kib = int(out.stdout)
    store = ChildProcessStore(str(tmp_path / "ledger.duckdb"))
    store.open()
    try:
        assert store._proc is not None
        assert library in Path(f"/proc/{store._proc.pid}/maps").read_text()  # its own copy, as the plain process's
        ledger_kib = _library_rss_kib(store._proc.pid, library)
        # What opening added to the process at its peak, over what it holds once open
        # (the code handed back): with the library's pages handed back only once the
        # ledger was open, all of them were resident at once (75 MiB, 38 once open),
        # handed back once connected too, 63 MiB.
        open_peak_kib = _status_kib(store._proc.pid, "VmHWM") - _status_kib(store._proc.pid, "VmRSS")
        record = make_record()
        store.write([record])
        _, rows = store.query("SELECT id::VARCHAR FROM requests")
    finally:
        store.close()
    summary = (
        f"DuckDB's library resident: {ledger_kib // 1024} MiB in the ledger process, {plain_kib // 1024} MiB in a plain process; "
        f"the ledger process's peak while opening: {open_peak_kib // 1024} MiB over its RSS once open"
    )
    print(summary)
    assert plain_kib > 16 * 1024, summary  # the premise: opening touches that much
    assert ledger_kib < plain_kib // 2, summary
    assert open_peak_kib < plain_kib * 3 // 4, summary
    assert rows == [(record.id,)]


def test_the_writer_hands_the_ledger_process_smaller_batches(tmp_path: Path) -> None:
    """The ledger process holds a batch whole while it writes it (its message, its values,
    DuckDB's staging and the transaction's copy): it is given at most `ROWS_PER_WRITE`
    records at a time, where other stores take the writer's 5,000 (peak RSS under
    batches sent back to back: 110-112 MiB in batches of 5,000, 104-105 in 3,000)."""
    from meter.ledger import ChildProcessStore, DuckDBStore, LedgerWriter
    from meter.ledger.child_store import ROWS_PER_WRITE

    to_the_process = LedgerWriter(ChildProcessStore(str(tmp_path / "a.duckdb")))
    in_process = LedgerWriter(DuckDBStore(str(tmp_path / "b.duckdb")))
    assert to_the_process.batch_size == ROWS_PER_WRITE < in_process.batch_size == 5000
    assert LedgerWriter(ChildProcessStore(str(tmp_path / "c.duckdb")), batch_size=100).batch_size == 100  # a smaller one holds
