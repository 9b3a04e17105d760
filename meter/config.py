"""Settings: defaults, then the TOML file, then `METER_*` variables, then flags.

`load_settings` merges the layers and validates once with pydantic; a bad value
raises `SettingError` naming the setting, which the CLI prints as one line.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from yarl import URL

from .errors import StartupError  # noqa: F401 - re-exported: callers import it from here
from .tag_labels import tag_label_names


class SettingError(Exception):
    """A setting that cannot be used; the message names it."""




def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        # `--listen 8080` is the usual first try; `:8080` would listen on every interface.
        alone = f"; a port alone is not an address: 127.0.0.1:{value} listens on this machine only" if value.isdigit() else ""
        raise ValueError(f"expected HOST:PORT, got {value!r}{alone}")
    return (host.strip("[]") or "0.0.0.0"), int(port)


# Query parameters that carry a secret in a PostgreSQL URL (asyncpg and libpq read both).
SECRET_QUERY_KEYS = ("password", "sslpassword")

# The longest any timeout or grace period may be: a day.
MAX_SECONDS = 86_400.0


# How meter's admin API asks for its token (the 401's `WWW-Authenticate`): a client
# sends the token only to an address that asked for it so (`meter.report.client`).
ADMIN_CHALLENGE = 'Bearer realm="meter admin"'


def clean_admin_token(value: str) -> str:
    """The admin token as every client sends it (ValueError, never quoting it, when no
    client can): without surrounding whitespace, which a token kept in a file ends with
    (a line break) and no header carries, and printable ASCII, the only characters a
    browser, urllib and curl all send as the same bytes."""
    token = value.strip()
    if not token or not all(" " <= c <= "~" for c in token):
        raise ValueError("the admin token must be printable ASCII, with no line break or other control character inside it")
    return token


def redact_url(url: str) -> str:
    """A URL fit for logs and errors: the password replaced, in the userinfo or in the
    query (`?password=`, which asyncpg takes as well)."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "<unparsable URL>"
    if parsed.password is not None:
        parsed = parsed.with_password("***")
    if any(key in parsed.query for key in SECRET_QUERY_KEYS):
        parsed = parsed.with_query([(k, "***" if k in SECRET_QUERY_KEYS else v) for k, v in parsed.query.items()])
    return str(parsed)


