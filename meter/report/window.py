"""The arguments of a report: its window (`--since`, `--until`) and grouping (`--by`).

The CLI and the admin API (`GET /api/report?since=&until=&by=`) read them with
these same functions, so a bad value is the same one-line `ReportError` on both
(exit 2 on the command line, 400 from the API).

- `--since` is inclusive and `--until` exclusive; a bare date given to
  `--until` means the end of that day.  Times without an offset are UTC.
- A window reaching past 0001-01-01 or 9999-12-31 UTC is an argument error,
  not an overflow.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable

UTC = dt.UTC

GROUP_FIELDS = ("key", "model", "tier", "endpoint", "project", "user", "day", "hour")


class ReportError(ValueError):
    """Bad report arguments; one line, naming the argument."""


_SPAN = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_SPAN_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


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
        try:
            if _DATE.match(text):
                day = dt.date.fromisoformat(text)
                when = dt.datetime(day.year, day.month, day.day, tzinfo=UTC)
                return when + dt.timedelta(days=1) if end_of_day else when
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


def parse_by(values: str | Iterable[str] | None) -> list[str]:
    """`key,model` (or several such values) -> ['key', 'model']; unknown names are an error."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in GROUP_FIELDS:
                raise ReportError(f"--by: unknown field {part.strip()!r}; choose from {', '.join(GROUP_FIELDS)}")
            if name not in out:
                out.append(name)
    return out
