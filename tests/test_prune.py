"""`meter prune`: retention on both stores (the rules: meter/ledger/prune.py).

Real DuckDB files and a real PostgreSQL (tests/pg.py), through the `meter`
command.  What is checked: the rows older than the cut-off go and no other;
usage claims go with their rows, so a later poll of a pruned response keeps
its usage while one of a kept response still loses it; an alert claim goes
only once sent and its window is over; the DuckDB file shrinks; a file open in
a running meter is refused; PostgreSQL is pruned under a live writer; the
process's memory does not grow with the ledger.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from meter.ledger import DuckDBStore, PostgresStore, Store
from meter.ledger.alert_claims import AlertClaim

from .many_rows import duckdb_ledger, duckdb_rows, postgres_ledger, postgres_rows, run_with_peak
from .pg import execute
from .test_report import assert_one_line_error, make_record, run_meter

NOW = dt.datetime.now(dt.UTC)
CUT = NOW - dt.timedelta(days=180)
# The cut-off the tests pass, as a time rather than `180d`: the rows straddle it by
# minutes, and the suite may reach a test of this module minutes after importing it.
CUT_ARG = CUT.isoformat()
OLD = CUT - dt.timedelta(days=20)
NEW = CUT + dt.timedelta(days=20)
LINE = re.compile(r"^pruned (\d+) rows older than (\S+)\n$")


def background(response_id: str, at: dt.datetime, **fields: Any) -> Any:
    """A retrieve of a background response that shows its final usage."""
    return make_record(
        at=at, method="GET", path=f"/v1/responses/{response_id}", endpoint="responses.retrieve", response_id=response_id,
        background=True, model="gpt-4o", input_tokens=100, output_tokens=10, **fields,
    )


def seed_claims(store: Store) -> None:
    """Rows and claims on both sides of the cut-off, as a meter would leave them."""
    store.write([
        background("resp_old", OLD),                                  # claims resp_old; pruned
        background("resp_old", NEW),                                  # a later poll: usage cleared; kept
        background("resp_new", NEW + dt.timedelta(hours=1)),          # claims resp_new; kept
        background("resp_straddle", CUT - dt.timedelta(minutes=5)),   # pruned; its claim made after the cut-off
        background("resp_skew", CUT + dt.timedelta(minutes=5)),       # kept; its claim stamped before the cut-off
        make_record(at=OLD, response_id="resp_plain", model="gpt-4o", input_tokens=5, output_tokens=1),
    ])
    # The claim of a row written after the cut-off is stamped then; a claim stamped by a
    # clock behind the replica's reads before its row.
    move = "UPDATE usage_claims SET claimed_at = $1 WHERE response_id = $2"
    run(store, move, [CUT + dt.timedelta(minutes=1), "resp_straddle"])
    run(store, move, [CUT - dt.timedelta(minutes=1), "resp_skew"])
    run(store, "INSERT INTO usage_claims (response_id, request_id, claimed_at) VALUES ($1, gen_random_uuid(), $2)", ["resp_orphan_old", OLD])
    run(store, "INSERT INTO usage_claims (response_id, request_id, claimed_at) VALUES ($1, gen_random_uuid(), $2)", ["resp_orphan_new", NEW])
    month = dt.timedelta(days=31)
    for budget, window_start, sent in (
        ("sent-long-ago", OLD - month, True),        # goes: sent, its window ended before the cut-off
        ("sent-window-open", CUT - dt.timedelta(days=10), True),  # stays: a month from then is after the cut-off
        ("unsent-long-ago", OLD - month, False),     # stays: still being delivered
        ("current", NOW.replace(day=1), True),       # stays
    ):
        claim = AlertClaim(budget, window_start, 0.8, Decimal(8), Decimal(10), "observe")
        assert store.claim_alert(claim, "test", NOW + dt.timedelta(minutes=1))
        if sent:
            assert store.update_alert(claim, "test", None, True)


def run(store: Store, sql: str, params: list[Any]) -> None:
    """A statement outside meter's own writes (the stores only read SQL given to them)."""
    if isinstance(store, DuckDBStore):
        store.con.execute(sql.replace("gen_random_uuid()", "uuid()"), params)
    else:
        execute(store.url, _inline(sql, params))


def _inline(sql: str, params: list[Any]) -> str:
    for n in range(len(params), 0, -1):
        value = params[n - 1]
        sql = sql.replace(f"${n}", f"'{value.isoformat()}'::timestamptz" if isinstance(value, dt.datetime) else f"'{value}'")
    return sql


