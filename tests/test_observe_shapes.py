"""The msgspec reading of Responses answers (meter/observe/shapes.py) against the general one.

Whenever the Structs decode an answer, what meter reads of it must be exactly
what orjson's (or json's) dicts give; whatever they refuse is read the general
way.  Checked on generated answers: well-formed ones with every member the
readers take, odd types, duplicated keys, and hostile bytes (invalid UTF-8, lone
surrogates, huge integers, NaN, BOM, trailing bytes, deep nesting).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from unittest import mock

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meter.observe import objects, responses
from meter.observe.jsonio import DecodeError, loads
from meter.observe.objects import Observation, observe_json_body
from meter.observe.responses import observe_event, observe_usual_event
from meter.observe.shapes import decode_body, decode_chat_body, decode_event
from meter.observe.sse import SSEObserver

BENCH_BODY = (
    b'{"id": "resp_1", "object": "response", "created_at": 1780000000, "status": "completed", "model": "gpt-4o-2024-08-06",'
    b' "service_tier": "default", "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text",'
    b' "text": "Hello there."}]}], "usage": {"input_tokens": 25, "input_tokens_details": {"cached_tokens": 0},'
    b' "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 34}}'
)

# --- generated documents: an object is a list of (key, value) pairs, so that keys can repeat


class Obj(list):  # type: ignore[type-arg]
    pass


def encode(value: object, ascii_only: bool) -> str:
    if isinstance(value, Obj):
        return "{" + ",".join(f"{encode(k, ascii_only)}:{encode(v, ascii_only)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v, ascii_only) for v in value) + "]"
    if isinstance(value, Raw):
        return value.text
    return json.dumps(value, ensure_ascii=ascii_only)


class Raw:
    """JSON text written as is: a number orjson and msgspec may read differently, a literal json takes."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text!r})"


LONE = ["\ud800", "\udfff", "a\udc00b"]
SMALL = st.integers(-5, 10**6)
INTS = st.one_of(
    SMALL, SMALL, SMALL,
    st.sampled_from([0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**30, -(10**30), 10**400]),
)
RAWS = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1.0", "25.0", "1e2", "-0", "-0.0", "1E+2", "0.1e-400", "1.7976931348623159e308"]).map(Raw)
SCALARS = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(allow_nan=False, allow_infinity=False), RAWS,
    st.text(max_size=8), st.sampled_from(["", "auto", "default", "completed", "cache_hit", "cache_miss", "x"] + LONE),
)


SAFE_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
COUNT = st.one_of(INTS, st.none())
STR = st.one_of(st.sampled_from(["", "resp_1", "gpt-4o", "auto", "default", "completed", "failed", "server_error", "cache_hit", "cache_miss"]), st.text(max_size=5))
KINDS = st.sampled_from(["response.created", "response.in_progress", "response.queued", "response.completed", "response.incomplete",
                         "response.failed", "response.cancelled", "error", "response.output_text.delta", "other"])


