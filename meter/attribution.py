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
- Background responses: the POST answers without usage, which a later retrieve
  shows (SPEC §3).  That GET has no body, so the row that carries the usage is
  credited to the request that created the response: it takes the creating
  row's `Attribution` (session, tags, user, model asked, project), by the same
  two paths as a chain's session (`SessionChains` for the creators this process
  recorded, the ledger writer for the others).  Its key stays its own.

The `Meter-Tag-*` and `Meter-Session` headers are meter's: `take_meter_headers`
removes them from what goes upstream, and identity never reads them.
"""

from __future__ import annotations

import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from .bounds import MAX_TEXT, short_key
from .observe.facts import tags_json
from .observe.jsonio import loads
from .record import Record

TAG_PREFIX = "meter-tag-"
SESSION_HEADER = "meter-session"
MAX_HEADER_TAGS, TAG_NAME_CHARS, TAG_HEADER_VALUE_CHARS = 16, 64, 256
# What a row's tags may hold (SPEC §2b): OpenAI's 16 metadata pairs plus the header tags.
MAX_ROW_TAGS = 16 + MAX_HEADER_TAGS
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
# What an `Attribution` costs beyond its strings: the tuple of five, with its GC header.
_ATTRIBUTION_BYTES = 96


class Attribution(NamedTuple):
    """What the row that created a background response lends the row that carries its
    usage (a retrieve that shows the terminal response): the spend is the creating
    request's, so budgets, reports and metrics must find it under that request's
    session, tags, user, model asked and project.  The key is not lent: the row's key
    is the one that made its own request."""

    session_id: str | None
    tags: str | None
    user_id: str | None
    model_requested: str | None
    project: str | None

    @classmethod
    def of(cls, record: Record) -> Attribution:
        session = record.session_id
        if session is not None and len(session) > MAX_TEXT:
            session = session[:MAX_TEXT]
        return cls(session, record.tags, record.user_id, record.model_requested, record.project)

    def lend(self, record: Record) -> int:
        """Credit `record` to the creator, settling its links (`session_of`, `attribution_of`).
        The creator's values come first: the usage is its request's, and a poll cannot move
        it to another team or user.  The retrieve keeps a value only where the creator had
        none, and its own tags (a GET can carry `Meter-Tag-*` headers) under names the
        creator did not use, as many as the row may hold; returns how many were dropped."""
        dropped = 0
        if self.tags:
            own = record.tags
            if own and own != self.tags:
                record.tags, dropped = _tags_creator_first(self.tags, own)
            else:
                record.tags = self.tags
        record.user_id = self.user_id or record.user_id
        record.model_requested = self.model_requested or record.model_requested
        record.project = self.project or record.project
        if self.session_id:
            record.session_id = self.session_id
        record.session_of = record.attribution_of = None
        return dropped


def _tags_creator_first(creator: str, own: str) -> tuple[str, int]:
    """The creator's tags, then the row's own names it lacks, up to `MAX_ROW_TAGS`; and how
    many of its own were dropped past that bound.  Text that is not a JSON object on either
    side (the store refuses it; a row's own is meter's) leaves the creator's tags alone."""
    try:
        theirs, mine = loads(creator), loads(own)
    except ValueError:
        return creator, 0
    if not isinstance(theirs, dict) or not isinstance(mine, dict):
        return creator, 0
    merged = dict(theirs)
    dropped = 0
    for name, value in mine.items():
        if name in merged:
            continue
        if len(merged) >= MAX_ROW_TAGS:
            dropped += 1
        else:
            merged[name] = value
    return tags_json(merged), dropped


def _held(value: str | Attribution) -> int:
    """Bytes an entry's value holds, as `SessionChains` counts them: a session's characters
    plus `_ENTRY_BYTES`; an attribution's strings as allocated (a tag's text may be four
    bytes a character), plus the tuple."""
    if type(value) is str:
        return len(value) + _ENTRY_BYTES
    return _ENTRY_BYTES + _ATTRIBUTION_BYTES + sum(map(sys.getsizeof, filter(None, value)))


def _session(value: str | Attribution) -> str | None:
    return value if type(value) is str else value.session_id  # type: ignore[union-attr]


