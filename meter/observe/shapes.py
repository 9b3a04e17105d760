"""The usual shape of an answer, decoded into just the members metering reads.

A Responses body, and the `response.created` / `response.completed` events of a
stream, carry the whole response (its output, its instructions, its tools), and
a Chat Completions or Embeddings body its choices or vectors, of which
metering reads a dozen members.  orjson builds every dict, list and string
of it, and frees them again; msgspec, given these Structs, checks the whole
document is JSON but builds only the members named here: about half the CPU.

The Structs are strict on purpose: each member has the one type meter takes
from it (a string, a bool, a count, an object), and anything else (a count that
is a float or a bool, a `usage` that is a string, an id that is a number) fails
the decode, and the caller reads the answer the general way (orjson, then
json), as before.  So whenever `decode_body`, `decode_chat_body` or
`decode_event` give a value, the readers see exactly what they would have read
from orjson's dicts (tests/test_observe_shapes.py checks it on hostile input):

- a count is an int within the ledger's BIGINT: a float, or an integer past
  it, is refused here and read the general way, where it is an overflow;
- a duplicated key is the last one, as with orjson (msgspec keeps the last,
  an object replacing the earlier one whole);
- a lone surrogate escape, NaN, Infinity, a number out of float range, trailing
  bytes, nesting past msgspec's depth: refused here, read the general way;
- invalid UTF-8: msgspec does not check the strings it skips, so it is given
  only text that is ASCII or valid UTF-8 (`body_is_utf8`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import msgspec

from ..bounds import BIGINT_MAX, BIGINT_MIN

T = TypeVar("T")

# An int the ledger's BIGINT holds, so that a count decoded here needs no other check
# (`usage.Usage.bounded`).  Any other number (a float, an int past BIGINT: orjson reads
# one past 64 bits as a float) is read the general way, which records it as an overflow.
Count = Annotated[int, msgspec.Meta(ge=BIGINT_MIN, le=BIGINT_MAX)]


class InputTokensDetails(msgspec.Struct, gc=False):
    """`input_tokens_details` of Responses usage, `prompt_tokens_details` of Chat's."""

    cached_tokens: Count | None = None
    cache_write_tokens: Count | None = None


class OutputTokensDetails(msgspec.Struct, gc=False):
    """`output_tokens_details` of Responses usage, `completion_tokens_details` of Chat's."""

    reasoning_tokens: Count | None = None


class ResponsesUsage(msgspec.Struct, gc=False):
    input_tokens: Count | None = None
    input_tokens_details: InputTokensDetails | None = None
    output_tokens: Count | None = None
    output_tokens_details: OutputTokensDetails | None = None
    total_tokens: Count | None = None


class WebSearch(msgspec.Struct, gc=False):
    num_requests: Count | None = None


class ToolUsage(msgspec.Struct, gc=False):
    web_search: WebSearch | None = None


class CacheDiagnostics(msgspec.Struct, gc=False):
    type: str | None = None
    reason: str | None = None
    cache_missed_tokens: Count | None = None


class Error(msgspec.Struct, gc=False):
    type: str | None = None
    code: str | None = None


class Response(msgspec.Struct, gc=False):
    """A `response` object: a JSON body, or the payload of a stream's response event."""

    id: str | None = None
    model: str | None = None
    previous_response_id: str | None = None
    status: str | None = None
    background: bool | None = None
    service_tier: str | None = None
    error: Error | None = None
    usage: ResponsesUsage | None = None
    tool_usage: ToolUsage | None = None
    prompt_cache_diagnostics: CacheDiagnostics | None = None
    # Only whether it is there: a body with an `error` object and no `object`
    # member is an error, not a response.
    object: Any = msgspec.UNSET


class ChatUsage(msgspec.Struct, gc=False):
    prompt_tokens: Count | None = None
    prompt_tokens_details: InputTokensDetails | None = None
    completion_tokens: Count | None = None
    completion_tokens_details: OutputTokensDetails | None = None
    total_tokens: Count | None = None


class ChatBody(msgspec.Struct, gc=False):
    """A Chat Completions (or Embeddings) body: its choices, or its vectors, are skipped."""

    id: str | None = None
    model: str | None = None
    service_tier: str | None = None
    error: Error | None = None
    usage: ChatUsage | None = None
    object: Any = msgspec.UNSET


