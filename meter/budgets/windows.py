"""Budget windows: calendar day, week (from Monday) and month, in UTC (SPEC §11).

Pure: a window's start and end for an instant, as epoch seconds (what a record
holds) and as aware datetimes (what the ledger and the alerts take).
"""

from __future__ import annotations

import datetime as dt
import math

UTC = dt.UTC


def window_bounds(window: str, now: float) -> tuple[dt.datetime, dt.datetime]:
    """The start (inclusive) and end (exclusive) of the `window` holding `now`."""
    t = dt.datetime.fromtimestamp(now, UTC)
    day = dt.datetime(t.year, t.month, t.day, tzinfo=UTC)
    if window == "day":
        return day, day + dt.timedelta(days=1)
    if window == "week":
        start = day - dt.timedelta(days=t.weekday())  # Monday is 0
        return start, start + dt.timedelta(days=7)
    if window == "month":
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    raise ValueError(f"unknown window {window!r}")


def seconds_to_reset(end: float, now: float) -> int:
    """What `Retry-After` says: whole seconds until the window ends, at least 1."""
    return max(1, math.ceil(end - now))
