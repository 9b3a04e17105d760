"""The rough edges a new user meets in the first hour, each as they would meet it:
`meter` run as a process, the official SDK against a real `meter serve`, the fake
upstream, real logs read back from disk."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from meter.cli import build_parser
from meter.config import ENV_PREFIX, Settings
from meter.identity import key_id

from .conftest import ROOT, SECRET_KEY, free_port, ledger_rows


def run_meter(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meter", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


async def run_meter_async(*args: str) -> subprocess.CompletedProcess[str]:
    """`run_meter` off the event loop, for a meter served by this test's own loop."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: run_meter(*args))


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def serve_log(proc) -> str:  # type: ignore[no-untyped-def]
    return Path(proc.log_path).read_text(errors="replace")


# 1. `--config` with `--url` ----------------------------------------------


async def test_report_url_honours_config_names_over_the_meters(upstream, meter_process, tmp_path: Path) -> None:
    served = tmp_path / "served.toml"
    served.write_text(f'[keys]\n"{key_id(SECRET_KEY)}" = "team-search"\n')
    proc = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"), "--config", str(served))
    await openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key=SECRET_KEY, max_retries=0).responses.create(model="gpt-4o", input="hi")
    other = tmp_path / "names.toml"
    other.write_text(f'[keys]\n"{key_id(SECRET_KEY)}" = "renamed"\n"{key_id("another")}" = "team-other"\n')

    async def keys(*extra: str) -> list[str | None]:
        result = await run_meter_async("report", "--url", proc.admin_url, "--by", "key", "--format", "json", *extra)
        assert result.returncode == 0, result.stderr
        return [row["key"] for row in json.loads(result.stdout)]

    assert await keys() == ["team-search"]  # the meter's own names
    assert await keys("--config", str(other)) == ["renamed"]  # the flag's over them
    assert await keys("--config", str(other), "--where", "key=renamed") == ["renamed"]  # in --where too
    assert await keys("--config", str(other), "--where", "key=team-search") == []
    # A body that is not a [keys] table is one line, 400; a raw key in it is not echoed.
    async with aiohttp.ClientSession() as http:
        for body in (b"not json", json.dumps({"keys": {SECRET_KEY: "x"}}).encode()):
            async with http.post(proc.admin_url + "/api/report", data=body) as answer:
                text = await answer.text()
                assert answer.status == 400 and json.loads(text)["error"].startswith("keys: ") and SECRET_KEY not in text, text
    # `meter budgets --url` shows the meter's own budgets: a config there cannot apply.
    line = one_error_line(await run_meter_async("budgets", "--url", proc.admin_url, "--config", str(other)))
    assert line.startswith("meter: error: --config does not apply with --url"), line


# 2. `--upstream http://host/v1` ---------------------------------------------


async def test_upstream_ending_in_v1_warns_with_the_doubled_path(upstream, meter_process, tmp_path: Path) -> None:
    doubled = meter_process("--upstream", upstream.url + "/v1", "--ledger", str(tmp_path / "a.duckdb"))
    plain = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "b.duckdb"))
    doubled.stop()
    plain.stop()
    [warning] = [line for line in serve_log(doubled).splitlines() if " WARNING " in line]
    assert "/v1/v1/responses" in warning and f"set --upstream {upstream.url} " in warning, warning
    assert "/v1/v1" not in serve_log(plain) and " WARNING " not in serve_log(plain)


# 3. `--access-log` ----------------------------------------------------------


