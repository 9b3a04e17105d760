"""Budget alerts: one webhook event per budget, window and threshold crossed.

The budget tracker says when spend crosses a fraction of a budget's limit (a
`Crossing`); this module claims that crossing in the ledger, so exactly one
replica sends it whatever the number of replicas and restarts, and POSTs it to
every configured webhook off the request path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal


@dataclass(frozen=True)
class Crossing:
    """Spend of `budget` in the window starting at `window_start` (UTC) reached
    `threshold` (a fraction of `limit_usd`, in (0, 1]); `mode` is the budget's
    (`observe` or `enforce`)."""

    budget: str
    window_start: datetime
    threshold: float
    spend_usd: Decimal
    limit_usd: Decimal
    mode: str
