"""The `alert_claims` table: who sends a budget alert, and whether it was delivered (SPEC §11).

An alert is sent exactly once per budget, window and threshold, whatever the
number of replicas and restarts, because it is claimed here first: the
primary key (budget, window_start, threshold) lets one `INSERT ... ON CONFLICT
DO NOTHING RETURNING` win, and only the replica whose claim came back sends.

A claim holds the event itself (spend, limit, mode at the crossing), so any
replica can send it again, and a lease: the sender renews `lease_until` at
every attempt; a claim that is still unsent (`sent_at` NULL) once its lease has
run out, or that was released by a sender that stopped, is taken over by the
next replica that looks (`take_alerts`), so a claimed alert is never lost.
`delivered` lists the webhooks (by fingerprint, never the URL: a webhook URL
is often a secret) that already accepted the event, so a retry or a takeover
sends only to the others.

The statements are the same text on DuckDB and PostgreSQL; each store runs
them with `run(sql, params) -> rows` (`claim`, `update`, `take`).  Times for
leases come from the caller's clock; `claimed_at` and `sent_at` from the
database's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


@dataclass(frozen=True)
class AlertClaim:
    """One alert as claimed: its key (budget, window_start, threshold), the event's
    values, and the webhooks (fingerprints) that already have it."""

    budget: str
    window_start: datetime
    threshold: float
    spend_usd: Decimal
    limit_usd: Decimal
    mode: str
    delivered: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, datetime, float]:
        return (self.budget, self.window_start, self.threshold)


_COLUMNS = "budget, window_start, threshold, spend_usd, limit_usd, mode, delivered"

CLAIM_SQL = (
    "INSERT INTO alert_claims (budget, window_start, threshold, spend_usd, limit_usd, mode, claimed_by, lease_until, delivered, claimed_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, '', now()) ON CONFLICT DO NOTHING RETURNING budget"
)
# Only the owner, and only while unsent: a sender whose lease ran out and was taken
# over learns it here (no row comes back) and stops.
UPDATE_SQL = (
    "UPDATE alert_claims SET delivered = $5, lease_until = $6, sent_at = CASE WHEN $7::BOOLEAN THEN now() ELSE NULL END "
    "WHERE budget = $1 AND window_start = $2 AND threshold = $3 AND claimed_by = $4 AND sent_at IS NULL RETURNING budget"
)
# On PostgreSQL two replicas taking over at once both wait for the row lock; the
# second re-reads the row after the first commits, finds the lease renewed, and
# leaves it.
TAKE_SQL = (
    "UPDATE alert_claims SET claimed_by = $1, lease_until = $2 "
    "WHERE sent_at IS NULL AND (lease_until IS NULL OR lease_until < $3 OR claimed_by = $1) "
    f"RETURNING {_COLUMNS}"
)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def claim(run: Run, alert: AlertClaim, owner: str, lease_until: datetime) -> bool:
    """Claim `alert` for `owner`; True when this claim won (no one had claimed it)."""
    rows = run(CLAIM_SQL, [alert.budget, _utc(alert.window_start), alert.threshold, alert.spend_usd, alert.limit_usd, alert.mode, owner, lease_until])
    return bool(rows)


def update(run: Run, alert: AlertClaim, owner: str, lease_until: datetime | None, sent: bool) -> bool:
    """Record the webhooks that have it, renew (or, with None, release) the lease, and
    with `sent` mark it delivered; False when `owner` no longer holds the claim."""
    params = [alert.budget, _utc(alert.window_start), alert.threshold, owner, " ".join(sorted(alert.delivered)), lease_until, sent]
    return bool(run(UPDATE_SQL, params))


def take(run: Run, owner: str, now: datetime, lease_until: datetime) -> list[AlertClaim]:
    """The unsent claims `owner` may send now (its own, released ones, and those whose
    lease ran out), now leased to it."""
    rows = run(TAKE_SQL, [owner, lease_until, now])
    return [
        AlertClaim(budget, _utc(window_start), float(threshold), Decimal(spend), Decimal(limit), mode, tuple((delivered or "").split()))
        for budget, window_start, threshold, spend, limit, mode, delivered in rows
    ]