def check_claims_after_prune(store: Store, pruned_line: str) -> None:
    match = LINE.match(pruned_line)
    assert match, pruned_line
    assert int(match.group(1)) == 3  # resp_old's first row, resp_straddle, resp_plain
    assert abs(dt.datetime.fromisoformat(match.group(2)) - CUT) < dt.timedelta(minutes=5)
    _, rows = store.query("SELECT response_id, input_tokens FROM requests ORDER BY started_at")
    assert rows == [("resp_skew", 100), ("resp_old", None), ("resp_new", 100)]
    _, rows = store.query("SELECT response_id FROM usage_claims ORDER BY response_id")
    assert [r[0] for r in rows] == ["resp_new", "resp_orphan_new", "resp_skew"]
    _, rows = store.query("SELECT budget FROM alert_claims ORDER BY budget")
    assert [r[0] for r in rows] == ["current", "sent-window-open", "unsent-long-ago"]
    # A later poll: resp_old's usage counts again (nothing in the ledger counts it now);
    # resp_new's still counts once.
    store.write([background("resp_old", NOW), background("resp_new", NOW)])
    _, rows = store.query("SELECT response_id, input_tokens FROM requests WHERE started_at >= $1 ORDER BY response_id", [NOW - dt.timedelta(seconds=1)])
    assert rows == [("resp_new", None), ("resp_old", 100)]


def seeded_duckdb(path: Path) -> None:
    store = DuckDBStore(str(path))
    store.open()
    try:
        seed_claims(store)
    finally:
        store.close()


def test_prune_duckdb_keeps_claims_consistent(tmp_path: Path) -> None:
    ledger = tmp_path / "meter.duckdb"
    seeded_duckdb(ledger)
    dry = run_meter("prune", "--older-than", CUT_ARG, "--ledger", str(ledger), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would prune 3 rows older than ")
    result = run_meter("prune", "--older-than", CUT_ARG, "--ledger", str(ledger))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "meter.duckdb.compact").exists()
    assert oct(os.stat(ledger).st_mode & 0o777) == "0o600"
    store = DuckDBStore(str(ledger))
    store.open()  # still a ledger meter opens: keys, defaults and the schema_version view came through
    try:
        assert store.query("SELECT version, latest FROM schema_version")[1] == [(4, "m004_alert_claims")]
        check_claims_after_prune(store, result.stdout)
    finally:
        store.close()
    inode = ledger.stat().st_ino
    again = run_meter("prune", "--older-than", CUT_ARG, "--ledger", str(ledger))
    assert again.stdout.startswith("pruned 0 rows older than ")
    assert ledger.stat().st_ino == inode  # nothing deleted: the file is not rewritten


def test_prune_keeps_a_symlinked_ledger_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "meter.duckdb"
    seeded_duckdb(real)
    link = tmp_path / "meter.duckdb"
    link.symlink_to(real)
    result = run_meter("prune", "--older-than", CUT_ARG, "--ledger", str(link))
    assert result.stdout.startswith("pruned 3 rows older than "), result.stderr
    assert link.is_symlink() and link.resolve() == real
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["meter.duckdb"]
    con = duckdb.connect(str(real), read_only=True)
    assert con.execute("SELECT count(*) FROM requests").fetchone() == (3,)
    con.close()


def test_prune_postgres_live(pg_url: str) -> None:
    writer = PostgresStore(pg_url)  # a replica that stays connected through the prune
    writer.open()
    try:
        seed_claims(writer)
        result = run_meter("prune", "--older-than", CUT_ARG, "--ledger", pg_url)
        assert result.returncode == 0, result.stderr
        writer.write([make_record(at=NOW, response_id="after", model="gpt-4o")])  # the replica writes on
        _, rows = writer.query("SELECT count(*) FROM requests WHERE response_id = 'after'")
        assert rows == [(1,)]
        execute(pg_url, "DELETE FROM requests WHERE response_id = 'after'")
        check_claims_after_prune(writer, result.stdout)
    finally:
        writer.close()