class PriceOverride(BaseModel):
    """A model's price from the config (`[prices."model"]`), USD per million tokens
    (web searches: USD per call).  Its shape only: `meter.prices` applies it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_mtok: Decimal = Field(ge=0)
    cached_mtok: Decimal | None = Field(None, ge=0)
    cache_write_mtok: Decimal | None = Field(None, ge=0)
    output_mtok: Decimal = Field(ge=0)
    web_search_per_call: Decimal | None = Field(None, ge=0)


# What a budget may match on (SPEC §11), besides `tag:<name>`.
BUDGET_MATCH_FIELDS = ("key", "project", "user", "model")
_BUDGET_TAG = re.compile(r"tag:[A-Za-z0-9_-]{1,64}")
# C0, DEL and C1: a budget's name is the `Meter-Budget` header of its refusals, where a
# line break cannot be sent (the client saw a dropped connection) and clients refuse the rest.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Budget(BaseModel):
    """One `[[budgets]]` entry: what it matches, its calendar window (UTC), its limit,
    whether it only watches or also refuses, and the shares of the limit that alert.
    Its shape only: `meter.budgets` keeps the spend and enforces it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    match: dict[str, str] = Field(default_factory=dict)  # all must match; none = everything
    window: Literal["day", "week", "month"]
    limit_usd: Decimal = Field(gt=0, max_digits=18, decimal_places=9)
    mode: Literal["observe", "enforce"] = "observe"
    alert_at: tuple[float, ...] = ()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("a budget's name has no control characters (it is the Meter-Budget header of a refusal)")
        return value

    @field_validator("match")
    @classmethod
    def _match(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, wanted in value.items():
            field = name.lower() if name.lower() in BUDGET_MATCH_FIELDS else name
            if field not in BUDGET_MATCH_FIELDS and not _BUDGET_TAG.fullmatch(field):
                raise ValueError(f"unknown match field {name!r} (expected key, project, user, model or tag:<name>)")
            if field.startswith("tag:"):
                field = field.lower()  # tag names are stored lower-case
            out[field] = wanted
        return out

    @field_validator("alert_at")
    @classmethod
    def _alert_at(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        for share in value:
            if not 0 < share <= 1:
                raise ValueError(f"alert_at {share!r} is outside (0, 1]")
        return tuple(sorted(set(value)))


class Alerts(BaseModel):
    """`[alerts]`: where budget alerts are POSTed (SPEC §11).  Its shape only:
    `meter.budgets.alerts` claims and sends them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhooks: tuple[str, ...] = ()

    @field_validator("webhooks")
    @classmethod
    def _webhooks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, url in enumerate(value):
            try:
                parsed = URL(url)
            except (ValueError, TypeError):
                parsed = None
            if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
                # Never the URL itself: a webhook's often holds its secret in the path
                # (Slack's), and a missing https:// left the whole of it in the logs.
                if parsed is None:
                    got = "one that cannot be read"
                elif parsed.scheme not in ("http", "https"):
                    got = f"scheme {parsed.scheme!r}" if parsed.scheme else "no scheme"
                else:
                    got = "no host"
                raise ValueError(f"webhooks[{i}]: expected an http(s) URL with a host, got {got} (the URL is not shown: it may hold a secret)")
        return value


class Reconcile(BaseModel):
    """`[reconcile]`: what `meter reconcile` reads the provider with and how strictly it
    compares.  The admin key itself is never a setting: only its variable's name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    admin_key_env: str = Field(default="OPENAI_ADMIN_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    projects: tuple[str, ...] = ()  # provider project ids to compare; empty: all
    tolerance: float = Field(default=0.0, ge=0, le=1)  # a fraction of the larger figure: 0.01 is 1%


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upstream: str = "https://api.openai.com"
    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:9464"
    ledger: str = "meter.duckdb"
    config: str | None = None
    spool: str | None = None  # default: beside the ledger file
    # Timeouts are finite and at most a day: `inf` passed validation and broke the loop
    # at the first request (an OverflowError, every request a 502).
    connect_timeout: float = Field(10.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    upstream_timeout: float = Field(600.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)  # longest silence between upstream bytes
    max_request_bytes: int = Field(64 << 20, gt=0)
    max_buffered_request_bytes: int = Field(256 << 20, gt=0)  # all request bodies being held at once
    client_timeout: float = Field(60.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)  # longest silence while a client sends its body
    max_metered_bytes: int = Field(64 << 20, gt=0)  # bytes meter holds to meter one answer or event
    max_metered_bytes_total: int = Field(256 << 20, gt=0)  # what all answers being metered hold whole at once
    admin_token: str | None = None  # Bearer token for every admin path but /healthz and /readyz
    admin_insecure: bool = False  # allow a non-loopback admin address without a token
    flush_interval: float = Field(0.5, gt=0, le=1.0)
    ledger_max_pending: int = Field(100_000, ge=2)  # half of it is taken back from a spool at a time: at least 1
    shutdown_grace: float = Field(30.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    metrics_max_keys: int = Field(100, ge=0)
    metrics_key_label: Literal["on", "off"] = "on"
    metrics_tag_labels: tuple[str, ...] = ()  # tag names whose values label the request, token and cost metrics
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False  # one line per request on the `meter.access` logger
    keys: dict[str, str] = Field(default_factory=dict)  # key_id -> name
    price_provider: str | None = None
    price_overrides: dict[str, PriceOverride] = Field(default_factory=dict)
    budgets: tuple[Budget, ...] = ()  # `[[budgets]]` in the config file only
    alerts: Alerts = Field(default_factory=Alerts)  # `[alerts]` in the config file only
    reconcile: Reconcile = Field(default_factory=Reconcile)  # `[reconcile]` in the config file only
    reconcile_every: float | None = None  # seconds between reconciliations inside `meter serve`; None: off

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        # The value is quoted as redact_url shows it: a gateway's URL may hold user:password@.
        try:
            url = URL(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a URL: {redact_url(value)!r}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"expected an http(s) URL with a host, got {_shown_upstream(value)!r}{_with_a_scheme(value)}")
        return value.rstrip("/")

    @field_validator("metrics_tag_labels", mode="before")
    @classmethod
    def _tag_labels(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, (str, list, tuple)):
            return tag_label_names(value)
        raise ValueError("expected tag names, comma-separated")

    @field_validator("reconcile_every", mode="before")
    @classmethod
    def _reconcile_every(cls, value: Any) -> float | None:
        return parse_interval(value)

    @field_validator("admin_token")
    @classmethod
    def _admin_token(cls, value: str | None) -> str | None:
        return clean_admin_token(value) if value else value

    @field_validator("listen", "admin_listen")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("ledger")
    @classmethod
    def _ledger(cls, value: str) -> str:
        if not value:
            raise ValueError("empty ledger")
        if "://" in value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"a ledger is a file path or a postgresql:// URL, got {redact_url(value)!r}")
        return value

    @property
    def ledger_is_postgres(self) -> bool:
        return self.ledger.startswith(("postgresql://", "postgres://"))

    def spool_path(self) -> Path:
        if self.spool:
            return Path(self.spool)
        if self.ledger_is_postgres or self.ledger == ":memory:":
            return Path("meter-spool.jsonl")
        return Path(self.ledger + ".spool.jsonl")


def _shown_upstream(value: str) -> str:
    """An upstream as an error may show it: a gateway's password masked, with or without
    the scheme (`user:pass@host` without one is no URL to `redact_url`, which showed it whole)."""
    if "://" in value:
        return redact_url(value)
    userinfo, at, rest = value.rpartition("@")
    if at and ":" in userinfo:
        return f"{userinfo.split(':', 1)[0]}:***@{rest}"
    return value


def _with_a_scheme(value: str) -> str:
    """`; did you mean http://localhost:8000?` for an upstream written without its scheme:
    http for this machine (a local gateway or model server), https for any other host."""
    if "://" in value or not value or value.startswith("/"):
        return ""
    try:
        host = URL(f"http://{value}").host or ""
    except (ValueError, TypeError):
        return ""
    if not host:
        return ""
    scheme = "http" if host in ("localhost", "::1") or host.startswith("127.") else "https"
    return f"; did you mean {redact_url(f'{scheme}://{value}')}?"


def upstream_path_warning(upstream: str) -> str | None:
    """What to say at start-up when the upstream's path ends in `/v1` (the
    OPENAI_BASE_URL habit): an SDK pointed at meter's `/v1` adds its own, and the
    upstream gets `/v1/v1/...`, usually a 404."""
    url = URL(upstream)
    if not url.path.rstrip("/").endswith("/v1"):
        return None
    base = str(url.with_path(url.path.rstrip("/").removesuffix("/v1") or "/").with_password("***" if url.password else None)).rstrip("/")
    shown = redact_url(upstream)
    return (
        f"upstream {shown} ends in /v1: an SDK whose base_url is meter's /v1 sends /v1/responses, "
        f"which goes to {shown}/v1/responses (/v1/v1/responses); set --upstream {base} (METER_UPSTREAM) "
        "unless the upstream really serves that path"
    )


_INTERVAL = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", re.IGNORECASE)
_INTERVAL_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(value: Any) -> float | None:
    """`1h`, `30m`, `90s`, `1d` or a number of seconds; `off`, empty or 0 turn the schedule off."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "0")):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _INTERVAL.fullmatch(value)):
        seconds = float(match.group(1)) * _INTERVAL_SECONDS[match.group(2).lower()]
    else:
        raise ValueError(f"expected an interval such as 1h, 30m or 90s, got {value!r}")
    if not math.isfinite(seconds):
        # TOML has nan and inf: nan slipped past both tests below and ran reconciliations
        # back to back (the wait after one, max(0, nan - elapsed), is 0).
        raise ValueError(f"expected an interval such as 1h, 30m or 90s, got {value!r}")
    if seconds == 0:
        return None
    if seconds < 1:
        raise ValueError(f"an interval of at least 1s, got {value!r}")
    return seconds


ENV_PREFIX = "METER_"
# Settings the file and environment may set; flags use the same names with dashes.
_SCALAR_SETTINGS = [name for name in Settings.model_fields if name not in ("keys", "price_overrides", "price_provider", "budgets", "alerts", "reconcile")]


def settings_from_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise SettingError(f"config: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingError(f"config: {path} is not valid TOML: {exc}") from exc
    check_no_setting_inside_a_table(data)
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = name.replace("-", "_")
        if key == "keys":
            if not isinstance(value, dict):
                raise SettingError("config: [keys] must map key_id to name")
            out["keys"] = keys_from_toml(value)
        elif key == "prices":
            if not isinstance(value, dict):
                raise SettingError("config: [prices] must be a table")
            prices = dict(value)
            provider = prices.pop("provider", None)
            if provider is not None:
                out["price_provider"] = provider
            out["price_overrides"] = prices
        elif key == "budgets":
            out["budgets"] = budgets_from_toml(value)
        elif key == "alerts":
            out["alerts"] = alerts_from_toml(value)
        elif key == "reconcile":
            out["reconcile"] = reconcile_from_toml(value)
        elif key == "config":
            # Dropped without a word before, so the other file's settings never applied.
            raise SettingError(f"config: {path} names another config file (config = ...); a config file is given only by --config or METER_CONFIG")
        elif key in _SCALAR_SETTINGS:
            out[key] = value
        else:
            raise SettingError(f"config: unknown setting {name!r} in {path}{nearest_setting(name)}")
    check_budget_keys(out.get("budgets", ()), out.get("keys", {}))
    return out


# The config file's tables, as their headers are written.
_TABLE_HEADERS = {"keys": "[keys]", "prices": "[prices]", "budgets": "[[budgets]]", "alerts": "[alerts]", "reconcile": "[reconcile]"}


def check_no_setting_inside_a_table(data: Mapping[str, Any]) -> None:
    """A setting written below a `[table]` header belongs, to TOML, to that table: it was
    reported as a bad key_id or a price without its fields, never as the misplaced
    setting it is.  No entry of any table is named like a setting with a plain value."""
    for label, table in _config_tables(data):
        for entry, value in table.items():
            if str(entry).replace("-", "_") in _SCALAR_SETTINGS and not isinstance(value, dict):
                raise SettingError(
                    f"config: {entry} = ... is inside {label}: TOML reads every line after a [table] header "
                    "as part of that table; move the settings above the first [table]"
                )


def _config_tables(data: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[Any, Any]]]:
    """Each table of the file as its header is written: `[keys]`, each `[[budgets]]`, each `[prices."model"]`..."""
    for name, value in data.items():
        header = _TABLE_HEADERS.get(name.replace("-", "_"))
        for table in value if isinstance(value, list) else [value]:
            if header is None or not isinstance(table, dict):
                continue
            yield header, table
            if header == "[prices]":
                yield from ((f'[prices."{model}"]', prices) for model, prices in table.items() if isinstance(prices, dict))


def nearest_setting(name: str) -> str:
    """` (did you mean 'upstream'?)` for a misspelt setting, spelt with dashes if `name` is."""
    known = [name for name in (*_SCALAR_SETTINGS, *_TABLE_HEADERS) if name != "config"]  # a file cannot name one
    matches = difflib.get_close_matches(name.replace("-", "_"), known, n=1)
    if not matches:
        return ""
    return f" (did you mean {(matches[0].replace('_', '-') if '-' in name else matches[0])!r}?)"


def check_budget_keys(budgets: Iterable[Budget], keys: Mapping[str, str]) -> None:
    """A budget's `match.key` names a key: a key_id, or a name in `[keys]`.  Anything else
    (a typo, a name never configured, a raw key pasted in) matches no request, so the
    budget would show $0 and never refuse: it is refused at start, the value unquoted."""
    names = set(keys.values())
    for budget in budgets:
        key = budget.match.get("key")
        if key is not None and not _KEY_ID.fullmatch(key) and key not in names:
            raise SettingError(
                f"config: [[budgets]] {budget.name!r}: match.key is neither a key_id (16 lower-case hex digits, `meter keys id`) "
                "nor a name in [keys], so it would match no request"
            )


_KEY_ID = re.compile(r"[0-9a-f]{16}")


_TOKEN_LIKE = re.compile(r"[A-Za-z0-9._~+/=-]{32,}")
_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")


def _looks_like_a_key(text: str, *, as_name: bool = False) -> bool:
    """A raw API key rather than a key_id or a name: a provider prefix, or, where a
    key_id goes, anything of a key's length (32 and up: never a key_id, so never
    worth quoting); where a name goes, an unbroken run of 32 or more characters
    that is hex (Azure's keys) or mixes upper case, lower case and digits (most
    others').  A team's long name is lower-case words, or has spaces."""
    if text.lower().startswith(("sk-", "sk_", "bearer ")):
        return True
    if not as_name:
        return len(text) >= 32
    if _HEX_RUN.fullmatch(text):
        return True
    return _TOKEN_LIKE.fullmatch(text) is not None and not text.islower() and not text.isupper() and any(c.isdigit() for c in text)


def keys_from_toml(table: Mapping[Any, Any]) -> dict[str, str]:
    """`[keys]`: key_id (16 hex digits, `meter keys id`) = name.  An entry that is not
    one is refused with one line naming it by position; a value that looks like a
    raw API key is never quoted back (it is a secret pasted into a file)."""
    out: dict[str, str] = {}
    for i, (kid, name) in enumerate(table.items(), 1):
        kid, name = str(kid), str(name)
        if _looks_like_a_key(kid) or _looks_like_a_key(name, as_name=True):
            raise SettingError(
                f"config: [keys] entry {i} holds what looks like a raw API key, which meter never stores: "
                "remove it and name the key by its key_id (printf %s \"$KEY\" | meter keys id)"
            )
        if not _KEY_ID.fullmatch(kid):
            raise SettingError(f"config: [keys] entry {i} ({kid!r}): a key_id is 16 lower-case hex digits, from `meter keys id`")
        if _CONTROL.search(name):
            # It is every row's key_name, a metric label and a report's group: PostgreSQL
            # refuses a NUL in text, so each of that key's records would be set aside.
            raise SettingError(f"config: [keys] entry {i} ({kid}): a key's name has no control characters")
        out[kid] = name
    return out


def budgets_from_toml(value: Any) -> tuple[Budget, ...]:
    """The `[[budgets]]` entries; a bad one is refused with one line naming it."""
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise SettingError("config: budgets must be [[budgets]] tables")
    budgets: list[Budget] = []
    for i, entry in enumerate(value, 1):
        name = entry.get("name")
        label = f"[[budgets]] {name!r}" if isinstance(name, str) and name else f"[[budgets]] entry {i}"
        try:
            budget = Budget(**entry)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "entry"
            raise SettingError(f"config: {label}: {where}: {error['msg'].removeprefix('Value error, ')}") from None
        if any(b.name == budget.name for b in budgets):
            raise SettingError(f"config: {label}: a budget of that name is already defined")
        budgets.append(budget)
    return tuple(budgets)


def alerts_from_toml(value: Any) -> Alerts:
    """The `[alerts]` table; a bad webhook is refused with one line naming it."""
    if not isinstance(value, dict):
        raise SettingError("config: [alerts] must be a table")
    try:
        return Alerts(**value)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(p) for p in error["loc"]]
        where = f"{loc[0]}[{loc[1]}]" if len(loc) == 2 and loc[1].isdigit() else ".".join(loc) or "alerts"
        message = error["msg"].removeprefix("Value error, ")
        raise SettingError(f"config: [alerts] {message if message.startswith(where) else f'{where}: {message}'}") from None


def reconcile_from_toml(value: Any) -> Reconcile:
    """The `[reconcile]` table; a bad entry is refused with one line naming it."""
    if not isinstance(value, dict):
        raise SettingError("config: [reconcile] must be a table")
    try:
        return Reconcile(**value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "reconcile"
        raise SettingError(f"config: [reconcile] {where}: {error['msg'].removeprefix('Value error, ')}") from None


def settings_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _SCALAR_SETTINGS:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            out[name] = value
    return out


def misspelt_variables(env: Mapping[str, str]) -> list[str]:
    """Warnings for the `METER_*` variables that are no setting's but nearly one's name
    (`METER_LEDGR`): ignored without a word, meter ran on the default the user meant to
    change.  Only near-namesakes: other tools' `METER_*` variables are their own business.
    The value is never shown (it may be a token)."""
    known = [ENV_PREFIX + name.upper() for name in _SCALAR_SETTINGS]
    warnings = []
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            nearest = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
            if nearest:
                warnings.append(f"{name} is not a meter variable and is ignored; did you mean {nearest[0]}?")
    return warnings


def load_settings(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Merge defaults < file < environment < flags; flags with value None are unset."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    from_env = settings_from_env(env)
    config_path = flags.get("config") or from_env.get("config")
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}  # where a value not given as a flag was set, for its error
    if config_path:
        from_file = settings_from_toml(config_path)
        merged.update(from_file)
        source.update(dict.fromkeys(from_file, f"set in {config_path}"))
        merged["config"] = config_path
    merged.update(from_env)
    source.update({name: f"set by {ENV_PREFIX}{name.upper()}" for name in from_env})
    merged.update(flags)
    for name in flags:
        source.pop(name, None)
    try:
        return Settings(**merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        # The setting's name as its flag spells it; what follows it (a model's name under
        # price_overrides, say) is the user's own text, shown as written.  A value from the
        # environment or the file says which: in a container no flag was given.
        setting, dot, rest = where.partition(".")
        origin = source.get(setting)
        raise SettingError(f"{setting.replace('_', '-')}{dot}{rest}: {message}" + (f" ({origin})" if origin else "")) from None
