"""Named keys (SPEC §3 identity): `meter keys id`, `[keys]` in the config, and where names show.

The raw key is never stored: the ledger has `key_id` (first 16 hex digits of
SHA-256), `key_hint` (`sk-...` + last 4) and the config's name for the key_id.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from decimal import Decimal
from pathlib import Path

import aiohttp

from .conftest import ROOT, ledger_rows
from .test_report import arun_meter, assert_one_line_error, run_meter

KEY_SEARCH = "sk-proj-search-team-Q8x2Lm4N7p"
KEY_OTHER = "sk-proj-other-team-Zz91Kk3WwV"


def sha_id(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def test_keys_id_is_sha256_prefix() -> None:
    from concurrent.futures import ThreadPoolExecutor

    keys = (KEY_SEARCH, KEY_OTHER, "sk-" + "x" * 100, "short")
    # Each run is its own process; they run side by side.
    with ThreadPoolExecutor(8) as pool:
        ids = [pool.submit(run_meter, "keys", "id", stdin=key + "\n") for key in keys]
        # as in the README: echo KEY | meter keys id
        piped = pool.submit(subprocess.run, f"echo '{KEY_SEARCH}' | python -m meter keys id", shell=True, cwd=ROOT, capture_output=True, text=True)
        # surrounding whitespace and CRLF are not part of the key
        padded = pool.submit(run_meter, "keys", "id", stdin=f"  {KEY_SEARCH}\r\n")
        empty = [pool.submit(run_meter, "keys", "id", stdin=stdin) for stdin in ("", "\n")]
    for key, future in zip(keys, ids):
        result = future.result()
        assert result.returncode == 0, result.stderr
        assert result.stdout == sha_id(key) + "\n"
        assert key not in result.stdout + result.stderr
    assert piped.result().stdout.strip() == sha_id(KEY_SEARCH)
    assert padded.result().stdout.strip() == sha_id(KEY_SEARCH)
    for future in empty:
        assert_one_line_error(future.result(), "key")


async def test_config_names_show_in_ledger_metrics_and_reports(upstream, start_meter, tmp_path: Path) -> None:
    search_id, other_id = sha_id(KEY_SEARCH), sha_id(KEY_OTHER)
    # the id comes from `meter keys id`, as an operator would get it
    assert (await arun_meter_stdin(KEY_SEARCH)) == search_id
    config = tmp_path / "meter.toml"
    config.write_text(f'[keys]\n"{search_id}" = "team-search"\n')
    meter = await start_meter(upstream.url, config=str(config))
    usage = {"x-fake-usage": json.dumps({"input_tokens": 10, "output_tokens": 2})}
    async with aiohttp.ClientSession() as s:
        # every header a key can come in: Authorization: Bearer, x-api-key, api-key (Azure)
        for headers in ({"Authorization": f"Bearer {KEY_SEARCH}"}, {"api-key": KEY_SEARCH}, {"x-api-key": KEY_OTHER}, {}):
            async with s.post(meter.url + "/v1/responses", json={"model": "gpt-4o", "input": "hi"}, headers={**headers, **usage}) as r:
                assert r.status == 200
                await r.read()
        async with s.get(meter.admin_url + "/metrics") as r:
            metrics = await r.text()
    rows = await meter.rows()
    assert [(r["key_id"], r["key_hint"], r["key_name"]) for r in rows] == [
        (search_id, "sk-..." + KEY_SEARCH[-4:], "team-search"),
        (search_id, "sk-..." + KEY_SEARCH[-4:], "team-search"),
        (other_id, "sk-..." + KEY_OTHER[-4:], None),
        (None, None, None),
    ]
    # metrics: the name, else the key_id, else `none`
    assert 'key="team-search"' in metrics and f'key="{other_id}"' in metrics and 'key="none"' in metrics
    assert search_id not in metrics
    await meter.stop()
    for secret in (KEY_SEARCH, KEY_OTHER):
        assert secret not in metrics
        assert secret.encode() not in Path(meter.ledger_path).read_bytes()
        assert all(secret not in str(v) for row in ledger_rows(meter.ledger_path) for v in row.values())

    report = await arun_meter("report", "--ledger", str(meter.ledger_path), "--by", "key", "--format", "json")
    assert report.returncode == 0, report.stderr
    got = [(r["key"], r["key_hint"], r["requests"], r["input_tokens"]) for r in json.loads(report.stdout, parse_float=Decimal)]
    # a key without a name shows its key_id, with its hint beside it
    assert got == [(other_id, "sk-..." + KEY_OTHER[-4:], 1, 10), ("team-search", "sk-..." + KEY_SEARCH[-4:], 2, 20), (None, None, 1, 10)]
    table = await arun_meter("report", "--ledger", str(meter.ledger_path), "--by", "key")
    lines = table.stdout.splitlines()
    assert lines[1].split()[:3] == [other_id, "sk-..." + KEY_OTHER[-4:], "1"]
    assert lines[2].split()[:3] == ["team-search", "sk-..." + KEY_SEARCH[-4:], "2"]

    # names given later, in the config used for the report, win over the stored ones
    later = tmp_path / "later.toml"
    later.write_text(f'[keys]\n"{search_id}" = "search-renamed"\n"{other_id}" = "team-other"\n')
    renamed = await arun_meter("report", "--ledger", str(meter.ledger_path), "--by", "key", "--format", "json", "--config", str(later))
    assert [(r["key"], r["requests"]) for r in json.loads(renamed.stdout)] == [("search-renamed", 2), ("team-other", 1), (None, 1)]


async def arun_meter_stdin(key: str) -> str:
    import asyncio
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meter", "keys", "id", cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate((key + "\n").encode())
    assert proc.returncode == 0
    return out.decode().strip()


def test_key_identities_use_config_names() -> None:
    from meter.identity import KeyIdentities, key_hint, key_id

    ids = KeyIdentities({sha_id(KEY_SEARCH): "team-search"})
    assert ids.lookup(KEY_SEARCH) == (sha_id(KEY_SEARCH), "sk-..." + KEY_SEARCH[-4:], "team-search")
    assert ids.lookup(KEY_OTHER) == (sha_id(KEY_OTHER), "sk-..." + KEY_OTHER[-4:], None)
    assert key_id(KEY_SEARCH) == sha_id(KEY_SEARCH) and key_hint(KEY_SEARCH) == "sk-...4N7p"
