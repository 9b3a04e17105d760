"""The Responses API's stream events, read one way whether they came over SSE or a WebSocket.

Both transports carry the same events; only the framing differs (`event:` and
`data:` lines, or one message each).  What is read of them is decided here
once:

- which events are decoded: the early ones (`response.created`, `queued`,
  `in_progress`: identity, and the placeholder tier `auto`), the terminal ones
  (usage, the tier that served) and `error`; every other event only counts;
- the first-token rule: the first event whose type ends in `.delta` (output or
  reasoning) is the first token, and no delta is ever decoded;
- what each decoded event does to the response's `Observation`
  (`observe_event`): an `error` ends the response as `failed`, as a
  `response.failed` does;
- how an event too large to decode is read from its head and tail
  (`event_from_ends`).

The SSE observer (`sse.py`) and the WebSocket's metering (`socket.py`) test
type names against these sets inline, where a call per event would cost.
"""

from __future__ import annotations

from typing import Any

from .ends import NOTHING, edge, is_str, last_member, members, partial_response, value_at
from .jsonio import loads
from .objects import Observation, observe_error, observe_response_object, observe_response_shape
from .shapes import Response
from .shapes import decode_event as decode_event_shape

EARLY = frozenset({b"response.created", b"response.queued", b"response.in_progress"})
FINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed", b"response.cancelled"})
ERROR = b"error"
DECODED = EARLY | FINAL | {ERROR}
DELTA = b".delta"  # the suffix of output and reasoning deltas: the first one is the first token
DELTA_TYPE = DELTA.decode()
# The suffix of the events that end a part of the output: once the last event is one of
# them, no delta after it, the client has the whole answer (SPEC §2's hang-up rule).
DONE = b".done"
DONE_TYPE = DONE.decode()
# The deltas OpenAI streams (`response.<name>.delta`), told by a fixed head without
# reading their name: the `event:` lines that open an SSE event (`sse.py`'s fast path)
# and the messages that state their type first on a WebSocket (`socket.py`'s).  Any
# other delta is told by its name's suffix, as before; these only save the work.
DELTA_NAMES = (
    b"output_text", b"reasoning_summary_text", b"reasoning_text", b"function_call_arguments", b"refusal", b"audio",
    b"audio.transcript", b"code_interpreter_call_code", b"custom_tool_call_input", b"mcp_call_arguments",
)  # fmt: skip
DELTA_LINES = tuple(b"event: response.%s.delta\n" % name for name in DELTA_NAMES)
TEXT_DELTA_LINE = DELTA_LINES[0]  # the commonest by far: output text
# The same lines without their LF, as `bytes.split` hands them over.
DELTA_HEADS = frozenset(line[:-1] for line in DELTA_LINES)
TEXT_DELTA_HEAD = TEXT_DELTA_LINE[:-1]
EARLY_TYPES = frozenset(t.decode() for t in EARLY)
FINAL_TYPES = frozenset(t.decode() for t in FINAL)
DECODED_TYPES = frozenset(t.decode() for t in DECODED)


def decode_event(data: bytes | bytearray) -> dict[str, Any] | None:
    """An event's JSON object, or None if its JSON is not an object; raises `jsonio.DecodeError`."""
    obj = loads(data)
    return obj if isinstance(obj, dict) else None


def observe_event(obs: Observation, kind: str, event: dict[str, Any]) -> bool:
    """What a decoded Responses event of type `kind` says of its response; True when it ends it.

    A terminal event without a status of its own (one read from its ends, say)
    ends with the status its type names.
    """
    response = event.get("response")
    if kind in FINAL_TYPES:
        if isinstance(response, dict):
            observe_response_object(obs, response, final=True)
        obs.status = obs.status or kind.partition(".")[2]
        obs.terminal = True
        return True
    if kind == "error":
        error = event.get("error")
        observe_error(obs, error if isinstance(error, dict) else event)  # the old shape: type and code at the top
        obs.status = "failed"
        obs.terminal = True
        return True
    if kind in EARLY_TYPES and isinstance(response, dict):
        observe_response_object(obs, response, final=False)
    return False


def observe_usual_event(obs: Observation, data: bytes | bytearray) -> bool | None:
    """`observe_event` of an event's JSON, decoded by msgspec into what is read of it
    (`shapes.py`): whether it ends the response, or None when it is to be read the
    general way (not in the usual shape, or an `error` event)."""
    event = decode_event_shape(data)
    if event is None:
        return None
    return observe_event_shape(obs, event.type, event.response)


def observe_event_shape(obs: Observation, kind: str | None, response: Response | None) -> bool | None:
    """`observe_event` of an event decoded by msgspec (`shapes.Event`): whether it ends
    the response, or None for an `error` event, which is read the general way."""
    if kind in FINAL_TYPES:
        if response is not None:
            observe_response_shape(obs, response, final=True)
        obs.status = obs.status or kind.partition(".")[2]
        obs.terminal = True
        return True
    if kind in EARLY_TYPES:
        if response is not None:
            observe_response_shape(obs, response, final=False)
        return False
    if kind == "error":
        return None
    return False  # any other event says nothing of its response


_TOP = frozenset({"type", "stream_id", "response", "error", "code"})


def event_from_ends(head: bytes, tail: bytes | bytearray, kind: str | None = None) -> dict[str, Any]:
    """An event too large to hold, read from its head and tail only, so that metering it
    never builds a second, decoded copy of (say) a generated image: its `type` (or
    `kind`, the SSE event name), `stream_id`, `error` and `code`, and what its
    `response` says there (for a terminal event, usage and the tier from the tail)."""
    top = members(head, 0, _TOP)
    event: dict[str, Any] = {}
    for key in ("type", "stream_id", "error", "code"):
        if key in top:
            value = value_at(head, top[key])
            if value is not NOTHING:
                event[key] = value
    if kind is not None:
        event["type"] = kind
    elif "type" not in event:
        # Not in the head: its keys are in another order than OpenAI's (which puts
        # `type` first), sorted say, with `type` the last member of all.
        value = last_member(tail, "type", is_str)
        if value is not NOTHING:
            event["type"] = value
    if "stream_id" not in event:
        value = last_member(tail, "stream_id", is_str)
        if value is not NOTHING:
            event["stream_id"] = value
    if "response" in top:
        etype = event.get("type")
        event["response"] = partial_response(head, tail, top["response"], isinstance(etype, str) and etype in FINAL_TYPES)
    return event


def message_from_ends(data: bytes, limit: int) -> dict[str, Any]:
    """`event_from_ends` of a whole message past `limit` (a WebSocket message)."""
    n = edge(limit)
    return event_from_ends(data[:n], data[-n:])
