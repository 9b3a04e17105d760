"""Who and what a request is for (SPEC §10): its tags and its session.

Pure functions over what a request carries, shared by the row (`meter.flow`)
and whoever must decide on the request path with the same tags the row will
have (a budget matching `tag:<name>`): `request_tags` is that one merge.

- Tags: `Meter-Tag-<name>: <value>` headers (name: letters, digits, `_`, `-`,
  up to 64, stored lower-case; value up to 256 characters; at most 16) merged
  over the request body's `metadata`, a header winning on the same name.  A
  header that breaks a rule is dropped, and counted, and the request goes on.
- Sessions: the request's `conversation`; else a `Meter-Session` header; else
  the session of the response `previous_response_id` names; else the row's own
  `response_id`.  `SessionChains` is the bounded in-memory map from response
  id to session that answers the third rule on the request path; a chain it
  does not know (another replica's, a previous run's) is resolved by the ledger
  writer from the store, off the request path.

The `Meter-Tag-*` and `Meter-Session` headers are meter's: `take_meter_headers`
removes them from what goes upstream, and identity never reads them.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from .bounds import MAX_TEXT, short_key
from .record import Record

TAG_PREFIX = "meter-tag-"
SESSION_HEADER = "meter-session"
MAX_HEADER_TAGS, TAG_NAME_CHARS, TAG_HEADER_VALUE_CHARS = 16, 64, 256
# What `Record.cut` names for each dropped tag header: `meter_values_truncated_total{field="tag_headers"}`.
DROPPED_TAG = "tag_headers"

_TAG_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Headers as meter keeps them off the upstream request: (lower-case name, value) pairs.
MeterHeaders = list[tuple[str, str]]


def take_meter_headers(headers: Any) -> MeterHeaders | None:
    """Remove `Meter-Tag-*` and `Meter-Session` from `headers` (a mutable multidict of
    what goes upstream) and return them, grouped by name in the order each name first
    came; None when there are none (the usual request: one pass over the names)."""
    names: list[str] | None = None
    # Names only, first letter first, by index (a slice or a tuple costs more): ~0.2 us
    # for two headers, ~0.5 us for an SDK's dozen.
    for name in headers:
        if name and name[0] in "Mm" and name[:6].lower() == "meter-":
            low = name.lower()
            if (low.startswith(TAG_PREFIX) or low == SESSION_HEADER) and (names is None or low not in names):
                if names is None:
                    names = []
                names.append(low)
    if names is None:
        return None
    found: MeterHeaders = [(low, value) for low in names for value in headers.popall(low)]
    return found


def header_tags(headers: Iterable[tuple[str, str]] | None) -> tuple[dict[str, str], int]:
    """The tags of `Meter-Tag-*` headers (any other header is ignored), and how many
    tag headers were dropped: a bad name, a value past 256 characters, past 16 tags.
    A name given twice keeps its first value (the second is dropped)."""
    tags: dict[str, str] = {}
    dropped = 0
    if not headers:
        return tags, dropped
    for name, value in headers:
        low = name.lower()
        if not low.startswith(TAG_PREFIX):
            continue
        tag = low[len(TAG_PREFIX) :]
        if not _TAG_NAME.fullmatch(tag) or len(value) > TAG_HEADER_VALUE_CHARS or tag in tags or len(tags) == MAX_HEADER_TAGS:
            dropped += 1
            continue
        tags[tag] = value
    return tags, dropped


def merge_tags(metadata: Mapping[str, str] | None, headers: Mapping[str, str]) -> dict[str, str]:
    """The body's metadata with the header tags over it (a header wins on the same name)."""
    if not metadata:
        return dict(headers)
    return {**metadata, **headers}


def request_tags(headers: Iterable[tuple[str, str]] | None, metadata_tags: Mapping[str, str] | None) -> dict[str, str]:
    """The tags a request's row will have: its (bounded) metadata merged with its
    `Meter-Tag-*` headers.  `headers` may be every header of the request (pairs, as
    `multidict.items()` gives them) or only meter's (`take_meter_headers`)."""
    return merge_tags(metadata_tags, header_tags(headers)[0])


def header_session(headers: Iterable[tuple[str, str]] | None) -> str | None:
    """The first non-empty `Meter-Session` header's value."""
    if not headers:
        return None
    for name, value in headers:
        if name.lower() == SESSION_HEADER and value.strip():
            return value.strip()
    return None


