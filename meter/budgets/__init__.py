"""Budgets (SPEC §11): spend per calendar window, across every replica, and enforcement.

- `windows`: calendar day, week and month in UTC (pure);
- `matching`: does a request or a record match a budget, in Python and in SQL (pure);
- `spend`: each budget's known spend in its current window, and whether it refuses;
- `gate`: the addon that refuses a matching request once spend has reached the limit
  and counts this replica's records as they finish;
- `sync`: reads the other replicas' (and earlier runs') spend from the ledger, off
  the request path;
- `command`: `meter budgets`, and the rows `GET /api/budgets` answers;
- `metrics`: the budget gauges and the rejection counter;
- `alerts`: webhooks when spend crosses a share of a limit.
"""
