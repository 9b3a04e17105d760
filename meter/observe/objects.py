"""The `Observation` of an answer, and reading the objects an answer is made of.

A Responses API `response` object, a Chat Completions (or Embeddings) body or
chunk, and an OpenAI error each add what they say to an `Observation`; a whole
JSON answer is one of them.  Streams (`sse.py`, the WebSocket's `socket.py`)
hand the same objects over as their events arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from msgspec import UNSET

from .jsonio import DecodeError, as_int, as_str, loads, orjson_loads
from .shapes import ChatBody, Response, decode_body, decode_chat_body
from .usage import (
    Usage,
    cache_status,
    cache_status_from_diagnostics,
    usage_from_chat,
    usage_from_chat_shape,
    usage_from_responses,
    usage_from_shape,
)

# The statuses of a response that has ended: only such a response names the tier that
# served it (SPEC §3).  Before, a response says `auto`, the tier still to be chosen (or
# the tier asked for); one cancelled before it ran says `auto` to the end.
FINAL_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled"})
UNCHOSEN_TIER = "auto"
# The statuses of a response that ran to its end and reports what it used: one without
# usage is a model call whose consumption is unknown (`note_missing_usage`).  A failed
# one says why in its error; a cancelled one is not consumption (SPEC §3).
RAN_STATUSES = frozenset({"completed", "incomplete"})


@dataclass(slots=True)
class Observation:
    model: str | None = None
    response_id: str | None = None
    previous_response_id: str | None = None
    status: str | None = None  # the response's own status: completed, incomplete, failed, queued, ...
    background: bool | None = None  # the response object's own `background` flag
    service_tier: str | None = None
    usage: Usage | None = None
    error_type: str | None = None
    error_code: str | None = None
    first_token_at: float | None = None  # clock() reading at the first output delta
    terminal: bool = False  # a terminal event (or whole JSON body) was read
    unreadable: str | None = None  # why (part of) the body could not be read
    # Why a model call that ended without an error has no usage meter could read:
    # metered_bytes_limit, oversized_event, unknown_encoding, no_include_usage,
    # no_terminal_event.  Counted, so that nothing goes unmetered silently.
    unmetered: str | None = None


def note_missing_usage(obs: Observation, kind: str) -> None:
    """A model call that ended, without an error, and reported no usage: `unmetered`
    says so (`no_usage`), so that it is counted rather than taken for a call that
    used nothing.  `kind` `chat` (Chat Completions, Embeddings): any whole answer;
    `responses`: one whose status says it ran (`RAN_STATUSES`), not a background
    response still queued."""
    if (obs.usage is None and obs.terminal and obs.unmetered is None and obs.error_type is None and obs.error_code is None
            and (kind == "chat" or obs.status in RAN_STATUSES)):
        obs.unmetered = "no_usage"


def observe_error(obs: Observation, error: Any) -> None:
    if isinstance(error, dict):
        obs.error_type = as_str(error.get("type")) or obs.error_type
        code = error.get("code")
        obs.error_code = str(code) if code is not None else obs.error_code


def observe_response_object(obs: Observation, response: dict[str, Any], final: bool = True) -> None:
    """Read a Responses API `response` object (a JSON body or a stream event's payload).

    `final` is False for early stream events, whose service_tier is the placeholder
    `auto` rather than the tier that served the request; a whole response read (a
    JSON answer) names its served tier only once it has ended (`FINAL_STATUSES`;
    a response without a status counts as ended), and never as `auto`, which serves
    nothing (`UNCHOSEN_TIER`).  A member is taken only
    when it is a non-empty string (or a bool, or an object, as said); the checks
    are written out, not called, since this runs for every answer.
    """
    get = response.get
    value = get("id")
    if isinstance(value, str) and value:
        obs.response_id = value
    value = get("model")
    if isinstance(value, str) and value:
        obs.model = value
    value = get("previous_response_id")
    if isinstance(value, str) and value:
        obs.previous_response_id = value
    status = get("status")
    if isinstance(status, str) and status:
        obs.status = status
    else:
        status = None
    value = get("background")
    if value is True or value is False:
        obs.background = value
    if not final:
        return
    value = get("service_tier")
    if isinstance(value, str) and value and value != UNCHOSEN_TIER and (status is None or status in FINAL_STATUSES):
        obs.service_tier = value
    value = get("error")
    if value is not None:
        observe_error(obs, value)
    usage = get("usage")
    if isinstance(usage, dict):
        u = usage_from_responses(usage)
        tool_usage = get("tool_usage")
        if isinstance(tool_usage, dict):
            web_search = tool_usage.get("web_search")
            if isinstance(web_search, dict):
                u.web_search_calls = as_int(web_search.get("num_requests"))
        diagnostics = get("prompt_cache_diagnostics")
        if isinstance(diagnostics, dict):
            u.cache_status, u.cache_missed_tokens = cache_status_from_diagnostics(diagnostics)
        obs.usage = u


def observe_response_shape(obs: Observation, response: Response, final: bool = True) -> None:
    """`observe_response_object` of a response msgspec decoded (`shapes.py`), whose
    members already have the types meter takes: the same reading, without the checks."""
    value = response.id
    if value:
        obs.response_id = value
    value = response.model
    if value:
        obs.model = value
    value = response.previous_response_id
    if value:
        obs.previous_response_id = value
    status = response.status
    if status:
        obs.status = status
    background = response.background
    if background is not None:
        obs.background = background
    if not final:
        return
    value = response.service_tier
    if value and value != UNCHOSEN_TIER and (not status or status in FINAL_STATUSES):
        obs.service_tier = value
    error = response.error
    if error is not None:
        obs.error_type = error.type or obs.error_type
        if error.code is not None:
            obs.error_code = error.code
    usage = response.usage
    if usage is not None:
        u = usage_from_shape(usage)
        tool_usage = response.tool_usage
        if tool_usage is not None and tool_usage.web_search is not None:
            u.web_search_calls = tool_usage.web_search.num_requests
        diagnostics = response.prompt_cache_diagnostics
        if diagnostics is not None:
            u.cache_status, u.cache_missed_tokens = cache_status(diagnostics.type, diagnostics.reason, diagnostics.cache_missed_tokens)
        obs.usage = u


def observe_chat_object(obs: Observation, obj: dict[str, Any]) -> None:
    """Read a Chat Completions / Embeddings body or stream chunk."""
    obs.response_id = as_str(obj.get("id")) or obs.response_id
    obs.model = as_str(obj.get("model")) or obs.model
    obs.service_tier = as_str(obj.get("service_tier")) or obs.service_tier
    usage = obj.get("usage")
    if isinstance(usage, dict):
        obs.usage = usage_from_chat(usage)


def observe_chat_shape(obs: Observation, body: ChatBody) -> None:
    """`observe_chat_object` of a body msgspec decoded (`shapes.py`), on a new `Observation`."""
    obs.response_id = body.id or None
    obs.model = body.model or None
    obs.service_tier = body.service_tier or None
    if body.usage is not None:
        obs.usage = usage_from_chat_shape(body.usage)


def observe_answer(obs: Observation, kind: str, obj: dict[str, Any]) -> None:
    """Read a whole answer (or what was found of one cut in the middle): an error, or
    the response (`kind` `responses`) or completion (`chat`) it is."""
    if kind == "responses":
        observe_response_object(obs, obj)
    else:
        observe_chat_object(obs, obj)


def observe_json_body(kind: str, body: bytes | bytearray) -> Observation:
    """Observe a complete (non-stream) JSON answer. `kind` is `responses` or `chat`."""
    obs = Observation()
    if not body:
        return obs
    # The usual answer, decoded into what is read of it (`shapes.py`); None: read it the general way.
    shape = decode_body(body) if kind == "responses" else decode_chat_body(body)
    if shape is not None:
        obs.terminal = True
        error = shape.error
        if error is not None and shape.object is UNSET:  # an error, as `observe_error` reads it
            obs.error_type = error.type or None
            obs.error_code = error.code
        elif type(shape) is ChatBody:
            observe_chat_shape(obs, shape)
        else:
            observe_response_shape(obs, shape)  # type: ignore[arg-type]
        if obs.usage is None:
            note_missing_usage(obs, kind)
        return obs
    try:
        obj = orjson_loads(body)  # the usual answer, without `loads`'s call around it
    except ValueError:
        try:
            obj = loads(body)  # what orjson refuses and json reads (a lone surrogate)
        except DecodeError as exc:
            obs.unreadable = f"invalid JSON: {str(exc)[:120]}"
            return obs
    if not isinstance(obj, dict):
        obs.unreadable = "JSON body is not an object"
        return obs
    obs.terminal = True
    error = obj.get("error")
    if isinstance(error, dict) and "object" not in obj:
        observe_error(obs, error)
    elif kind == "responses":
        observe_response_object(obs, obj)
    else:
        observe_chat_object(obs, obj)
    if obs.usage is None:
        note_missing_usage(obs, kind)
    return obs