def conversation_id(value: Any) -> str | None:
    """A request's `conversation`: its id, given as a string or as `{"id": ...}`."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


# What an entry of `SessionChains` costs beyond its characters (CPython 3.11, measured
# with tracemalloc: 49 bytes of each str's header, the ordered dict's slot and node,
# and the growth of its table).
_ENTRY_BYTES = 260


class SessionChains:
    """Response id -> session id of the responses this meter recorded lately: how a
    `previous_response_id` finds its chain's session without leaving memory.

    Bounded in entries and in bytes: ids are kept as `short_key`s (a digest past 256
    characters) and sessions to 256 characters, as the ledger keeps them; the oldest
    entries go first.  An entry is counted as its characters plus `_ENTRY_BYTES`
    (measured: two str headers and the ordered dict's slot and node), so `max_bytes`
    bounds the memory it holds (8 MiB: ~23,000 chains of real ids, ~10,900 of ids and
    sessions at their longest; tests/test_tags_sessions.py measures it).  Used on the event loop only.
    """

    __slots__ = ("_bytes", "_map", "_max", "_max_bytes")

    def __init__(self, max_entries: int = 100_000, max_bytes: int = 8 << 20) -> None:
        self._map: OrderedDict[str, str] = OrderedDict()
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._map)

    @property
    def held(self) -> int:
        """Bytes held now, as counted (see the class doc)."""
        return self._bytes

    def get(self, response_id: str) -> str | None:
        return self._map.get(short_key(response_id))

    def put(self, response_id: str, session_id: str) -> None:
        key = short_key(response_id)
        old = self._map.pop(key, None)
        if old is not None:
            self._bytes -= len(key) + len(old) + _ENTRY_BYTES
        self._add(key, session_id)

    def _add(self, key: str, session_id: str) -> None:
        value = session_id if len(session_id) <= MAX_TEXT else session_id[:MAX_TEXT]
        m = self._map
        m[key] = value
        self._bytes += len(key) + len(value) + _ENTRY_BYTES
        if len(m) > self._max or self._bytes > self._max_bytes:
            while m and (len(m) > self._max or self._bytes > self._max_bytes):
                k, v = m.popitem(last=False)
                self._bytes -= len(k) + len(v) + _ENTRY_BYTES

    def done(self, flow: object, record: Record) -> None:
        """Addon hook, before the ledger: a chain meter knows gets its session now, and
        every response with a settled session becomes a link later ones can find."""
        m = self._map
        prev = record.session_of
        if prev is not None:
            found = m.get(short_key(prev))
            if found is None:
                return  # the ledger writer asks the store (and the row is no link yet)
            record.session_id, record.session_of = found, None
        rid, session = record.response_id, record.session_id
        if rid is None or session is None:
            return
        key = short_key(rid)
        known = m.get(key)
        if known is None:
            self._add(key, session)  # a response's first row (its creation) makes the link
        elif session == rid:
            record.session_id = known  # a later row of the same response (a retrieve) is in its session


def resolve_sessions(records: Iterable[Record], stored: Mapping[str, str | None]) -> None:
    """Settle the session of each record whose chain the request path did not know
    (`session_of`: the response it follows), in order: from a record earlier in the same batch, else from
    `stored` (response id -> session id, read from the ledger), else the fallback
    already in `session_id` (the row's own response id, or its socket's session)."""
    seen: dict[str, str] = {}
    for record in records:
        prev = record.session_of
        if prev is not None:
            found = seen.get(prev) or stored.get(prev)
            if found:
                record.session_id = found
        record.session_of = None
        if record.response_id is not None and record.session_id is not None:
            seen[record.response_id] = record.session_id


# Newest first, so that a dict built from the rows keeps each response's earliest row:
# the request that created it, whose session later rows of it (retrieves) follow.
SESSIONS_SQL = "SELECT response_id, session_id FROM requests WHERE response_id IN ({}) AND session_id IS NOT NULL ORDER BY started_at DESC"


def sessions_query(response_ids: list[str]) -> str:
    """The one query of a batch's unknown chains, `$1`-style on every dialect."""
    return SESSIONS_SQL.format(", ".join(f"${i}" for i in range(1, len(response_ids) + 1)))
