"""A request body's facts read by msgspec (`shapes.RequestBody`) against the general reading.

`request_facts` reads the usual body into just the members it takes, and any
other body the general way (orjson's dicts, else json's).  Whenever the msgspec
lane gives facts, they must be exactly the general reading's: checked on
explicit hostile bodies and on generated ones (odd types, repeated keys, bytes
mutated).  And the usual bodies must take that lane, or it saves nothing.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.observe import request_facts
from meter.observe.facts import _facts_from_shape, request_facts_generally
from meter.observe.shapes import decode_request

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
MEMBER = st.sampled_from(sorted(FIELDS)).flatmap(lambda k: st.tuples(st.just(k), st.one_of(FIELDS[k], FIELDS[k], FIELDS[k], anything)))
REQUEST = st.lists(st.one_of(MEMBER, MEMBER, MEMBER, st.tuples(st.text(max_size=6), anything)), max_size=14).map(Obj)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=REQUEST, ascii_only=st.booleans(), seed=st.integers(0, 2**32), hostile=st.booleans())
def test_generated_requests_read_as_before(doc: Obj, ascii_only: bool, seed: int, hostile: bool) -> None:
    body = encode(doc, ascii_only).encode("utf-8", "surrogatepass")
    check(mutate(body, seed) if hostile else body)
