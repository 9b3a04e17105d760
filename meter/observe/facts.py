"""What a request asks for, read from its body: model, stream, tier, user, tags.

`request_facts` reads an HTTP request body, `facts_from_request` a request
already decoded (a WebSocket `response.create`).  Anything unreadable is left
unknown: the request is forwarded untouched whatever it holds.  Metadata is
kept within OpenAI's own limits, so a client cannot grow a ledger row with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from msgspec import UNSET

from .jsonio import DecodeError, dumps, loads, orjson_loads
from .shapes import CreateMessage, CreateRequest, RequestBody, decode_request


@dataclass(slots=True)
class RequestFacts:
    model: str | None = None
    stream: bool = False
    background: bool = False
    service_tier: str | None = None
    user_id: str | None = None
    prompt_cache_key: str | None = None
    previous_response_id: str | None = None
    tags: str | None = None  # metadata as JSON text, bounded (see bounded_tags)
    metadata: dict[str, str] | None = None  # the same, as a dict: Meter-Tag-* headers merge over it
    conversation: str | None = None  # the `conversation` id (string or `{"id": ...}`): the row's session
    generate: bool = True
    cut: tuple[str, ...] = ()  # what was cut to its bound ("tags", "request"), for meter_values_truncated_total


# A body with more JSON members than this is not decoded for metering: decoding
# costs the event loop ~0.65 us a member (a 50 MiB body of 3.7 M metadata keys
# stalled every request for 2.4 s).  Real requests stay far below it; the
# count is a byte search, ~1 ms a MiB, done only on bodies past a MiB.
_MAX_MEMBERS = 500_000
_COUNT_MEMBERS_PAST = 1 << 20


def request_facts(body: bytes) -> RequestFacts:
    """What meter records from a request body; anything unreadable is left unknown.

    The usual body is read by msgspec into just the members read here
    (`shapes.RequestBody`): a request is mostly its input, which orjson would
    build whole and drop (a 47 KB conversation: 89 us, against 31 here;
    scripts/bench_metering.py).  A body of any other shape is read the general
    way, and reads the same either way (tests/test_request_facts_shapes.py)."""
    if not body:
        return RequestFacts()
    if len(body) > _COUNT_MEMBERS_PAST and body.count(b'":') > _MAX_MEMBERS:
        return RequestFacts(cut=("request",))
    shape = decode_request(body)
    if shape is not None:
        facts = _facts_from_shape(shape)
        if facts is not None:
            return facts
    return request_facts_generally(body)


def request_facts_generally(body: bytes) -> RequestFacts:
    """`request_facts` of a body decoded whole (orjson, else json)."""
    try:
        obj = orjson_loads(body)  # the usual body, without `loads`'s call around it
    except ValueError:
        try:
            obj = loads(body)  # what orjson refuses and json reads (a lone surrogate)
        except DecodeError:
            return RequestFacts()
    if not isinstance(obj, dict):
        return RequestFacts()
    return facts_from_request(obj)


def _facts_from_shape(shape: RequestBody) -> RequestFacts | None:
    """The facts of a body msgspec read; None when its conversation or metadata is JSON
    orjson refuses (the whole body is then read the general way, as before)."""
    conversation = metadata = None
    try:
        if shape.conversation:
            conversation = orjson_loads(memoryview(shape.conversation))
        if shape.metadata:
            metadata = orjson_loads(memoryview(shape.metadata))
    except ValueError:
        return None
    facts = RequestFacts(
        shape.model, shape.stream is True, shape.background is True, shape.service_tier,
        shape.safety_identifier or shape.user,  # an empty safety_identifier gives way, as below
        shape.prompt_cache_key, shape.previous_response_id, None, None,
        _conversation_id(conversation) if conversation is not None else None,
        shape.generate is not False,
    )
    if metadata:
        _add_tags(facts, metadata)
    return facts


def facts_from_create(message: CreateMessage) -> RequestFacts | None:
    """`facts_from_request` of a WebSocket `response.create` msgspec read: its nested
    `response` members over its top-level ones, as the general reading merges them;
    None where it must read the message the general way (see `_facts_from_shape`).
    Once per turn, before the turn is relayed: the members are written out."""
    top, nested = message, message.response
    if isinstance(nested, CreateRequest):
        model = nested.model if nested.model is not UNSET else top.model
        stream = nested.stream if nested.stream is not UNSET else top.stream
        background = nested.background if nested.background is not UNSET else top.background
        tier = nested.service_tier if nested.service_tier is not UNSET else top.service_tier
        safety = nested.safety_identifier if nested.safety_identifier is not UNSET else top.safety_identifier
        user = nested.user if nested.user is not UNSET else top.user
        cache_key = nested.prompt_cache_key if nested.prompt_cache_key is not UNSET else top.prompt_cache_key
        previous = nested.previous_response_id if nested.previous_response_id is not UNSET else top.previous_response_id
        generate = nested.generate if nested.generate is not UNSET else top.generate
        conversation = nested.conversation or top.conversation  # an empty Raw: absent
        metadata = nested.metadata or top.metadata
    else:
        model, stream, background, tier, safety, user = top.model, top.stream, top.background, top.service_tier, top.safety_identifier, top.user
        cache_key, previous, generate, conversation, metadata = top.prompt_cache_key, top.previous_response_id, top.generate, top.conversation, top.metadata
    return _facts_from_shape(RequestBody(
        None if model is UNSET else model, None if stream is UNSET else stream, None if background is UNSET else background,
        None if tier is UNSET else tier, None if safety is UNSET else safety, None if user is UNSET else user,
        None if cache_key is UNSET else cache_key, None if previous is UNSET else previous, conversation,
        None if generate is UNSET else generate, metadata,
    ))  # fmt: skip


# The members most requests lack, with the fact each leaves at its default when absent.
_USUALLY_ABSENT = frozenset({"service_tier", "safety_identifier", "user", "previous_response_id", "conversation", "background", "generate", "metadata"})


def facts_from_request(obj: dict[str, Any]) -> RequestFacts:
    """`request_facts` of a request already decoded (a WebSocket `response.create`)."""
    # Once per request: the reads are written out and the facts made in one call
    # (decoded JSON has exact types, so `type(v) is str` is the isinstance test).
    get = obj.get
    if _USUALLY_ABSENT.isdisjoint(obj):
        # None of them is here (one pass over the request's names, in C): each of their
        # facts is its default, and what is left takes three reads.
        model, cache_key = get("model"), get("prompt_cache_key")
        return RequestFacts(model if type(model) is str else None, get("stream") is True, False, None, None, cache_key if type(cache_key) is str else None)
    model, tier, user, cache_key, previous = get("model"), get("service_tier"), get("safety_identifier"), get("prompt_cache_key"), get("previous_response_id")
    if type(user) is not str or not user:
        user = get("user")
    conversation = get("conversation")
    if conversation is not None:
        conversation = _conversation_id(conversation)
    facts = RequestFacts(
        model if type(model) is str else None,
        get("stream") is True,
        get("background") is True,
        tier if type(tier) is str else None,
        user if type(user) is str else None,
        cache_key if type(cache_key) is str else None,
        previous if type(previous) is str else None,
        None,  # tags and metadata: below
        None,
        conversation,
        get("generate") is not False,
    )
    metadata = get("metadata")
    if metadata:
        _add_tags(facts, metadata)
    return facts


def _conversation_id(conversation: Any) -> str | None:
    """A request's `conversation`: its id, given as a string or as `{"id": ...}`."""
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    return conversation if type(conversation) is str and conversation else None