class Event(msgspec.Struct, gc=False):
    """A Responses stream event, as far as its response is concerned."""

    type: str | None = None
    response: Response | None = None
    # The lane of a WebSocket's event (`socket.py`); SSE events carry none.
    stream_id: str | None = None


class RequestBody(msgspec.Struct, gc=False):
    """A request body's members `facts.request_facts` reads.  The body is mostly its
    `input` (a conversation's whole history, its tools), none of which is built
    here.  `conversation` and `metadata` are kept as their JSON text (absent: empty),
    read the general way when there: they are rare, and of more than one shape."""

    model: str | None = None
    stream: bool | None = None
    background: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    previous_response_id: str | None = None
    conversation: msgspec.Raw = msgspec.Raw()
    generate: bool | None = None
    metadata: msgspec.Raw = msgspec.Raw()


class CreateRequest(msgspec.Struct, gc=False):
    """The request members of a WebSocket `response.create`, at its top level or in its
    nested `response`.  UNSET when absent: the nested members override the top
    level's, as a dict merge would, so an absent member and a null one differ."""

    model: str | None | msgspec.UnsetType = msgspec.UNSET
    stream: bool | None | msgspec.UnsetType = msgspec.UNSET
    background: bool | None | msgspec.UnsetType = msgspec.UNSET
    service_tier: str | None | msgspec.UnsetType = msgspec.UNSET
    safety_identifier: str | None | msgspec.UnsetType = msgspec.UNSET
    user: str | None | msgspec.UnsetType = msgspec.UNSET
    prompt_cache_key: str | None | msgspec.UnsetType = msgspec.UNSET
    previous_response_id: str | None | msgspec.UnsetType = msgspec.UNSET
    conversation: msgspec.Raw = msgspec.Raw()
    generate: bool | None | msgspec.UnsetType = msgspec.UNSET
    metadata: msgspec.Raw = msgspec.Raw()


class CreateMessage(CreateRequest):
    """A WebSocket `response.create` (a Codex turn carries its whole input, none of which
    is built here), with its lane and its nested form's `response`."""

    type: str | msgspec.UnsetType = msgspec.UNSET
    stream_id: str | None | msgspec.UnsetType = msgspec.UNSET
    response: CreateRequest | None | msgspec.UnsetType = msgspec.UNSET


_body = msgspec.json.Decoder(Response).decode
_event = msgspec.json.Decoder(Event).decode
_chat_body = msgspec.json.Decoder(ChatBody).decode
_request = msgspec.json.Decoder(RequestBody).decode
_create = msgspec.json.Decoder(CreateMessage).decode

# Everything a decode here can raise on a document the general reading may still
# take: DecodeError and ValidationError (both msgspec.DecodeError), and RecursionError
# past msgspec's nesting depth.
Refused = (msgspec.DecodeError, RecursionError)


def body_is_utf8(data: bytes | bytearray) -> bool:
    """True if `data` is text orjson would not refuse as UTF-8 (msgspec skips unread
    strings without checking them).  Most answers are ASCII, the one cheap test."""
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _reader(decode: Callable[[bytes | bytearray], T], doc: str) -> Callable[[bytes | bytearray], T | None]:
    """`decode` of text that is valid UTF-8 (see `body_is_utf8`), or None for whatever
    it refuses: the caller then reads it the general way.  Made once per shape, so
    that a call is one function, as written out."""

    def read(data: bytes | bytearray) -> T | None:
        if not body_is_utf8(data):
            return None
        try:
            return decode(data)
        except Refused:
            return None

    read.__doc__ = doc
    return read


decode_body = _reader(_body, "The response a whole JSON body is, or None: read it the general way.")
decode_chat_body = _reader(_chat_body, "The completion (or embeddings) a whole JSON body is, or None: read it the general way.")
decode_event = _reader(_event, "A Responses stream event (its type and response), or None: read it the general way.")
decode_request = _reader(_request, "The members of a request body metering reads, or None: read it the general way.")
decode_create = _reader(_create, "A WebSocket client message as a `response.create`, or None: read it the general way.")