async def test_access_log_one_line_per_request_never_the_key(upstream, meter_process, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.duckdb"
    config = tmp_path / "meter.toml"
    config.write_text(f'[keys]\n"{key_id(SECRET_KEY)}" = "team-search"\n')
    # The variable turns it on; its lines show even when the rest of the log is at warning.
    proc = meter_process(
        "--upstream",
        upstream.url,
        "--ledger",
        str(ledger),
        "--config",
        str(config),
        "--log-level",
        "warning",
        env={"METER_ACCESS_LOG": "true"},
    )
    client = openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key=SECRET_KEY, max_retries=0)
    response = await client.responses.create(model="gpt-4o", input="hi")
    await client.models.list(extra_query={"key": SECRET_KEY})
    proc.stop()
    lines = [line.split("meter.access: ", 1)[1] for line in serve_log(proc).splitlines() if "meter.access: " in line]
    assert len(lines) == 2, serve_log(proc)
    [row] = ledger_rows(ledger, "path = '/v1/responses'")
    usage = response.usage
    assert usage is not None
    kid = key_id(SECRET_KEY)
    pattern = (
        rf"POST /v1/responses 200 model={re.escape(row['model'])} tokens={usage.input_tokens}/{usage.output_tokens} "
        rf"cost_usd={re.escape(str(row['cost_usd']))} duration_ms=\d+ key_id={kid}"
    )
    assert re.fullmatch(pattern, lines[0]), (pattern, lines[0])
    assert re.fullmatch(rf"GET /v1/models 200 model=- tokens=-/- cost_usd=- duration_ms=\d+ key_id={kid}", lines[1]), lines[1]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET_KEY.encode() not in path.read_bytes(), path


async def test_access_log_is_off_by_default(upstream, meter_process, tmp_path: Path) -> None:
    proc = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"))
    await openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key=SECRET_KEY, max_retries=0).responses.create(model="gpt-4o", input="hi")
    proc.stop()
    assert "meter.access" not in serve_log(proc)


def test_access_log_quotes_a_hostile_model_name() -> None:
    from meter.access_log import access_line
    from meter.record import Record

    line = access_line(
        Record(id=None, started_at=0, finished_at=0, method="POST", path="/v1/responses", endpoint="responses", model="x\nFAKE 200 line")
    )
    assert "\n" not in line and 'model="x\\nFAKE 200 line"' in line, line


# 4. a 502 names the upstream; its warning is rate-limited -------------------


async def test_502_names_the_upstream_and_logs_one_line_per_interval(start_meter, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    meter = await start_meter(f"http://127.0.0.1:{port}")
    client = openai.AsyncOpenAI(base_url=meter.url + "/v1", api_key=SECRET_KEY, max_retries=0)
    caplog.set_level(logging.WARNING, logger="meter")

    async def fail() -> str:
        with pytest.raises(openai.APIStatusError) as info:
            await client.responses.create(model="gpt-4o", input="hi")
        assert info.value.status_code == 502
        body = info.value.body
        assert isinstance(body, dict)
        return str(body["message"])

    for _ in range(3):
        message = await fail()
        assert f"upstream 127.0.0.1:{port}" in message and "ClientConnectorError" in message, message
    failed = [r.getMessage() for r in caplog.records if "upstream request failed" in r.getMessage()]
    assert len(failed) == 1 and f"upstream 127.0.0.1:{port}" in failed[0], failed
    assert meter.meter.proxy is not None
    meter.meter.proxy._unreachable_logged_at -= 60  # the interval has passed
    await fail()
    failed = [r.getMessage() for r in caplog.records if "upstream request failed" in r.getMessage()]
    assert len(failed) == 2 and "(2 more failed since the last such line)" in failed[1], failed
    assert SECRET_KEY not in caplog.text
    # A WebSocket upgrade's 502 names it too.
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    async with aiohttp.ClientSession() as http, http.get(meter.url + "/v1/responses", headers=upgrade) as answer:
        assert answer.status == 502
        message = (await answer.json())["error"]["message"]
    assert message == f"meter could not reach the upstream 127.0.0.1:{port}: ClientConnectorError.", message


# 5. `meter --version` ------------------------------------------------------


def test_version_is_the_installed_distributions() -> None:
    dists = importlib.metadata.packages_distributions()["meter"]
    result = run_meter("--version")
    assert result.returncode == 0, result
    assert result.stdout == f"meter {importlib.metadata.version(dists[0])}\n"


# 6. `[keys]` validated -----------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "number"),
    [
        (f'"{SECRET_KEY}" = "team"', 1),  # the key pasted where its id goes
        (f'"{key_id("a")}" = "ok"\n"team" = "{SECRET_KEY}"', 2),  # the key pasted as a name
        (f'"{key_id("a")}" = "ok"\n"{"ab12" * 12}" = "long"', 2),  # too long for a key_id: a key of another shape
        (f'"{key_id("a")}" = "AIzaSyD4x9Qw3Lk2m0Zr8Tn5Vb7Xc1Yh6Jp0ab12"', 1),  # another provider's key as a name
        (f'"{key_id("a")}" = "ok"\n"{key_id("b")}" = "{"0a1b2c3d" * 4}"', 2),  # a hex key (Azure's shape) as a name
    ],
)
def test_a_raw_key_in_keys_is_refused_without_being_echoed(tmp_path: Path, entry: str, number: int) -> None:
    config = tmp_path / "meter.toml"
    config.write_text(f"[keys]\n{entry}\n")
    line = one_error_line(run_meter("serve", "--config", str(config), "--ledger", str(tmp_path / "l.duckdb")))
    assert line.startswith(f"meter: error: config: [keys] entry {number} holds what looks like a raw API key"), line
    assert (
        SECRET_KEY not in line
        and SECRET_KEY[:12] not in line
        and "ab12ab12" not in line
        and "AIzaSy" not in line
        and "0a1b2c3d" not in line
    )
    assert not (tmp_path / "l.duckdb").exists()