def test_prune_shrinks_the_duckdb_file_and_keeps_the_rest(tmp_path: Path) -> None:
    """150k rows one every 37 s from 2026-01-01; before 2026-02-20 are 116,757 of them."""
    ledger = tmp_path / "big.duckdb"
    duckdb_ledger(ledger, duckdb_rows("gpt-4o"), 150_000)
    before = ledger.stat().st_size
    kept_sql = "SELECT count(*), sum(input_tokens), sum(output_tokens) FROM requests WHERE started_at >= TIMESTAMPTZ '2026-02-20 00:00:00+00'"
    con = duckdb.connect(str(ledger), read_only=True)
    kept = con.execute(kept_sql).fetchone()
    con.close()
    result = run_meter("prune", "--older-than", "2026-02-20", "--ledger", str(ledger), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "pruned 116757 rows older than 2026-02-20T00:00:00+00:00\n"
    after = ledger.stat().st_size
    print(f"DuckDB file {before} -> {after} bytes")
    assert after < before * 0.5, (before, after)
    con = duckdb.connect(str(ledger), read_only=True)
    assert con.execute("SELECT count(*) FROM requests").fetchone() == (150_000 - 116_757,)
    assert con.execute(kept_sql).fetchone() == kept
    con.close()


def test_prune_refuses_a_file_open_in_a_running_meter(tmp_path: Path) -> None:
    ledger = tmp_path / "meter.duckdb"
    seeded_duckdb(ledger)
    size = ledger.stat().st_size
    holder = duckdb.connect(str(ledger))  # a running meter holds its file like this
    try:
        line = assert_one_line_error(run_meter("prune", "--older-than", "180d", "--ledger", str(ledger)), str(ledger))
        assert "running meter" in line and "stop" in line
        assert holder.execute("SELECT count(*) FROM requests").fetchone() == (6,)
    finally:
        holder.close()
    assert ledger.stat().st_size == size


def test_prune_bad_arguments(tmp_path: Path) -> None:
    ledger = tmp_path / "meter.duckdb"
    seeded_duckdb(ledger)
    assert_one_line_error(run_meter("prune", "--older-than", "half a year", "--ledger", str(ledger)), "--older-than")
    assert_one_line_error(run_meter("prune", "--older-than", "2999-01-01", "--ledger", str(ledger)), "--older-than", "future")
    assert_one_line_error(run_meter("prune", "--older-than", "180d", "--ledger", str(tmp_path / "missing.duckdb")), "missing.duckdb")
    missing = run_meter("prune", "--ledger", str(ledger))
    assert missing.returncode == 2 and "--older-than" in missing.stderr
    con = duckdb.connect(str(ledger), read_only=True)
    assert con.execute("SELECT count(*) FROM requests").fetchone() == (6,)
    con.close()


def prune_peak_rss(ledger: str) -> tuple[str, int]:
    result, peak = run_with_peak(["prune", "--older-than", "2026-07-01", "--ledger", ledger])
    assert peak is not None, result.stderr
    return result.stdout, peak


def test_prune_memory_does_not_follow_the_ledger(tmp_path: Path, postgres: Any) -> None:
    """Every row goes, from a ledger of 20k rows and one of 400k: nothing is fetched
    into Python, so the process's peak differs by far less than the rows would take."""
    for kind in ("duckdb", "postgresql"):
        peaks = []
        for n in (20_000, 400_000):
            if kind == "duckdb":
                ledger = str(tmp_path / f"{n}.duckdb")
                duckdb_ledger(ledger, duckdb_rows("gpt-4o"), n)
            else:
                ledger = postgres_ledger(postgres.new_database(), postgres_rows("gpt-4o"), n)
            stdout, peak = prune_peak_rss(ledger)
            assert stdout == f"pruned {n} rows older than 2026-07-01T00:00:00+00:00\n"
            peaks.append(peak)
        print(f"{kind}: peak RSS {peaks[0] >> 20} MiB at 20k rows, {peaks[1] >> 20} MiB at 400k")
        # 380k more rows fetched as tuples would take well over 100 MiB.
        assert peaks[1] - peaks[0] < 64 << 20, (kind, peaks)


def test_prune_through_the_ledger_child(tmp_path: Path) -> None:
    """The store `meter serve` writes through prunes the same way, in its child process."""
    from meter.ledger import ChildProcessStore

    store = ChildProcessStore(str(tmp_path / "meter.duckdb"))
    store.open()
    try:
        store.write([background("resp_old", OLD), background("resp_new", NEW)])
        pruned = store.prune(CUT)
        assert (pruned.rows, pruned.usage_claims, pruned.alert_claims) == (1, 1, 0)
        assert store.query("SELECT response_id FROM requests")[1] == [("resp_new",)]
        assert store.query("SELECT response_id FROM usage_claims")[1] == [("resp_new",)]
    finally:
        store.close()


def test_a_span_is_counted_back_from_the_moment_prune_runs(tmp_path: Path) -> None:
    ledger = tmp_path / "meter.duckdb"
    seeded_duckdb(ledger)
    result = run_meter("prune", "--older-than", "180d", "--ledger", str(ledger), "--dry-run")
    assert result.returncode == 0, result.stderr
    cut = dt.datetime.fromisoformat(result.stdout.strip().rsplit(" ", 1)[1])
    assert abs((dt.datetime.now(dt.UTC) - dt.timedelta(days=180) - cut).total_seconds()) < 60, result.stdout


def test_every_file_a_prune_makes_is_owner_only_while_it_runs(tmp_path: Path) -> None:
    """The compacted copy, its WAL and the ledger's WAL hold the ledger's rows while a
    prune runs (seconds on a large ledger).  Created by DuckDB under the shell's umask
    they were 0644 until the copy was narrowed at the end: readable by any local user
    meanwhile.  Watched as they appear, with a umask that lets others read."""
    import subprocess
    import sys
    import threading

    ledger = Path(duckdb_ledger(tmp_path / "big.duckdb", duckdb_rows("gpt-4o"), 400_000))
    os.chmod(ledger, 0o600)
    seen: dict[str, int] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for entry in os.scandir(tmp_path):
                if entry.name != "big.duckdb":
                    try:
                        seen[entry.name] = seen.get(entry.name, 0) | (entry.stat().st_mode & 0o777)
                    except FileNotFoundError:
                        pass
            done.wait(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "meter", "prune", "--older-than", "2026-01-05T00:00:00+00:00", "--ledger", str(ledger)],
            capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o022),
        )
    finally:
        done.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    assert seen, "no file seen beside the ledger while it was pruned"
    assert {name: oct(mode) for name, mode in seen.items() if mode & 0o077} == {}
