"""The arguments of a report: its window (`--since`, `--until`), grouping (`--by`),
filters (`--where`) and cut (`--top`).

The CLI and the admin API (`GET /api/report?since=&until=&by=&where=&top=`) read
them with these same functions, so a bad value is the same one-line
`ReportError` on both (exit 2 on the command line, 400 from the API).

- `--since` is inclusive and `--until` exclusive; a bare date given to
  `--until` means the end of that day.  Times without an offset are UTC.
- A window reaching past 0001-01-01 or 9999-12-31 UTC is an argument error,
  not an overflow.
- A field is one of `GROUP_FIELDS` or `tag:NAME`, NAME as a tag name is
  written (SPEC §10: letters, digits, `_`, `-`, up to 64) and lower-cased, as
  tags are stored; `--by` and `--where` take the same fields.
- `--where FIELD=VALUE` with an empty VALUE selects the rows without that
  field (no key, no project, no such tag); `day` and `hour` take the forms a
  report prints (`2026-03-01`, `2026-03-01T10:00:00Z`; any ISO time means the
  hour it falls in).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..ledger.sanitise import clean_text

UTC = dt.UTC

GROUP_FIELDS = ("key", "model", "tier", "endpoint", "project", "user", "session", "day", "hour")
TAG_PREFIX = "tag:"
_TAG_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FIELDS_HELP = ", ".join(GROUP_FIELDS) + ", tag:NAME"


class ReportError(ValueError):
    """Bad report arguments; one line, naming the argument."""


@dataclass(frozen=True)
class Condition:
    """One `--where FIELD=VALUE`: `value` None selects the rows without the field.
    `day` and `hour` hold their normalised text and the [start, end) they cover."""

    field: str
    value: str | None
    start: dt.datetime | None = None
    end: dt.datetime | None = None


@dataclass(frozen=True)
class ReportArgs:
    """Everything a report is asked for, read and checked."""

    by: list[str] = field(default_factory=list)
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    where: list[Condition] = field(default_factory=list)
    top: int | None = None


_SPAN = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_SPAN_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _iso_date(text: str) -> dt.date | None:
    """The date `text` is in any ISO form without a time (2026-05-01, 20260501,
    2026-W18-5), else None.  Every form is a bare date: one `--until` includes
    whole, not only the form a report prints."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        return None