@pytest.mark.parametrize("name", ["team\\u0000a", "team\\nsearch", "team\\u0085"])
def test_a_key_name_with_a_control_character_is_refused(tmp_path: Path, name: str) -> None:
    # Every row's key_name and a metric label: PostgreSQL refuses a NUL in text, so each
    # of that key's records would go to the rejected file instead of the ledger.
    config = tmp_path / "meter.toml"
    config.write_text(f'[keys]\n"{key_id("a")}" = "ok"\n"{key_id("b")}" = "{name}"\n')
    line = one_error_line(run_meter("serve", "--config", str(config), "--ledger", str(tmp_path / "l.duckdb")))
    assert line == f"meter: error: config: [keys] entry 2 ({key_id('b')}): a key's name has no control characters", line
    assert not (tmp_path / "l.duckdb").exists()


def test_long_team_names_are_not_taken_for_keys(tmp_path: Path) -> None:
    from meter.config import load_settings

    config = tmp_path / "meter.toml"
    names = {
        key_id("a"): "platform-infrastructure-search-relevance-team",
        key_id("b"): "Search relevance team for the 2026 relaunch",
        key_id("c"): "team-search-2026-relaunch-europe-1",
    }
    config.write_text("[keys]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in names.items()))
    assert load_settings({"config": str(config)}, env={}).keys == names


def test_a_key_id_that_is_not_16_hex_digits_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "meter.toml"
    config.write_text(f'[keys]\n"{key_id("a")}" = "ok"\n"team-search" = "x"\n')
    line = one_error_line(run_meter("serve", "--config", str(config)))
    assert line == "meter: error: config: [keys] entry 2 ('team-search'): a key_id is 16 lower-case hex digits, from `meter keys id`", line


# 7. every flag names its variable -------------------------------------------


def _subparsers(parser: argparse.ArgumentParser, name: str = "meter") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _subparsers(sub, f"{name} {sub_name}")
    return found


def test_every_flag_with_a_variable_names_it_in_help() -> None:
    settings = set(Settings.model_fields)
    checked = 0
    for command, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or action.dest in ("help",):
                continue
            assert action.help and not action.help.startswith("("), (command, action.option_strings, action.help)
            if action.dest in settings:
                variable = ENV_PREFIX + action.dest.upper()
                assert variable in action.help, (command, action.option_strings, action.help)
                checked += 1
    assert checked >= 25  # every serve setting, and report's, reprice's and budgets' --ledger and --config


def test_serve_honours_every_variable_its_help_names() -> None:
    from meter.config import settings_from_env

    serve = dict(_subparsers(build_parser()))["meter serve"]
    for action in serve._actions:
        for variable in re.findall(r"METER_[A-Z_]+", action.help or ""):
            name = variable.removeprefix(ENV_PREFIX).lower()
            assert name in Settings.model_fields and settings_from_env({variable: "x"}) == {name: "x"}, variable


# 8. one error prefix -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "prefix"),
    [
        (("serve", "--no-such-flag"), "meter: error: serve: unrecognized arguments: --no-such-flag"),
        (("serve", "--log-level", "loud"), "meter: error: serve: argument --log-level: invalid choice"),
        (("serve", "--max-request-bytes", "many"), "meter: error: serve: argument --max-request-bytes: invalid int value"),
        (("report", "--format", "xml"), "meter: error: report: argument --format: invalid choice"),
        (("report", "--since", "yesterday-ish"), "meter: error: "),
        (("keys",), "meter: error: keys: the following arguments are required: id"),
        (("bogus",), "meter: error: argument command: invalid choice"),
        ((), "meter: error: the following arguments are required: command"),
    ],
)
def test_every_usage_error_has_one_prefix(args: tuple[str, ...], prefix: str) -> None:
    line = one_error_line(run_meter(*args))
    assert line.startswith(prefix), line
    assert line.count("error:") == 1, line