def _add_tags(facts: RequestFacts, metadata: Any) -> None:
    """A request's metadata, if an object, as the facts' tags, bounded."""
    if isinstance(metadata, dict):
        tags, cut = bounded_tags(metadata)
        facts.tags = tags_json(tags)
        facts.metadata = tags
        if cut:
            facts.cut = ("tags",)


# OpenAI's own metadata limits (SPEC §2b): what meter keeps of a request's metadata.
TAG_PAIRS, TAG_KEY_CHARS, TAG_VALUE_CHARS = 16, 64, 512


_TOO_DEEP = "(a value nested too deep to write)"


def _json_text(value: Any) -> str:
    """A non-string metadata value as its JSON text (cut later), whatever its depth."""
    try:
        return dumps(value).decode()
    except (TypeError, ValueError):  # past orjson's depth or integer range
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):  # even repr() recurses: say what it was
            return _TOO_DEEP


def bounded_tags(metadata: dict[str, Any]) -> tuple[dict[str, str], bool]:
    """The first 16 pairs, keys lower-cased and cut to 64 characters, values to 512,
    every value a string (non-strings as their JSON text); and whether anything was cut.

    Tag names are case-insensitive and stored lower-case (SPEC §10): a report's or a
    budget's `tag:Team` is `tag:team`, which a key kept as `Team` would never match.
    Of two keys that differ only by case, the first is kept (as of two headers)."""
    tags: dict[str, str] = {}
    cut = len(metadata) > TAG_PAIRS
    for i, (key, value) in enumerate(metadata.items()):
        if i == TAG_PAIRS:
            break
        if not key.islower():
            key = key.lower()
        if key in tags:
            cut = True
            continue
        if len(key) > TAG_KEY_CHARS:
            key, cut = key[:TAG_KEY_CHARS], True
        if not isinstance(value, str):
            value = _json_text(value)
        if len(value) > TAG_VALUE_CHARS:
            value, cut = value[:TAG_VALUE_CHARS], True
        tags[key] = value
    return tags, cut


def tags_json(metadata: dict[str, str]) -> str:
    """Bounded tags as compact JSON, non-ASCII kept as is.  A lone surrogate (from a
    JSON escape, or an invalid byte in a `Meter-Tag-*` header), which orjson refuses,
    is written by json as is; the ledger's sanitising step makes it U+FFFD."""
    try:
        return dumps(metadata).decode()
    except TypeError:
        return json.dumps(metadata, separators=(",", ":"), ensure_ascii=False)