def documents(mixed: bool) -> tuple[st.SearchStrategy[Obj], st.SearchStrategy[Obj]]:
    """Responses and events: `mixed`, any member may have any value, hostile ones
    included; otherwise each member has the type read (the ints of every size) and
    the others are plain, so that most take the msgspec reading."""
    scalars = SCALARS if mixed else SAFE_SCALARS
    anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.lists(st.tuples(st.text(max_size=6), inner), max_size=5).map(Obj)), max_leaves=12)

    def shaped(fields: dict[str, st.SearchStrategy[object]]) -> st.SearchStrategy[Obj]:
        """An object with the members named (each maybe there, maybe twice) and others."""
        # One strategy per member, made once: a flatmap to a strategy made anew on every
        # draw had Hypothesis validate it and work out its properties each time (most of
        # an example's cost); this draws the same choices into the same documents.
        members = {k: st.tuples(st.just(k), st.one_of(v, v, anything) if mixed else v) for k, v in fields.items()}
        member = st.sampled_from(sorted(fields)).flatmap(members.__getitem__)
        other = st.tuples(st.text(max_size=6), anything)
        some = st.lists(st.one_of(member, member, member, other), max_size=12)
        if mixed:
            return some.map(Obj)
        every = st.fixed_dictionaries(fields).map(lambda members: list(members.items()))
        return st.tuples(st.one_of(every, st.just([])), some).map(lambda parts: Obj(parts[0] + parts[1]))

    usage_fields = shaped({
        "input_tokens": COUNT, "output_tokens": COUNT, "total_tokens": COUNT,
        "input_tokens_details": st.one_of(st.none(), shaped({"cached_tokens": COUNT, "cache_write_tokens": COUNT})),
        "output_tokens_details": st.one_of(st.none(), shaped({"reasoning_tokens": COUNT})),
    })
    usage = usage_fields if mixed else st.one_of(usage_fields, st.lists(st.tuples(st.sampled_from(["input_tokens", "output_tokens", "total_tokens"]), INTS), max_size=4).map(Obj))
    response = shaped({
        "id": STR, "model": STR, "previous_response_id": STR, "status": STR, "background": st.one_of(st.none(), st.booleans()),
        "service_tier": STR, "object": st.one_of(st.just("response"), anything),
        "error": st.one_of(st.none(), shaped({"type": st.one_of(st.none(), STR), "code": st.one_of(st.none(), STR, INTS)})),
        "usage": st.one_of(st.none(), usage),
        "tool_usage": st.one_of(st.none(), shaped({"web_search": st.one_of(st.none(), shaped({"num_requests": COUNT}))})),
        "prompt_cache_diagnostics": st.one_of(st.none(), shaped({"type": st.one_of(st.none(), STR), "reason": st.one_of(st.none(), STR), "cache_missed_tokens": COUNT})),
    })
    event = shaped({"type": st.one_of(KINDS, KINDS, st.none()), "response": st.one_of(response, response, st.none()), "sequence_number": INTS, "error": anything, "code": STR})
    chat_usage = shaped({
        "prompt_tokens": COUNT, "completion_tokens": COUNT, "total_tokens": COUNT,
        "prompt_tokens_details": st.one_of(st.none(), shaped({"cached_tokens": COUNT, "cache_write_tokens": COUNT})),
        "completion_tokens_details": st.one_of(st.none(), shaped({"reasoning_tokens": COUNT})),
    })
    chat = shaped({
        "id": STR, "model": STR, "service_tier": STR, "object": st.one_of(st.just("chat.completion"), anything),
        "error": st.one_of(st.none(), shaped({"type": st.one_of(st.none(), STR), "code": st.one_of(st.none(), STR, INTS)})),
        "usage": st.one_of(st.none(), chat_usage), "choices": anything, "data": st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=4),
    })
    return response, event, chat


CLEAN_RESPONSE, CLEAN_EVENT, CLEAN_CHAT = documents(mixed=False)
MIXED_RESPONSE, MIXED_EVENT, MIXED_CHAT = documents(mixed=True)
RESPONSE = st.one_of(CLEAN_RESPONSE, MIXED_RESPONSE)
EVENT = st.one_of(CLEAN_EVENT, MIXED_EVENT)
CHAT = st.one_of(CLEAN_CHAT, MIXED_CHAT)