# 9. a typo'd flag ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("serve", "--upstrem", "http://127.0.0.1:1"),
            "meter: error: serve: unrecognized arguments: --upstrem http://127.0.0.1:1 (did you mean --upstream? `meter serve --help` lists the options)",
        ),
        (
            ("report", "--sinse=7d"),
            "meter: error: report: unrecognized arguments: --sinse=7d (did you mean --since? `meter report --help` lists the options)",
        ),
        (("keys", "id", "--hex"), "meter: error: keys id: unrecognized arguments: --hex (`meter keys id --help` lists the options)"),
        # Nothing near it: no option is offered (`--spool` was, for `--foo`).
        (("serve", "--foo"), "meter: error: serve: unrecognized arguments: --foo (`meter serve --help` lists the options)"),
        (("report", "7d"), "meter: error: report: unrecognized arguments: 7d (`meter report --help` lists the options)"),
    ],
)
def test_an_unknown_flag_is_named_with_its_command_and_the_closest_option(
    args: tuple[str, ...], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # argparse reports it from the top parser, with no command and no hint: a user who
    # typed `--upstrem` was left to read `meter --help`, which lists no option of serve.
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(list(args))
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]


def refusal(flags: dict[str, str], env: dict[str, str] | None = None) -> str:
    """What loading these settings is refused with (a `SettingError`'s text)."""
    from meter.config import SettingError, load_settings

    with pytest.raises(SettingError) as refused:
        load_settings(flags, env=env or {})
    return str(refused.value)


def setting_error(flags: dict[str, str]) -> str:
    """The line `meter serve` ends with for these flags (main() prefixes `meter: error: `)."""
    return f"meter: error: {refusal(flags)}"


# 10. the config file's usual mistakes ----------------------------------------