def parse_when(value: str, *, name: str = "--since", end_of_day: bool = False, now: dt.datetime | None = None) -> dt.datetime:
    """An aware UTC datetime from an ISO date/time or a span back from now (`7d`, `24h`, `30m`).

    A bare date is midnight UTC, or with `end_of_day` the next midnight (so
    `--until 2026-05-31` includes that day).  A time without an offset is UTC.
    Anything that leaves 0001-01-01..9999-12-31 UTC (a huge span, an offset
    across either end) is a `ReportError`, never an OverflowError.
    """
    text = value.strip()
    now = now or dt.datetime.now(UTC)
    try:
        span = _SPAN.match(text)
        if span:
            return now - dt.timedelta(**{_SPAN_UNITS[span.group(2).lower()]: int(span.group(1))})
        day = _iso_date(text)
        if day is not None:
            when = dt.datetime(day.year, day.month, day.day, tzinfo=UTC)
            return when + dt.timedelta(days=1) if end_of_day else when
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ReportError(
                f"{name}: cannot read {value!r}; expected an ISO date or time (2026-05-01, 2026-05-01T12:00Z) or a span back from now (7d, 24h, 30m)"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.astimezone(UTC)
    except ReportError:
        raise
    except (OverflowError, ValueError):
        # timedelta and datetime arithmetic past year 1 or 9999 (OverflowError; a few
        # spans raise ValueError for a C int overflow).
        raise ReportError(f"{name}: {value!r} is out of range; times run from 0001-01-01 to 9999-12-31 UTC") from None


def parse_window(since: str | None, until: str | None, now: dt.datetime | None = None) -> tuple[dt.datetime | None, dt.datetime | None]:
    """(start, end) of `--since`/`--until`, either None when not given; start must be before end."""
    now = now or dt.datetime.now(UTC)
    start = parse_when(since, name="--since", now=now) if since else None
    end = parse_when(until, name="--until", end_of_day=True, now=now) if until else None
    if start is not None and end is not None and start >= end:
        raise ReportError(f"--since ({start.isoformat()}) is not before --until ({end.isoformat()})")
    return start, end


def parse_field(text: str, arg: str) -> str:
    """One field as `--by` or `--where` names it -> its canonical name (`tag:NAME` lower-cased)."""
    name = text.strip()
    if name.lower().startswith(TAG_PREFIX):
        tag = name[len(TAG_PREFIX) :]
        if not _TAG_NAME.match(tag):
            raise ReportError(f"{arg}: bad tag name {tag!r} in {name!r}; a tag name is 1 to 64 letters, digits, '_' or '-'")
        return TAG_PREFIX + tag.lower()
    if name.lower() not in GROUP_FIELDS:
        raise ReportError(f"{arg}: unknown field {name!r}; choose from {_FIELDS_HELP}")
    return name.lower()


def tag_name(name: str) -> str | None:
    """The tag of a `tag:NAME` field, None for any other field."""
    return name[len(TAG_PREFIX) :] if name.startswith(TAG_PREFIX) else None


def parse_by(values: str | Iterable[str] | None) -> list[str]:
    """`key,model` (or several such values) -> ['key', 'model']; unknown names are an error."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            name = parse_field(part, "--by")
            if name not in out:
                out.append(name)
    return out


def _hour(value: str) -> dt.datetime:
    text = value.strip()
    try:
        if _iso_date(text) is not None:
            raise ValueError(text)  # a date is not an hour
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"--where: hour={value!r} is not an ISO time (2026-03-01T10:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    except (OverflowError, ValueError):
        raise ReportError(f"--where: hour={value!r} is out of range; times run from 0001-01-01 to 9999-12-31 UTC") from None


def parse_condition(text: str) -> Condition:
    """`FIELD=VALUE` -> a `Condition`; a bad field, a missing `=` or a bad day/hour is an error."""
    name, eq, value = text.partition("=")
    if not eq or not name.strip():
        raise ReportError(f"--where: expected FIELD=VALUE (key=team-search, tag:feature=autocomplete), got {text!r}")
    fld = parse_field(name, "--where")
    try:
        if fld == "day":
            day = _iso_date(value.strip())
            if day is None:
                raise ReportError(f"--where: day={value!r} is not a date (2026-03-01)")
            start = dt.datetime(day.year, day.month, day.day, tzinfo=UTC)
            return Condition(fld, day.isoformat(), start, start + dt.timedelta(days=1))
        if fld == "hour":
            start = _hour(value)
            return Condition(fld, start.strftime("%Y-%m-%dT%H:00:00Z"), start, start + dt.timedelta(hours=1))
    except ReportError:
        raise
    except (OverflowError, ValueError):
        raise ReportError(f"--where: {fld}={value!r} is out of range; times run from 0001-01-01 to 9999-12-31 UTC") from None
    # As the ledger stored the value: a character it cannot hold (a NUL, which
    # PostgreSQL refuses in a parameter too) is U+FFFD there, and so is it here.
    return Condition(fld, clean_text(value) if value != "" else None)


def parse_where(values: str | Iterable[str] | None) -> list[Condition]:
    """Every `--where` (each one FIELD=VALUE; they are ANDed)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [parse_condition(value) for value in values]


def parse_top(value: str | int | None) -> int | None:
    """`--top N`: a whole number from 1 on, or None when not given."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1 or len(text) > 18:
        raise ReportError(f"--top: expected a whole number of groups from 1 on, got {value!r}")
    return int(text)


def parse_args(
    by: str | Iterable[str] | None,
    since: str | None,
    until: str | None,
    where: str | Iterable[str] | None = None,
    top: str | int | None = None,
    now: dt.datetime | None = None,
) -> ReportArgs:
    """Every report argument, as the CLI and the admin API both take them."""
    start, end = parse_window(since, until, now)
    return ReportArgs(parse_by(by), start, end, parse_where(where), parse_top(top))
