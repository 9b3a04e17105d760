"""What a budget alert sends: the JSON event, and one POST of it to one webhook (SPEC §11).

The event carries the budget's name, window, threshold, spend, limit and mode,
and a `text` line that Slack (and the many receivers that copy its incoming
webhooks) shows as is.  Nothing in it comes from a request: no key, hint or
client value can reach a webhook.

A webhook URL is often a secret (Slack's carries a token in its path), so
logs name only its host, and the ledger only its `fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

import aiohttp
from yarl import URL

from ..ledger.alert_claims import AlertClaim

USER_AGENT = "meter-alerts"


def fingerprint(url: str) -> str:
    """How the ledger names a webhook: 16 hex digits of its URL's SHA-256."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def host_of(url: str) -> str:
    """The part of a webhook URL fit for a log line."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "<webhook>"
    return f"{parsed.scheme}://{parsed.host}" + (f":{parsed.explicit_port}" if parsed.explicit_port else "")


def alert_id(alert: AlertClaim) -> str:
    """The same for every send of one alert (its `Meter-Alert-Id` header), so a receiver
    can drop a repeat: one can follow a crash between a webhook's answer and its record."""
    key = f"{alert.budget}\0{iso_utc(alert)}\0{alert.threshold!r}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def iso_utc(alert: AlertClaim) -> str:
    return alert.window_start.strftime("%Y-%m-%dT%H:%M:%SZ")


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions; these three are its only escapes.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def usd(amount: Decimal) -> str:
    """Cents from a dollar up; below it, the figure (a $0.01 budget is not "$0.01 of $0.01")."""
    if abs(amount) >= 1:
        return f"${amount:,.2f}"
    exact = amount.normalize()
    exponent = exact.as_tuple().exponent
    return f"${amount:.2f}" if isinstance(exponent, int) and exponent > -2 else f"${exact:f}"


def text_line(alert: AlertClaim) -> str:
    percent = f"{alert.threshold * 100:g}%"
    line = (
        f"meter: budget {alert.budget} has reached {percent} of its limit: "
        f"{usd(alert.spend_usd)} of {usd(alert.limit_usd)} spent since {alert.window_start:%Y-%m-%d %H:%M} UTC ({alert.mode})"
    )
    if alert.mode == "enforce" and alert.threshold >= 1:
        line += "; matching requests are refused until the window ends"
    return _slack_escape(line)


def event(alert: AlertClaim) -> dict[str, Any]:
    """The JSON body POSTed to every webhook."""
    return {
        "budget": alert.budget,
        "window_start": iso_utc(alert),
        "threshold": alert.threshold,
        "spend_usd": float(alert.spend_usd),
        "limit_usd": float(alert.limit_usd),
        "mode": alert.mode,
        "text": text_line(alert),
    }


def body_and_headers(alert: AlertClaim) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event(alert)).encode()
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "Meter-Alert-Id": alert_id(alert)}
    return body, headers


async def post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> str | None:
    """POST the event once; None when the webhook accepted it (2xx), else why not
    (a status, or the error's type: never its text, which may quote the URL).
    A redirect is a failure: the event goes where it was configured to, or nowhere.

    The status decides, and the answer's body is never read (leaving it closes the
    connection): a receiver that sends its 2xx at once and its body slowly had its
    accepted event timed out, counted a failure and sent again at every retry."""
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as answer:
            if 200 <= answer.status < 300:
                return None
            return f"HTTP {answer.status}"
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        return type(exc).__name__