def mutate(data: bytes, seed: int) -> bytes:
    """Hostile bytes: a byte replaced, dropped or inserted, invalid UTF-8, a BOM, trailing
    bytes, odd whitespace, deep nesting."""
    rnd = random.Random(seed)
    out = bytearray(data)
    for _ in range(rnd.randint(1, 3)):
        what = rnd.randrange(9)
        at = rnd.randint(0, len(out))
        if what == 0 and out:
            out[min(at, len(out) - 1)] = rnd.randrange(256)
        elif what == 1 and out:
            del out[min(at, len(out) - 1)]
        elif what == 2:
            out[at:at] = bytes([rnd.choice([0x80, 0xC0, 0xED, 0xF4, 0xFF, 0x00, 0x1F, 0x7F, 0x22, 0x5C])])
        elif what == 3:
            out[at:at] = rnd.choice([b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80", b"\\ud800", b"\\u0000", b"\xe2\x82\xac"])
        elif what == 4:
            out[0:0] = b"\xef\xbb\xbf"
        elif what == 5:
            out += rnd.choice([b" x", b"}", b"\x00", b" \n\t\r", b"{}", b","])
        elif what == 6:
            out[at:at] = rnd.choice([b" ", b"\t", b"\f", b"\v", b"\r\n"])
        elif what == 7:
            i = out.find(b'"usage":')
            depth = rnd.choice([500, 1000, 1023, 1024, 1025, 3000])
            nest = b"[" * depth + b"]" * depth
            if i >= 0:
                out[i + 8 : i + 8] = nest + b","  # a value first, then a comma: still an object member
                out[i : i + 8] = b'"deep":' if rnd.random() < 0.5 else out[i : i + 8]
            else:
                out[0:0] = b'{"deep":' + nest + b"}" if not out else b""
        else:
            out = bytearray(rnd.choice([b"[]", b'"x"', b"null", b"1", b"", b" ", b"[{}]"])) if rnd.random() < 0.3 else out
    return bytes(out)


def general_body(kind: str, body: bytes) -> Observation:
    with mock.patch.object(objects, "decode_body", lambda _data: None), mock.patch.object(objects, "decode_chat_body", lambda _data: None):
        return observe_json_body(kind, body)


def general_event(data: bytes) -> tuple[Observation, bool]:
    """What the SSE observer's general reading makes of one event (orjson, then json)."""
    obs = Observation()
    try:
        obj = loads(data)
    except DecodeError:
        obs.unreadable = "invalid JSON in an SSE event"
        return obs, False
    if not isinstance(obj, dict):
        return obs, False
    kind = obj.get("type")
    return obs, isinstance(kind, str) and observe_event(obs, kind, obj)


def check_body(body: bytes) -> None:
    assert observe_json_body("responses", body) == general_body("responses", body)
    assert observe_json_body("chat", body) == general_body("chat", body)


def check_event(data: bytes) -> None:
    obs = Observation()
    done = observe_usual_event(obs, data)
    if done is not None:
        assert (obs, done) == general_event(data)


# --- explicit cases


HOSTILE = [
    b'{"id":"a","id":"b"}', b'{"usage":{"input_tokens":1},"usage":null}', b'{"usage":{"input_tokens":1,"input_tokens":2}}',
    b'[]', b'"x"', b'null', b'1', b'', b' ', b'{"x":"\xff","usage":{"input_tokens":1}}', b'{"id":"\xff"}', b'{"\xff":1,"id":"a"}',
    b'{"x":"\\ud800","id":"a"}', b'{"id":"\\ud800"}', b'{"x":"\xed\xa0\x80","id":"a"}', b'{"x":"\xc0\x80","id":"a"}',
    b'{"usage":{"input_tokens":9223372036854775807}}', b'{"usage":{"input_tokens":9223372036854775808}}',
    b'{"usage":{"input_tokens":18446744073709551616}}', b'{"usage":{"input_tokens":-9223372036854775809}}',
    b'{"usage":{"input_tokens":99999999999999999999999999}}', b'{"x":99999999999999999999999,"id":"a"}',
    b'{"usage":{"input_tokens":NaN}}', b'{"x":Infinity,"id":"a"}', b'{"x":1e400,"id":"a"}', b'{"id":"a"} x', b'{"id":"a"}\x00',
    b'\xef\xbb\xbf{"id":"a"}', b' \t\r\n{"id":"a"} \t\r\n', b'\x0c{"id":"a"}', b'{"usage":{"input_tokens":true}}',
    b'{"usage":{"input_tokens":25.0}}', b'{"error":{"type":"server_error","code":null}}', b'{"error":{"code":502}}',
    b'{"error":{"type":"x"},"object":"response","status":"failed"}', b'{"error":"x"}', b'{"\\u0069d":"resp_\\u00e9"}',
    b'{"id":"caf\xc3\xa9","model":"\xe2\x82\xac"}', b'{"prompt_cache_diagnostics":{"type":"cache_miss","reason":"","cache_missed_tokens":3},"usage":{}}',
    b'{"tool_usage":{"web_search":{"num_requests":2}},"usage":{"input_tokens":1}}', b'{"background":false,"background":null}',
    BENCH_BODY,
] + [b'{"x":' + b"[" * n + b"]" * n + b',"id":"a"}' for n in (500, 1000, 1023, 1024, 1025, 5000)]


def test_hostile_bodies_read_as_before() -> None:
    for body in HOSTILE:
        check_body(body)
        check_body(b'{"type":"response.completed","response":' + body + b"}")
        check_event(b'{"type":"response.completed","response":' + body + b"}")
        check_event(b'{"type":"response.created","response":' + body + b"}")
        check_event(body)


def test_the_usual_answers_take_the_msgspec_reading() -> None:
    assert decode_body(BENCH_BODY) is not None
    assert decode_body(BENCH_BODY.replace(b"Hello", "H\u00e9llo".encode())) is not None  # valid UTF-8 too
    event = b'{"type":"response.completed","response":' + BENCH_BODY + b',"sequence_number":3}'
    assert decode_event(event) is not None
    obs = Observation()
    assert observe_usual_event(obs, event) is True
    assert obs.usage is not None and obs.usage.total_tokens == 34 and obs.service_tier == "default"
    for refused in (b'{"usage":{"input_tokens":1.0}}', b'{"x":"\xff"}', b'{"x":"\\ud800"}', b"[]"):
        assert decode_body(refused) is None
    assert observe_usual_event(Observation(), b'{"type":"error","error":{"type":"x"}}') is None  # read the general way
    chat = (b'{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"content":"hi"}}],'
            b'"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens":2,"total_tokens":5}}')
    assert decode_chat_body(chat) is not None
    assert observe_json_body("chat", chat).usage.total_tokens == 5  # type: ignore[union-attr]


# --- generated


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=RESPONSE, ascii_only=st.booleans())
@example(doc=Obj([("usage", Obj([("input_tokens", 2**63)]))]), ascii_only=True)
def test_generated_bodies_read_as_before(doc: Obj, ascii_only: bool) -> None:
    check_body(encode(doc, ascii_only).encode("utf-8", "surrogatepass"))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=CHAT, ascii_only=st.booleans(), seed=st.integers(0, 2**32), hostile=st.booleans())