MISPLACED = "TOML reads every line after a [table] header as part of that table; move the settings above the first [table]"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        # TOML puts every line after a [table] header into that table: the setting was
        # reported as a bad key_id, or as a price missing, never as the setting it is.
        (
            f'[keys]\n"{key_id("a")}" = "team-search"\nupstream = "http://127.0.0.1:1"\n',
            f"meter: error: config: upstream = ... is inside [keys]: {MISPLACED}",
        ),
        (
            '[prices]\nprovider = "openai"\nledger = "meter.duckdb"\n',
            f"meter: error: config: ledger = ... is inside [prices]: {MISPLACED}",
        ),
        (
            '[[budgets]]\nname = "all"\nwindow = "day"\nlimit_usd = 1\nflush_interval = 0.1\n',
            f"meter: error: config: flush_interval = ... is inside [[budgets]]: {MISPLACED}",
        ),
        # A misspelt setting names the one it is closest to.
        ('upstrem = "http://127.0.0.1:1"\n', "meter: error: config: unknown setting 'upstrem' in meter.toml (did you mean 'upstream'?)"),
        ('admin-listn = "127.0.0.1:9464"\n', "meter: error: config: unknown setting 'admin-listn' in meter.toml (did you mean 'admin-listen'?)"),
        ("colour = 1\n", "meter: error: config: unknown setting 'colour' in meter.toml"),
    ],
)
def test_a_config_mistake_is_named_as_the_user_made_it(tmp_path: Path, text: str, line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "meter.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert setting_error({"config": "meter.toml"}) == line


def test_a_config_mistake_ends_meter_serve_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "meter.toml").write_text('[keys]\nlisten = "127.0.0.1:1"\n')
    result = subprocess.run(
        [sys.executable, "-m", "meter", "serve", "--config", "meter.toml", "--ledger", "l.duckdb"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert one_error_line(result) == f"meter: error: config: listen = ... is inside [keys]: {MISPLACED}"
    assert not (tmp_path / "l.duckdb").exists()


def test_a_setting_below_a_models_price_is_named_too(tmp_path: Path) -> None:
    from meter.config import load_settings

    config = tmp_path / "meter.toml"
    config.write_text('[prices."my-finetune"]\ninput_mtok = 2.5\noutput_mtok = 10\nlisten = "127.0.0.1:8081"\n')
    refused = refusal({"config": str(config)})
    assert refused.startswith('config: listen = ... is inside [prices."my-finetune"]: '), refused
    # A model's own table is a model's, whatever its name.
    config.write_text('[prices."listen"]\ninput_mtok = 2.5\noutput_mtok = 10\n')
    assert set(load_settings({"config": str(config)}, env={}).price_overrides) == {"listen"}


# 11. a misspelt variable -----------------------------------------------------


def test_a_misspelt_variable_is_named_not_silently_ignored(tmp_path: Path) -> None:
    # METER_LEDGR was ignored without a word: meter wrote meter.duckdb in the working
    # directory, and the ledger the user named stayed empty.  Its value is never shown
    # (METER_ADMIN_TOKN holds a secret).
    env = {"METER_LEDGR": "mine.duckdb", "METER_ADMIN_TOKN": "s3cret-token", "METER_PG_BIN": "/usr/lib/postgresql/15/bin"}
    result = run_meter("sql", "--ledger", str(tmp_path / "none.duckdb"), "SELECT 1", env=env)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("meter: warning: ")]
    assert warnings == [
        "meter: warning: METER_ADMIN_TOKN is not a meter variable and is ignored; did you mean METER_ADMIN_TOKEN?",
        "meter: warning: METER_LEDGR is not a meter variable and is ignored; did you mean METER_LEDGER?",
    ], result.stderr
    assert "s3cret-token" not in result.stderr
    clean = run_meter("keys", "id", env={"METER_PG_BIN": "/usr/lib/postgresql/15/bin"})  # no setting's near-namesake: not a typo
    assert "warning" not in clean.stderr, clean.stderr


# 12. an address or URL written the short way ----------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "line"),
    [
        ("--listen", "8080", "meter: error: listen: expected HOST:PORT, got '8080'; a port alone is not an address: 127.0.0.1:8080 listens on this machine only"),
        ("--admin-listen", "9464", "meter: error: admin-listen: expected HOST:PORT, got '9464'; a port alone is not an address: 127.0.0.1:9464 listens on this machine only"),
        ("--upstream", "localhost:8000", "meter: error: upstream: expected an http(s) URL with a host, got 'localhost:8000'; did you mean http://localhost:8000?"),
        ("--upstream", "api.openai.com", "meter: error: upstream: expected an http(s) URL with a host, got 'api.openai.com'; did you mean https://api.openai.com?"),
        ("--upstream", "ftp://example.com", "meter: error: upstream: expected an http(s) URL with a host, got 'ftp://example.com'"),
        # A gateway's password is masked, with the scheme or without it (it was shown whole).
        (
            "--upstream",
            "gw:s3cret@gw.example.com",
            "meter: error: upstream: expected an http(s) URL with a host, got 'gw:***@gw.example.com'; did you mean https://gw:***@gw.example.com?",
        ),
    ],
)
def test_an_address_written_the_short_way_says_how_to_write_it(flag: str, value: str, line: str) -> None:
    assert setting_error({flag.removeprefix("--").replace("-", "_"): value}) == line


