"""The budget metrics, read at scrape time from the budgets' state (SPEC §6):
`meter_budget_spend_usd` and `meter_budget_limit_usd` (gauges) and
`meter_budget_rejections_total` (counter), each labelled `budget` (names from
the config: bounded by it)."""

from __future__ import annotations

from ..exposition import CounterMetricFamily, GaugeMetricFamily, Metric
from .spend import Budgets


class BudgetMetrics:
    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    def describe(self) -> list[Metric]:
        return self._families(False)

    def collect(self) -> list[Metric]:
        return self._families(True)

    def _families(self, values: bool) -> list[Metric]:
        spend = GaugeMetricFamily("meter_budget_spend_usd", "Known spend of each budget in its current window, USD (every replica's).", labels=["budget"])
        limit = GaugeMetricFamily("meter_budget_limit_usd", "Each budget's limit, USD.", labels=["budget"])
        rejections = CounterMetricFamily("meter_budget_rejections", "Requests refused by each enforcing budget (429) on this replica.", labels=["budget"])
        if values:
            for state in self.budgets.states:
                spend.add_metric([state.name], float(state.spend))
                limit.add_metric([state.name], float(state.limit))
                rejections.add_metric([state.name], state.rejections)
        return [spend, limit, rejections]