def test_generated_chat_bodies_read_as_before(doc: Obj, ascii_only: bool, seed: int, hostile: bool) -> None:
    data = encode(doc, ascii_only).encode("utf-8", "surrogatepass")
    check_body(mutate(data, seed) if hostile else data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=RESPONSE, ascii_only=st.booleans(), seed=st.integers(0, 2**32))
def test_hostile_bodies_generated_read_as_before(doc: Obj, ascii_only: bool, seed: int) -> None:
    check_body(mutate(encode(doc, ascii_only).encode("utf-8", "surrogatepass"), seed))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=EVENT, ascii_only=st.booleans(), seed=st.integers(0, 2**32), hostile=st.booleans())
def test_generated_events_read_as_before(doc: Obj, ascii_only: bool, seed: int, hostile: bool) -> None:
    data = encode(doc, ascii_only).encode("utf-8", "surrogatepass")
    check_event(mutate(data, seed) if hostile else data)


def observe_stream(events: list[bytes], general: bool) -> Observation:
    general_reading = mock.patch.object(responses, "decode_event_shape", lambda _data: None)
    with general_reading if general else contextlib.nullcontext():
        observer = SSEObserver("responses", clock=lambda: 1.0)
        for event in events:
            observer.feed(event)
        return observer.finish()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(st.tuples(KINDS, EVENT, st.booleans(), st.integers(0, 2**32)), min_size=1, max_size=4), ascii_only=st.booleans())
def test_generated_streams_read_as_before(docs: list[tuple[str, Obj, bool, int]], ascii_only: bool) -> None:
    events = []
    for kind, doc, hostile, seed in docs:
        data = encode(doc, ascii_only).encode("utf-8", "surrogatepass")
        if hostile:
            data = mutate(data, seed).replace(b"\n", b" ")
        events.append(b"event: %s\ndata: %s\n\n" % (kind.encode(), data))
    assert observe_stream(events, general=False) == observe_stream(events, general=True)


NUMBER = st.one_of(INTS, INTS, st.none(), RAWS, st.booleans(), st.floats(allow_nan=False, allow_infinity=False))


@settings(max_examples=600, deadline=None)
@given(
    counts=st.fixed_dictionaries({k: NUMBER for k in ("i", "c", "w", "o", "r", "t", "n", "m")}),
    code=st.one_of(st.none(), STR, INTS), kind=st.sampled_from(["cache_hit", "cache_miss", "other"]), reason=st.one_of(st.none(), STR, INTS),
)
def test_generated_counts_read_as_before(counts: dict[str, object], code: object, kind: str, reason: object) -> None:
    """The bench's answer with every number meter reads drawn from ints of every size and the other numbers."""
    n = {k: encode(v, True) for k, v in counts.items()}
    usage = (
        f'{{"input_tokens":{n["i"]},"input_tokens_details":{{"cached_tokens":{n["c"]},"cache_write_tokens":{n["w"]}}},'
        f'"output_tokens":{n["o"]},"output_tokens_details":{{"reasoning_tokens":{n["r"]}}},"total_tokens":{n["t"]}}}'
    )
    extra = (
        f'"tool_usage":{{"web_search":{{"num_requests":{n["n"]}}}}},'
        f'"prompt_cache_diagnostics":{{"type":"{kind}","reason":{encode(reason, True)},"cache_missed_tokens":{n["m"]}}},'
        f'"error":{{"type":"server_error","code":{encode(code, True)}}}'
    )
    body = BENCH_BODY[:-1] + b"," + extra.encode() + b"}"
    body = body.replace(body[body.index(b'"usage": {') + 9 : body.index(b"}}", body.index(b'"usage": {')) + 2], usage.encode())
    check_body(body)
    check_body(body.replace(b'"object": "response", ', b""))
    event = b'{"type":"response.completed","response":' + body + b"}"
    check_event(event)
    assert decode_event(b'{"type":"response.completed","response":' + BENCH_BODY + b"}") is not None


