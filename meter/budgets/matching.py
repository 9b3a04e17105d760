"""Does a request, or a finished record, match a budget (SPEC §11)?  Pure.

A budget's `match` names any of `key` (a key's name from `[keys]`, or its
key_id), `project`, `user`, `model` and `tag:<name>`; all must match, and none
matches everything.  The same rule is written three times, and they must agree
(tests/test_budgets.py checks them against each other): on a request before it
is forwarded (`Matcher.matches_request`), on its record once it is finished
(`matches_record`), and in SQL over the ledger's rows (`sql`).

`model` is the model the request asked for, or, when it named none (a
retrieve), the one that served it: only the asked-for model is known before
forwarding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import Budget
from ..observe.jsonio import loads
from ..record import Record


@dataclass(frozen=True, slots=True)
class Matcher:
    key_ids: frozenset[str] | None = None
    project: str | None = None
    user: str | None = None
    model: str | None = None
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def needs_body(self) -> bool:
        """Whether deciding needs the request body's facts (user, model, metadata)."""
        return self.user is not None or self.model is not None or bool(self.tags)

    def matches_request(self, key_id: str | None, project: str | None, facts: Callable[[], Any], tags: Callable[[], Mapping[str, str]]) -> bool:
        """Before forwarding: `facts` and `tags` are called only when needed (they parse the body)."""
        if self.key_ids is not None and key_id not in self.key_ids:
            return False
        if self.project is not None and project != self.project:
            return False
        if self.user is not None or self.model is not None:
            f = facts()
            if self.user is not None and f.user_id != self.user:
                return False
            if self.model is not None and f.model != self.model:
                return False
        if self.tags:
            have = tags()
            return all(have.get(name) == value for name, value in self.tags)
        return True

    def matches_record(self, record: Record) -> bool:
        if self.key_ids is not None and record.key_id not in self.key_ids:
            return False
        if self.project is not None and record.project != self.project:
            return False
        if self.user is not None and record.user_id != self.user:
            return False
        if self.model is not None:
            # As SQL's coalesce(): an empty model asked is asked (the request check saw it).
            asked = record.model_requested
            if (asked if asked is not None else record.model) != self.model:
                return False
        if self.tags:
            have = record_tags(record)
            return all(have.get(name) == value for name, value in self.tags)
        return True

    def sql(self, params: list[Any]) -> str:
        """The condition over `requests`, the same text on DuckDB and PostgreSQL; its values
        are appended to `params` (`$n` placeholders)."""

        def p(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        parts = []
        if self.key_ids is not None:
            parts.append(f"key_id IN ({', '.join(p(k) for k in sorted(self.key_ids))})")
        if self.project is not None:
            parts.append(f"project = {p(self.project)}")
        if self.user is not None:
            parts.append(f"user_id = {p(self.user)}")
        if self.model is not None:
            parts.append(f"coalesce(model_requested, model) = {p(self.model)}")
        for name, value in self.tags:
            parts.append(f"tags->>{p(name)} = {p(value)}")
        return " AND ".join(parts) if parts else "TRUE"


def record_tags(record: Record) -> dict[str, str]:
    """A record's tags (JSON text) as a dict; {} when it has none or they cannot be read."""
    if not record.tags:
        return {}
    try:
        tags = loads(record.tags)
    except ValueError:
        return {}
    return tags if isinstance(tags, dict) else {}


def matcher_for(budget: Budget, key_names: Mapping[str, str]) -> Matcher:
    """A budget's `match`, with a key's name resolved to the key_ids the config gives it
    (a key is matched by key_id: names are resolved from the config in force)."""
    match = budget.match
    key_ids: frozenset[str] | None = None
    if "key" in match:
        wanted = match["key"]
        key_ids = frozenset({wanted, *(kid for kid, name in key_names.items() if name == wanted)})
    tags = tuple(sorted((name.removeprefix("tag:"), value) for name, value in match.items() if name.startswith("tag:")))
    return Matcher(key_ids=key_ids, project=match.get("project"), user=match.get("user"), model=match.get("model"), tags=tags)