class SessionChains:
    """Response id -> session id of the responses this meter recorded lately: how a
    `previous_response_id` finds its chain's session without leaving memory.  For a
    background response the value is its creating row's `Attribution` (its session with
    the rest): how the retrieve that carries its usage finds whom to credit.

    Bounded in entries and in bytes: ids are kept as `short_key`s (a digest past 256
    characters) and sessions to 256 characters, as the ledger keeps them; the oldest
    entries go first.  An entry is counted as its characters plus `_ENTRY_BYTES`
    (measured: two str headers and the ordered dict's slot and node), an attribution as
    its strings' allocations (`_held`), so `max_bytes`
    bounds the memory it holds (8 MiB: ~23,000 chains of real ids, ~10,900 of ids and
    sessions at their longest; tests/test_tags_sessions.py and
    tests/test_background_attribution.py measure it).  Used on the event loop only.
    """

    __slots__ = ("_bytes", "_map", "_max", "_max_bytes")

    def __init__(self, max_entries: int = 100_000, max_bytes: int = 8 << 20) -> None:
        self._map: OrderedDict[str, str | Attribution] = OrderedDict()
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
        found = self._map.get(short_key(response_id))
        return None if found is None else _session(found)

    def put(self, response_id: str, session_id: str) -> None:
        key = short_key(response_id)
        old = self._map.pop(key, None)
        if old is not None:
            self._bytes -= len(key) + _held(old)
        self._add(key, session_id)

    def _add(self, key: str, value: str | Attribution) -> None:
        if type(value) is str:
            if len(value) > MAX_TEXT:
                value = value[:MAX_TEXT]
            held = len(value) + _ENTRY_BYTES  # `_held`, inline: once per response
        else:
            held = _held(value)
        m = self._map
        m[key] = value
        self._bytes += len(key) + held
        if len(m) > self._max or self._bytes > self._max_bytes:
            while m and (len(m) > self._max or self._bytes > self._max_bytes):
                k, v = m.popitem(last=False)
                self._bytes -= len(k) + _held(v)

    def done(self, flow: object, record: Record) -> None:
        """Addon hook, before the ledger and every other sink: a chain meter knows gets its
        session now, a retrieve carrying a background response's usage its creator's
        attribution, and every response with a settled session becomes a link later ones
        can find."""
        m = self._map
        # The background flag first: a foreground row (nearly every one) is one attribute.
        if record.background and record.endpoint == "responses.retrieve" and record.response_id is not None and record.has_usage:
            # A retrieve showing a background response's usage (SPEC §3): its GET has no
            # body, so the row is credited to the request that created the response.
            response_id = record.response_id
            lent = m.get(short_key(response_id))
            if type(lent) is not Attribution:
                record.attribution_of = response_id[:MAX_TEXT]  # not a creation recorded here: the ledger writer asks the store
                return  # (and the row is no link: its session is not settled yet)
            dropped = lent.lend(record)
            if dropped:
                record.cut += (DROPPED_TAG,) * dropped  # counted by the ledger, as a dropped tag header
            return
        prev = record.session_of
        if prev is not None:
            found = m.get(short_key(prev))
            if found is None:
                return  # the ledger writer asks the store (and the row is no link yet)
            record.session_id, record.session_of = _session(found), None
        rid, session = record.response_id, record.session_id
        if rid is None or session is None:
            return
        key = short_key(rid)
        known = m.get(key)
        if known is None:
            # A response's first row (its creation) makes the link; a background one's
            # keeps what the row that will carry its usage is credited with.
            self._add(key, Attribution.of(record) if record.background and record.endpoint == "responses" else session)
        elif session == rid:
            record.session_id = _session(known)  # a later row of the same response (a retrieve) is in its session


def links_asked(records: Iterable[Record], clean: Callable[[str], str]) -> list[str]:
    """The response ids whose rows settle what the request path left to the ledger writer
    (`session_of`, `attribution_of`), each set to the id as the ledger keeps it (`clean`:
    valid text, then cut), which is how rows are found."""
    ask: set[str] = set()
    for record in records:
        if record.session_of is not None:
            record.session_of = clean(record.session_of[:MAX_TEXT])
            ask.add(record.session_of)
        if record.attribution_of is not None:
            record.attribution_of = clean(record.attribution_of[:MAX_TEXT])
            ask.add(record.attribution_of)
    return sorted(ask)


def resolve_links(records: Iterable[Record], rows: Iterable[tuple[Any, ...]]) -> int:
    """Settle, in order, what the request path did not know (another replica's response, a
    previous run's, or one whose own links were still open): a retrieve's creator
    (`attribution_of`: its `Attribution`, session included) and a chain's session
    (`session_of`: the response it follows), each from a record earlier in the same batch,
    else from `rows` (`LINKS_SQL`'s, newest first), else the row keeps its own values and
    the fallback already in `session_id` (its own response id, or its socket's session).
    Returns how many of the rows' own tags were dropped past the bound (`Attribution.lend`)."""
    sessions: dict[str, str] = {}
    creators: dict[str, Attribution] = {}
    # Newest first, each later row overwriting: the earliest row of each response wins,
    # the request that created it, whose session later rows of it (retrieves) follow.
    for rid, endpoint, session, tags, user_id, model_requested, project in rows:
        if session is not None:
            sessions[rid] = session
        if endpoint == "responses":
            creators[rid] = Attribution(session, tags, user_id, model_requested, project)
    seen: dict[str, str] = {}
    made: dict[str, Attribution] = {}
    dropped = 0
    for record in records:
        creator = record.attribution_of
        if creator is not None:
            lent = made.get(creator) or creators.get(creator)
            if lent is not None:
                dropped += lent.lend(record)  # its session, too: no chain to follow then
        prev = record.session_of
        if prev is not None:
            found = seen.get(prev) or sessions.get(prev)
            if found:
                record.session_id = found
        record.session_of = record.attribution_of = None
        rid = record.response_id
        if rid is not None:
            if record.session_id is not None:
                seen[rid] = record.session_id
            if record.background and record.endpoint == "responses" and rid not in made:
                made[rid] = Attribution.of(record)
    return dropped


# Every row of the asked response ids, newest first (see `resolve_links`).  `endpoint`
# says which is a creation; a chain's session is any row's.
LINKS_SQL = (
    "SELECT response_id, endpoint, session_id, tags, user_id, model_requested, project FROM requests "
    "WHERE response_id IN ({}) ORDER BY started_at DESC"
)


def links_query(response_ids: list[str]) -> str:
    """The one query of a batch's unknown links, `$1`-style on every dialect."""
    return LINKS_SQL.format(", ".join(f"${i}" for i in range(1, len(response_ids) + 1)))