@settings(max_examples=400, deadline=None)
@given(counts=st.fixed_dictionaries({k: NUMBER for k in ("i", "c", "w", "o", "r", "t")}), code=st.one_of(st.none(), STR, INTS))
def test_generated_chat_counts_read_as_before(counts: dict[str, object], code: object) -> None:
    """A completion with every number meter reads drawn from ints of every size and the other numbers."""
    n = {k: encode(v, True) for k, v in counts.items()}
    body = (
        f'{{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{{"index":0,"message":{{"content":"hi"}}}}],'
        f'"usage":{{"prompt_tokens":{n["i"]},"prompt_tokens_details":{{"cached_tokens":{n["c"]},"cache_write_tokens":{n["w"]}}},'
        f'"completion_tokens":{n["o"]},"completion_tokens_details":{{"reasoning_tokens":{n["r"]}}},"total_tokens":{n["t"]}}},'
        f'"service_tier":"default","error":{{"type":"x","code":{encode(code, True)}}}}}'
    ).encode()
    check_body(body)
    check_body(body.replace(b'"object":"chat.completion",', b""))


# --- the WebSocket's response events (meter/observe/socket.py) ----------------------

_TIMES = ("id", "started_at", "finished_at", "ttfb_ms", "ttft_ms", "duration_ms")


def socket_records(messages: list[bytes], general: bool) -> list[dict[str, object]]:
    """The records a socket's metering makes of `messages` from the upstream, read the
    msgspec way where it can, or (`general`) always with orjson's dicts."""
    from meter.flow import Addons, Flow
    from meter.identity import KeyIdentities
    from meter.observe import socket
    from meter.websocket import WebSocketRelay

    class Records:
        def __init__(self) -> None:
            self.made: list[dict[str, object]] = []

        def done(self, flow: object, record: object) -> None:
            row = dataclasses.asdict(record)  # type: ignore[call-overload]
            self.made.append({k: v for k, v in row.items() if k not in _TIMES})

    sink = Records()
    relay = WebSocketRelay("http://upstream.invalid", None, Addons([sink]), KeyIdentities())  # type: ignore[arg-type]
    template = Flow(method="GET", path="/v1/responses", endpoint="responses", headers={}, transport="websocket")
    general_reading = mock.patch.object(socket, "decode_event_shape", lambda _data: None)
    with general_reading if general else contextlib.nullcontext():
        meter = socket.SocketMeter(relay, template, None, None)
        for message in messages:
            meter.on_upstream(message)
        meter.end("completed")
    return sink.made


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs=st.lists(st.tuples(KINDS, st.one_of(st.none(), st.sampled_from(["a", "b"]), SCALARS), EVENT, st.booleans(), st.integers(0, 2**32)), min_size=1, max_size=5),
    ascii_only=st.booleans(),
)
def test_generated_socket_messages_read_as_before(docs: list[tuple[str, object, Obj, bool, int]], ascii_only: bool) -> None:
    messages = []
    for kind, lane, doc, hostile, seed in docs:
        # The type first, as the API writes it, so that the socket's cheap reading of it
        # sends the message on to the decoding; a lane of any type, and the event's own
        # members (a second `type` among them, sometimes) after it.
        members = [("type", kind), *([("stream_id", lane)] if lane is not None else []), *doc]
        data = encode(Obj(members), ascii_only).encode("utf-8", "surrogatepass")
        messages.append(mutate(data, seed) if hostile else data)
    assert socket_records(messages, general=False) == socket_records(messages, general=True)


def test_the_usual_socket_events_take_the_msgspec_reading() -> None:
    from meter.observe import socket

    seen: list[bytes] = []
    real = socket.decode_event_shape

    def counting(data: bytes) -> object:
        seen.append(data)
        return real(data)

    created = b'{"type":"response.created","stream_id":"a","response":{"id":"resp_1","object":"response","status":"in_progress","model":"gpt-4o"}}'
    completed = (b'{"type":"response.completed","stream_id":"a","response":{"id":"resp_1","object":"response","status":"completed","model":"gpt-4o",'
                 b'"usage":{"input_tokens":3,"output_tokens":2,"total_tokens":5}}}')
    with mock.patch.object(socket, "decode_event_shape", counting):
        [row] = socket_records([created, completed], general=False)
    assert seen == [created, completed]
    assert (row["response_id"], row["input_tokens"], row["total_tokens"], row["outcome"]) == ("resp_1", 3, 5, "completed")
