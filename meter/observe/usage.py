"""Usage, normalised from each endpoint's shape (SPEC §3), and its invariants.

The Responses API and Chat Completions name the same counts differently; a
`Usage` is the one shape the ledger keeps.  `usage_anomalies` says which of
SPEC §3's invariants a usage block breaks: reported, never corrected.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..bounds import BIGINT_MAX, BIGINT_MIN
from .jsonio import as_dict, as_int

if TYPE_CHECKING:
    from .shapes import ChatUsage, InputTokensDetails, OutputTokensDetails, ResponsesUsage


@dataclass(slots=True)
class Usage:
    input_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    web_search_calls: int | None = None
    cache_status: str | None = None
    cache_missed_tokens: int | None = None
    # Every count is known to be within BIGINT: msgspec decoded them (`shapes.Count` is
    # bounded so), and `unfit_counts` has nothing to look at.
    bounded: bool = field(default=False, compare=False)  # how it was read, not what it says


def usage_from_responses(usage: dict[str, Any]) -> Usage:
    """Normalise a Responses API `usage` block (SPEC §3).

    Read once per answer: the counts are checked inline (an int as it is, an absent
    one None, anything else through `as_int`) and passed by position, which costs
    half what keywords do.
    """
    get = usage.get
    details = get("input_tokens_details")
    cached = cache_write = reasoning = None
    if isinstance(details, dict):
        cached = details.get("cached_tokens")
        cache_write = details.get("cache_write_tokens")
    details = get("output_tokens_details")
    if isinstance(details, dict):
        reasoning = details.get("reasoning_tokens")
    input_tokens, output_tokens, total = get("input_tokens"), get("output_tokens"), get("total_tokens")
    return Usage(
        input_tokens if type(input_tokens) is int else None if input_tokens is None else as_int(input_tokens),
        cached if type(cached) is int else None if cached is None else as_int(cached),
        cache_write if type(cache_write) is int else None if cache_write is None else as_int(cache_write),
        output_tokens if type(output_tokens) is int else None if output_tokens is None else as_int(output_tokens),
        reasoning if type(reasoning) is int else None if reasoning is None else as_int(reasoning),
        total if type(total) is int else None if total is None else as_int(total),
    )


def usage_from_shape(usage: ResponsesUsage) -> Usage:
    """`usage_from_responses` of a `usage` block msgspec decoded (`shapes.py`): its
    counts are already ints or None, its details already objects or None."""
    return _usage_of_shape(usage.input_tokens, usage.input_tokens_details, usage.output_tokens, usage.output_tokens_details, usage.total_tokens)


def usage_from_chat(usage: dict[str, Any]) -> Usage:
    """Normalise a Chat Completions or Embeddings `usage` block (SPEC §3)."""
    details_in = as_dict(usage.get("prompt_tokens_details"))
    details_out = as_dict(usage.get("completion_tokens_details"))
    return Usage(
        input_tokens=as_int(usage.get("prompt_tokens")),
        cached_tokens=as_int(details_in.get("cached_tokens")),
        cache_write_tokens=as_int(details_in.get("cache_write_tokens")),
        output_tokens=as_int(usage.get("completion_tokens")),
        reasoning_tokens=as_int(details_out.get("reasoning_tokens")),
        total_tokens=as_int(usage.get("total_tokens")),
    )


def usage_from_chat_shape(usage: ChatUsage) -> Usage:
    """`usage_from_chat` of a `usage` block msgspec decoded (`shapes.py`)."""
    return _usage_of_shape(usage.prompt_tokens, usage.prompt_tokens_details, usage.completion_tokens, usage.completion_tokens_details, usage.total_tokens)


def _usage_of_shape(
    inputs: int | None, details: InputTokensDetails | None, outputs: int | None, out_details: OutputTokensDetails | None, total: int | None
) -> Usage:
    """A decoded usage block's counts, whichever API's names they came under."""
    if details is not None:
        cached, cache_write = details.cached_tokens, details.cache_write_tokens
    else:
        cached = cache_write = None
    return Usage(inputs, cached, cache_write, outputs, out_details.reasoning_tokens if out_details is not None else None, total, None, None, None, True)


def cache_status_from_diagnostics(diagnostics: dict[str, Any]) -> tuple[str | None, int | None]:
    """`cache_status` and `cache_missed_tokens` from a response's `prompt_cache_diagnostics`."""
    kind = diagnostics.get("type")
    return cache_status(kind, diagnostics.get("reason"), as_int(diagnostics.get("cache_missed_tokens")) if kind == "cache_miss" else None)


def cache_status(kind: object, reason: object, missed: int | None) -> tuple[str | None, int | None]:
    """`cache_status` and `cache_missed_tokens` from the diagnostics' type, reason and
    missed tokens, however they were decoded."""
    if kind == "cache_hit":
        return "hit", None
    if kind == "cache_miss":
        return f"miss:{reason or 'unknown'}", missed
    if isinstance(kind, str):
        return kind, None
    return None, None


# Every count of a `Usage`: each is a BIGINT column of the same name.
COUNTS: tuple[str, ...] = (
    "input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens", "total_tokens",
    "web_search_calls", "cache_missed_tokens",
)  # fmt: skip
_counts = operator.attrgetter(*COUNTS)


def unfit_counts(usage: Usage) -> str | None:
    """Set to None every count the ledger's BIGINT cannot hold (past its range, or read
    from a number that is no integer: `jsonio.NOT_AN_INT`); the first of them, or None.

    Once per record, before anything reads its counts.  Usage msgspec decoded (the
    usual answer) is `bounded`; other usage of small counts, none negative, is told at
    once by their bitwise or: it is within BIGINT exactly when each is and none is
    negative (a third of what a sum in C costs).
    """
    if usage.bounded:
        return None
    try:
        either = ((usage.input_tokens or 0) | (usage.cached_tokens or 0) | (usage.cache_write_tokens or 0) | (usage.output_tokens or 0)
                  | (usage.reasoning_tokens or 0) | (usage.total_tokens or 0) | (usage.web_search_calls or 0) | (usage.cache_missed_tokens or 0))
        if 0 <= either <= BIGINT_MAX:
            return None
    except TypeError:  # not an int (the readers make none): looked at one by one
        pass
    first = None
    for name, value in zip(COUNTS, _counts(usage)):
        if value is not None and not (type(value) is int and BIGINT_MIN <= value <= BIGINT_MAX):
            setattr(usage, name, None)
            first = first or name
    return first


def usage_anomalies(usage: Usage, has_output: bool = True) -> tuple[str, ...]:
    """Invariants of SPEC §3; a violation is reported, never corrected.

    Once per record: the counts are read once into locals and tested inline; the
    usual usage, which breaks none, gets the empty tuple without a copy.
    """
    i, c, w, o, r, t = usage.input_tokens, usage.cached_tokens, usage.cache_write_tokens, usage.output_tokens, usage.reasoning_tokens, usage.total_tokens
    found: list[str] = []
    if (i is not None and i < 0) or (c is not None and c < 0) or (w is not None and w < 0) or (o is not None and o < 0) or (r is not None and r < 0) or (
            t is not None and t < 0):
        found.append("negative_count")
    if t is not None and i is not None:
        expected = i + (o or 0)
        if (o is not None or not has_output) and t != expected:
            found.append("total_mismatch")
    if i is not None and (c or 0) + (w or 0) > i:
        found.append("cache_exceeds_input")
    if o is not None and r is not None and r > o:
        found.append("reasoning_exceeds_output")
    return tuple(found) if found else ()
