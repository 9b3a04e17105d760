"""Budgets and alerts (SPEC §11): several budgets on one request, windows, alerts.

A real meter (in-process, as tests/conftest.py starts it) against the fake
provider, DuckDB ledgers on disk, the official SDK, and the webhook receiver
process for alerts.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import openai
import pytest

from meter.budgets.windows import window_bounds

from .test_budgets import USAGE, sdk, write_config


async def test_a_request_refused_by_several_budgets_is_told_the_latest_reset(upstream, start_meter, tmp_path: Path) -> None:
    # A day budget and a month budget both exceeded: when the day resets, the month
    # still refuses, so Retry-After must wait for the month's reset, and name it.
    config = write_config(
        tmp_path / "meter.toml",
        '[[budgets]]\nname = "daily"\nwindow = "day"\nlimit_usd = 0.000001\nmode = "enforce"\n'
        '[[budgets]]\nname = "monthly"\nwindow = "month"\nlimit_usd = 0.000001\nmode = "enforce"\n',
    )
    meter = await start_meter(upstream.url, config=config)
    client = sdk(meter.url)
    await client.responses.create(model="gpt-4o", input="a", extra_headers=USAGE)
    assert len(meter.meter.budgets.blocked) == 2
    with pytest.raises(openai.RateLimitError) as refused:
        await client.responses.create(model="gpt-4o", input="b")
    headers = refused.value.response.headers
    month_end = window_bounds("month", time.time())[1]
    left = (month_end - dt.datetime.now(dt.UTC)).total_seconds()
    if window_bounds("day", time.time())[1] == month_end:  # the last day of a month: both end together
        assert headers["Meter-Budget"] == "daily"
    else:
        assert headers["Meter-Budget"] == "monthly"
    assert left - 5 <= int(headers["Retry-After"]) <= left + 1
    assert "monthly" in refused.value.message or headers["Meter-Budget"] == "daily"
    states = {s.name: s.rejections for s in meter.meter.budgets.states}
    assert sum(states.values()) == 1 and states[headers["Meter-Budget"]] == 1