# 13. `meter keys id` at a terminal ---------------------------------------------


def test_keys_id_at_a_terminal_asks_for_the_key_and_does_not_show_it() -> None:
    # Run as `meter keys id` with nothing piped in, it waited without a word, and the
    # key pasted into it was echoed on the screen and into the terminal's scrollback.
    import pty
    import select
    import signal
    import time

    pid, terminal = pty.fork()
    if pid == 0:  # the child: meter, with the pseudo-terminal as its controlling terminal
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "meter", "keys", "id"])

    def read_until(wanted: bytes, timeout: float = 30) -> bytes:
        seen = b""
        while wanted not in seen:
            ready, _, _ = select.select([terminal], [], [], timeout)
            if not ready:
                break
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        return seen

    def reap(pid: int) -> int:
        """The child's wait status; killed if it is still waiting for its key after 5 s."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        return os.waitpid(pid, 0)[1]

    try:
        prompt = read_until(b": ", timeout=5)
        os.write(terminal, SECRET_KEY.encode() + b"\n")
        rest = read_until(key_id(SECRET_KEY).encode())
    finally:
        status = reap(pid)
        os.close(terminal)
    assert prompt.decode().strip() == "API key (not shown):", prompt
    assert os.waitstatus_to_exitcode(status) == 0
    assert key_id(SECRET_KEY).encode() in rest and SECRET_KEY.encode() not in prompt + rest, rest


def test_a_file_setting_spelt_as_its_flag_and_an_empty_variable_are_as_documented(tmp_path: Path) -> None:
    # docs/config.md: the file takes `admin-listen` as well as `admin_listen`, and an
    # empty variable (`METER_LISTEN=` left in a shell) counts as unset.
    from meter.config import load_settings

    config = tmp_path / "meter.toml"
    config.write_text('admin-listen = "127.0.0.1:2222"\nlisten = "127.0.0.1:1111"\n')
    settings = load_settings({"config": str(config)}, env={"METER_LISTEN": "", "METER_ADMIN_LISTEN": ""})
    assert (settings.admin_listen, settings.listen) == ("127.0.0.1:2222", "127.0.0.1:1111")


def test_a_config_file_that_names_another_is_refused(tmp_path: Path) -> None:
    # `config = "other.toml"` in a file was dropped without a word: the settings the user
    # put in other.toml never applied.
    (tmp_path / "other.toml").write_text('listen = "127.0.0.1:1111"\n')
    config = tmp_path / "meter.toml"
    config.write_text(f'config = "{tmp_path / "other.toml"}"\n')
    assert refusal({"config": str(config)}) == f"config: {config} names another config file (config = ...); a config file is given only by --config or METER_CONFIG"


def test_a_bad_value_names_where_it_was_set(tmp_path: Path) -> None:
    """A value from the environment or the config file is named with its source: in a
    container, `flush-interval: ...` alone leaves the user looking for a flag nobody gave."""
    from_env = refusal({}, {"METER_FLUSH_INTERVAL": "abc"})
    assert from_env.startswith("flush-interval: ") and from_env.endswith(" (set by METER_FLUSH_INTERVAL)")
    config = tmp_path / "meter.toml"
    config.write_text("flush_interval = 7\n")
    assert refusal({"config": str(config)}).endswith(f" (set in {config})")
    from_flag = refusal({"flush_interval": "abc"}, {"METER_FLUSH_INTERVAL": "0.5"})
    assert from_flag.endswith("unable to parse string as a number")  # the flag just typed: named as it is


def test_a_meter_command_loads_the_price_data_only_when_it_prices() -> None:
    """`meter report` (and every command but `serve` and `reprice`) prices nothing: its
    start does not load the price package (~30 ms and ~20 MiB at every run of a command;
    this suite alone runs hundreds)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "meter", "report", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    modules = {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "meter.cli" in modules  # the parser of every command was built
    assert not {"genai_prices", "meter.prices", "meter.report.reprice"} & modules
