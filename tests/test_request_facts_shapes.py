"""A request body's facts read by msgspec (`shapes.RequestBody`) against the general reading.

`request_facts` reads the usual body into just the members it takes, and any
other body the general way (orjson's dicts, else json's); so does `read_create`
with a WebSocket `response.create` (flat or nested, with its lane).  Whenever the msgspec
lane gives facts, they must be exactly the general reading's: checked on
explicit hostile bodies and on generated ones (odd types, repeated keys, bytes
mutated).  And the usual bodies must take that lane, or it saves nothing.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.observe import request_facts
from meter.observe.facts import _facts_from_shape, facts_from_create, request_facts_generally
from meter.observe.shapes import decode_create, decode_request
from meter.observe.socket import read_create, read_create_generally

from .test_observe_shapes import INTS, SCALARS, STR, Obj, encode, mutate

INPUT = [{"role": "user", "content": [{"type": "input_text", "text": "Say hello. " * 40}]}] * 8

USUAL = [
    {"model": "gpt-4o", "input": "hi"},
    {"model": "gpt-4o", "input": INPUT, "stream": True, "tools": [{"type": "web_search"}], "instructions": "Be brief."},
    {"model": "gpt-4o", "input": INPUT, "metadata": {"team": "search", "n": 3, "ünï": "✓"}, "user": "u-1", "service_tier": "flex"},
    {"model": "o3", "input": "x", "conversation": {"id": "conv_1"}, "background": True, "prompt_cache_key": "k", "safety_identifier": "s"},
    {"model": "o3", "input": "x", "conversation": "conv_2", "previous_response_id": "resp_1", "generate": False, "metadata": {}},
    {"model": "o3", "input": "x", "metadata": None, "conversation": None, "stream": None, "user": None},
]


def check(body: bytes) -> None:
    assert request_facts(body) == request_facts_generally(body)


def test_the_usual_requests_take_the_msgspec_reading() -> None:
    for obj in USUAL:
        body = json.dumps(obj, ensure_ascii=False).encode()
        shape = decode_request(body)
        assert shape is not None, body
        assert _facts_from_shape(shape) is not None, body  # conversation and metadata read from their raw text too
        check(body)


HOSTILE = [
    b'{"model":"a","model":"b"}', b'{"model":"a","model":1}', b'{"model":1,"model":"a"}', b'{"model":null}', b'{"model":""}',
    b'{"stream":"true"}', b'{"stream":1}', b'{"stream":true,"stream":false}', b'{"background":null}', b'{"generate":0}',
    b'{"generate":false}', b'{"generate":null}', b'{"safety_identifier":"","user":"u"}', b'{"safety_identifier":"","user":""}',
    b'{"safety_identifier":5,"user":"u"}', b'{"safety_identifier":"s","user":5}', b'{"conversation":5}', b'{"conversation":""}',
    b'{"conversation":{"id":5}}', b'{"conversation":{"id":""}}', b'{"conversation":{"id":"c"},"conversation":null}', b'{"conversation":[]}',
    b'{"metadata":[1]}', b'{"metadata":"x"}', b'{"metadata":{"a":1},"metadata":null}', b'{"metadata":{"a":99999999999999999999999}}',
    b'{"metadata":{"a":"\\ud800"}}', b'{"metadata":{"\\ud800":"a"}}', b'{"conversation":{"id":"\\udc00x"}}', b'{"input":"\\ud800","model":"m"}',
    b'{"metadata":{"a":1e400}}', b'{"metadata":{"a":NaN}}', b'{"input":[1e400],"model":"m"}', b'{"input":99999999999999999999999,"model":"m"}',
    b'{"model":"\xff"}', b'{"input":"\xff","model":"m"}', b'{"model":"caf\xc3\xa9"}', b'{"mo\\u0064el":"m","stre\\u0061m":true}',
    b'[]', b'"x"', b'null', b'1', b'', b' ', b'{}', b'{"model":"m"} x', b'{"model":"m"}\x00', b'\xef\xbb\xbf{"model":"m"}',
    b' \t\r\n{"model":"m"} \t\r\n', b'\x0c{"model":"m"}', b'{"model":"m",}', b'{"model":"m"',
] + [b'{"input":' + b"[" * n + b"]" * n + b',"model":"m","metadata":{"a":1}}' for n in (254, 255, 500, 1000, 1023, 1024, 1025, 5000)] + [
    b'{"model":"m","metadata":{"deep":' + b'{"d":' * n + b"1" + b"}" * n + b"}}" for n in (200, 600, 1023, 1024, 1100)
]


def test_hostile_requests_read_as_before() -> None:
    for body in HOSTILE:
        check(body)


anything = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.lists(st.tuples(st.text(max_size=6), inner), max_size=5).map(Obj)), max_leaves=10)
FIELDS: dict[str, st.SearchStrategy[object]] = {
    "model": STR, "stream": st.one_of(st.booleans(), st.none()), "background": st.one_of(st.booleans(), st.none()),
    "service_tier": STR, "safety_identifier": STR, "user": STR, "prompt_cache_key": STR, "previous_response_id": STR,
    "conversation": st.one_of(STR, st.none(), st.lists(st.tuples(st.sampled_from(["id", "x"]), st.one_of(STR, INTS)), max_size=2).map(Obj)),
    "generate": st.one_of(st.booleans(), st.none()),
    "metadata": st.one_of(st.none(), st.lists(st.tuples(st.text(max_size=70), anything), max_size=20).map(Obj)),
    "input": anything,
}
# Each member's strategy made once, not anew on every draw (test_observe_shapes.documents says why).
MEMBERS = {k: st.tuples(st.just(k), st.one_of(v, v, v, anything)) for k, v in FIELDS.items()}
MEMBER = st.sampled_from(sorted(FIELDS)).flatmap(MEMBERS.__getitem__)
REQUEST = st.lists(st.one_of(MEMBER, MEMBER, MEMBER, st.tuples(st.text(max_size=6), anything)), max_size=14).map(Obj)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=REQUEST, ascii_only=st.booleans(), seed=st.integers(0, 2**32), hostile=st.booleans())
def test_generated_requests_read_as_before(doc: Obj, ascii_only: bool, seed: int, hostile: bool) -> None:
    body = encode(doc, ascii_only).encode("utf-8", "surrogatepass")
    check(mutate(body, seed) if hostile else body)


# --- WebSocket `response.create` messages: facts and lane


def check_create(message: bytes) -> None:
    assert read_create(message) == read_create_generally(message)


def test_the_usual_create_messages_take_the_msgspec_reading() -> None:
    for obj in USUAL:
        for message in ({"type": "response.create", **obj}, {"type": "response.create", "stream_id": "lane-1", "response": obj},
                        {"type": "response.create", "model": "top", "metadata": {"t": "top"}, "response": obj}):
            data = json.dumps(message, ensure_ascii=False).encode()
            shape = decode_create(data)
            assert shape is not None, data
            assert facts_from_create(shape) is not None, data
            check_create(data)
    nested = json.dumps({"type": "response.create", "stream_id": "a", "model": "top", "user": "u", "response": {"model": None, "input": INPUT}}).encode()
    read = read_create(nested)
    assert read is not None and read[1] == "a" and read[0].model is None and read[0].user_id == "u"  # nested over top, absent from top


CREATE_HOSTILE = [
    b'{"type":"response.create"}', b'{"type":"response.cancel","model":"m"}', b'{"type":1}', b'{"model":"m"}', b'{"type":null}',
    b'{"type":"response.create","stream_id":5}', b'{"type":"response.create","stream_id":null}', b'{"type":"response.create","stream_id":"s"}',
    b'{"type":"response.create","response":"x"}', b'{"type":"response.create","response":[1]}', b'{"type":"response.create","response":null,"model":"m"}',
    b'{"type":"response.create","response":{"model":"n"},"response":null,"model":"m"}', b'{"type":"response.create","response":{},"model":"m"}',
    b'{"type":"response.create","response":{"metadata":null},"metadata":{"a":1}}', b'{"type":"response.create","response":{"conversation":"c"},"conversation":"d"}',
    b'{"type":"response.create","response":{"stream_id":"in"},"stream_id":"out"}', b'{"type":"response.create","response":{"type":"x","model":1}}',
    b'{"type":"response.create","type":"response.cancel"}', b'{"type":"response.cancel","type":"response.create","model":"m"}',
    b'{"type":"response.create","model":"\\ud800"}', b'{"type":"response.create","input":"\\ud800","model":"m"}', b'{"type":"response.create","model":"\xff"}',
    b'{"type":"response.create","response":{"input":' + b"[" * 2000 + b"]" * 2000 + b'}}', b'[]', b'null', b'"response.create"', b'',
]


def test_hostile_create_messages_read_as_before() -> None:
    for message in CREATE_HOSTILE + HOSTILE:
        check_create(message)


NESTED = st.lists(st.one_of(MEMBER, MEMBER, st.tuples(st.text(max_size=6), anything)), max_size=8).map(Obj)
TOP = st.one_of(
    st.tuples(st.just("type"), st.one_of(st.just("response.create"), st.just("response.create"), st.just("response.cancel"), SCALARS)),
    st.tuples(st.just("stream_id"), st.one_of(STR, STR, SCALARS)),
    st.tuples(st.just("response"), st.one_of(NESTED, NESTED, NESTED, anything)),
    MEMBER,
)
CREATE = st.tuples(st.booleans(), st.lists(st.one_of(TOP, TOP, st.tuples(st.text(max_size=6), anything)), max_size=12)).map(
    lambda parts: Obj(([("type", "response.create")] if parts[0] else []) + parts[1])
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=CREATE, ascii_only=st.booleans(), seed=st.integers(0, 2**32), hostile=st.booleans())
def test_generated_create_messages_read_as_before(doc: Obj, ascii_only: bool, seed: int, hostile: bool) -> None:
    message = encode(doc, ascii_only).encode("utf-8", "surrogatepass")
    check_create(mutate(message, seed) if hostile else message)
