"""`meter reconcile`: meter's books beside the provider's organisation Usage and Costs APIs.

`provider` reads the provider (paging, 429 backoff), `compare` is the pure
grouping and verdicts, `reconcile` (here) joins them over a ledger Store.
"""

from .compare import VERDICTS, Group, Reconciliation, Totals, reconcile
from .provider import ProviderClient, ProviderError

__all__ = ["VERDICTS", "Group", "ProviderClient", "ProviderError", "Reconciliation", "Totals", "reconcile"]
