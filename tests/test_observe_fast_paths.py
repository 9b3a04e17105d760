"""The observer's shortcuts read exactly what its line parser reads.

The SSE observer skips a whole delta chunk by its fixed head and line ends,
reads a usual event (name line, one `data: ` line) without the line parser,
and ends events by one-byte searches; `endpoint_for` looks the usual paths up
in a table; a JSON body goes to orjson directly.  Each test here pins an edge
of one shortcut: the same stream fed whole, event by event and byte by byte
(which takes the line parser) must read the same, and what a shortcut skips
must be only what the line parser would have skipped.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import itertools
import json
import py_compile
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.observe import SSEObserver, endpoint_for, observe_json_body
from meter.observe.endpoints import _USUAL, _classify
from meter.observe.responses import DELTA_LINES, TEXT_DELTA_LINE

USAGE = {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 1}, "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 8}


def event(name: str | None, data: dict | str, eol: str = "\n") -> bytes:
    """One SSE event: an optional name line, one data line, a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {name}{eol}" if name is not None else ""
    return f"{head}data: {text}{eol}{eol}".encode()


def created() -> bytes:
    return event("response.created", {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-4o", "status": "in_progress", "service_tier": "auto"}})


def delta(text: str = "tok", kind: str = "response.output_text.delta", eol: str = "\n") -> bytes:
    return event(kind, {"type": kind, "item_id": "msg_1", "delta": text}, eol)


def completed(eol: str = "\n", name: str | None = "response.completed") -> bytes:
    response = {"id": "resp_1", "model": "gpt-4o-2024-08-06", "status": "completed", "service_tier": "default", "usage": USAGE}
    return event(name, {"type": "response.completed", "response": response}, eol)


class Ticks:
    """A clock that says how many chunks were fed before it was read."""

    def __init__(self) -> None:
        self.fed = 0

    def __call__(self) -> float:
        return float(self.fed)


def read(chunks: Iterable[bytes], kind: str = "responses") -> tuple[SSEObserver, Ticks]:
    ticks = Ticks()
    observer = SSEObserver(kind, clock=ticks)
    for chunk in chunks:
        ticks.fed += 1
        observer.feed(chunk)
    return observer, ticks


def seen(chunks: list[bytes], kind: str = "responses") -> dict:
    """What is read of a stream, the first token's time left out (it depends on the chunking)."""
    observer, _ = read(chunks, kind)
    obs = dataclasses.asdict(observer.finish())
    obs.pop("first_token_at")
    return obs


def same_every_way(chunks: list[bytes], kind: str = "responses") -> dict:
    """Fed as given, whole, and byte by byte (the line parser): the same observation."""
    whole = b"".join(chunks)
    as_given = seen(chunks, kind)
    assert seen([whole], kind) == as_given
    assert seen([whole[i : i + 1] for i in range(len(whole))], kind) == as_given
    return as_given


def test_a_usual_stream_reads_identity_usage_and_the_first_token_at_its_first_delta() -> None:
    observer, _ = read([created(), delta(), delta(), completed()])
    obs = observer.finish()
    assert (obs.response_id, obs.model, obs.service_tier, obs.status, obs.terminal) == ("resp_1", "gpt-4o-2024-08-06", "default", "completed", True)
    assert obs.usage is not None and (obs.usage.input_tokens, obs.usage.cached_tokens, obs.usage.total_tokens) == (5, 1, 8)
    assert obs.first_token_at == 2.0  # the second chunk: the first delta
    same_every_way([created(), delta(), delta(), completed()])


def test_the_first_delta_in_its_own_chunk_notes_the_first_token() -> None:
    # No created event: the very first chunk is a delta, before the first token is noted.
    observer, _ = read([delta(), delta(), completed()])
    assert observer.finish().first_token_at == 1.0


def test_a_delta_split_in_the_middle_notes_the_first_token_once_its_name_is_read() -> None:
    one = delta()
    half = len(TEXT_DELTA_LINE) // 2
    for cut in (half, len(TEXT_DELTA_LINE) - 1, len(TEXT_DELTA_LINE), len(one) - 2, len(one) - 1):
        observer, _ = read([created(), one[:cut], one[cut:], delta(), completed()])
        obs = observer.finish()
        assert obs.first_token_at == (2.0 if cut >= len(TEXT_DELTA_LINE) else 3.0), cut
        assert obs.usage is not None and obs.usage.total_tokens == 8
        same_every_way([created(), one[:cut], one[cut:], delta(), completed()])


def test_a_delta_and_the_terminal_event_in_one_chunk_both_count() -> None:
    # The delta's head matches, but the chunk holds more than the delta: usage is read.
    for chunks in ([created(), delta() + completed()], [created(), delta() + delta() + completed()], [created() + delta(), completed()]):
        obs = same_every_way(chunks)
        assert obs["usage"]["total_tokens"] == 8 and obs["terminal"] is True


def test_a_delta_head_with_a_blank_line_before_its_data_ends_there() -> None:
    # `event: ...delta` then a blank line ends the (empty) delta; the data after it is an
    # event of its own, here the terminal one without a name line: it must be read.
    chunk = TEXT_DELTA_LINE + b"\n" + completed(name=None)
    obs = same_every_way([created(), chunk])
    assert obs["usage"]["total_tokens"] == 8
    # And a delta head ended by a lone blank line changes nothing but the first token.
    observer, _ = read([created(), TEXT_DELTA_LINE + b"\n", TEXT_DELTA_LINE + b"\n\n", completed()])
    assert observer.finish().first_token_at == 2.0


def test_a_delta_whose_data_says_otherwise_is_a_delta_by_its_name() -> None:
    # Event names decide over SSE: a delta's data is never decoded, whatever it says.
    disguised = event("response.output_text.delta", json.loads(completed().split(b"data: ")[1]))
    for chunks in ([created(), delta(), disguised], [created(), disguised], [created(), delta() + disguised]):
        obs = same_every_way(chunks)
        assert obs["usage"] is None and obs["terminal"] is False and obs["unmetered"] == "no_terminal_event"


def test_an_event_named_otherwise_whose_data_is_a_delta_is_read_by_its_data() -> None:
    # A decoded event's meaning comes from its data's type: a `response.completed` event
    # whose data is a delta ends nothing and counts no usage.
    odd = event("response.completed", {"type": "response.output_text.delta", "delta": "x"})
    obs = same_every_way([created(), odd])
    assert obs["usage"] is None and obs["terminal"] is False


def test_crlf_framing_takes_the_line_parser_and_reads_the_same() -> None:
    chunks = [created(), delta(eol="\r\n"), delta(eol="\r\n"), completed(eol="\r\n")]
    observer, _ = read(chunks)
    obs = observer.finish()
    assert obs.first_token_at == 2.0 and obs.usage is not None and obs.usage.total_tokens == 8
    same_every_way(chunks)
    # CRLF lines ended by a bare LF blank line, and a CR left at the end of the data line.
    mixed = TEXT_DELTA_LINE.replace(b"\n", b"\r\n") + b'data: {"type":"response.output_text.delta","delta":"x"}\r\n\n'
    assert same_every_way([created(), mixed, completed()])["usage"]["total_tokens"] == 8
    cr_data = completed().replace(b"}\n\n", b"}\r\n\n")
    assert same_every_way([created(), delta(), cr_data])["usage"]["total_tokens"] == 8


def test_every_known_delta_head_and_an_unknown_delta_are_skipped_alike() -> None:
    names = [line[len(b"event: ") : -1].decode() for line in DELTA_LINES] + ["response.something_new.delta"]
    for name in names:
        observer, _ = read([created(), delta(kind=name), delta(kind=name), completed()])
        obs = observer.finish()
        assert obs.first_token_at == 2.0 and obs.usage is not None and obs.usage.total_tokens == 8, name
        same_every_way([created(), delta(kind=name), completed()])


def test_a_delta_after_a_done_event_says_the_output_is_not_done() -> None:
    done = event("response.output_text.done", {"type": "response.output_text.done", "text": "tok"})
    observer, _ = read([created(), delta(), done])
    assert observer.output_done is True
    observer.feed(delta())
    assert observer.output_done is False
    observer.feed(done)
    assert observer.output_done is True
    observer.feed(delta(kind="response.reasoning_summary_text.delta"))
    assert observer.output_done is False


def test_deltas_with_more_lines_or_fields_are_read_by_the_walk() -> None:
    extra = [
        TEXT_DELTA_LINE + b"id: 7\ndata: {}\n\n",  # a field before the data line
        TEXT_DELTA_LINE + b"data: {}\ndata: {}\n\n",  # two data lines
        TEXT_DELTA_LINE + b": a comment\ndata: {}\n\n",
        TEXT_DELTA_LINE + b"data: {}\n\n" + b": keep-alive\n\n",
    ]
    for chunk in extra:
        observer, _ = read([created(), chunk, completed()])
        obs = observer.finish()
        assert obs.first_token_at == 2.0 and obs.usage is not None and obs.usage.total_tokens == 8, chunk
        same_every_way([created(), chunk, completed()])


def test_an_event_without_a_name_line_is_read_by_its_data() -> None:
    chunks = [event(None, {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-4o"}}),
              event(None, {"type": "response.output_text.delta", "delta": "x"}), completed(name=None)]
    observer, _ = read(chunks)
    obs = observer.finish()
    assert obs.first_token_at == 2.0 and obs.usage is not None and obs.usage.total_tokens == 8
    same_every_way(chunks)


def test_unusual_shapes_of_a_decoded_event_read_the_same() -> None:
    body = completed().split(b"data: ")[1][:-2]
    shapes = [
        b"event: response.completed\ndata:" + body + b"\n\n",  # no space after the colon
        b"event:response.completed\ndata: " + body + b"\n\n",
        b"event: response.completed\nid: 9\ndata: " + body + b"\n\n",
        b"event: response.completed\ndata: " + body[:40] + b"\ndata: " + body[40:] + b"\n\n",  # split over two data lines
    ]
    for shape in shapes:
        obs = same_every_way([created(), delta(), shape])
        assert obs["usage"]["total_tokens"] == 8, shape
    garbage = b"event: response.completed\ndata: {not json\n\n"
    assert same_every_way([created(), garbage])["unreadable"] == "invalid JSON in an SSE event"
    surrogate = completed().replace(b'"gpt-4o-2024-08-06"', b'"gpt\\ud800"')  # orjson refuses it; json reads it
    assert same_every_way([created(), surrogate])["usage"]["total_tokens"] == 8


def test_nothing_is_read_after_the_terminal_event() -> None:
    observer, _ = read([created(), delta(), completed()])
    assert observer.done
    observer.feed(delta())
    observer.feed(event("error", {"type": "error", "error": {"type": "server_error", "code": "x"}}))
    obs = observer.finish()
    assert obs.error_type is None and obs.status == "completed"


def test_a_cut_observer_reads_no_more() -> None:
    observer, _ = read([created(), delta()])
    observer.cut()
    observer.feed(delta())
    observer.feed(completed())
    assert observer.finish().usage is None


def test_chat_chunks_read_the_same_every_way() -> None:
    def chunk(obj: dict | str) -> bytes:
        return event(None, obj)

    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o"}
    chunks = [chunk({**base, "choices": [{"delta": {"role": "assistant"}}]}), chunk({**base, "choices": [{"delta": {"content": "hi"}}]}),
              chunk({**base, "choices": [{"delta": {"content": "!"}}], "usage": None}),
              chunk({**base, "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}), chunk("[DONE]")]
    observer, _ = read(chunks, "chat")
    obs = observer.finish()
    assert obs.first_token_at == 2.0 and obs.usage is not None and obs.usage.total_tokens == 6 and obs.terminal
    assert same_every_way(chunks, "chat")["usage"]["total_tokens"] == 6


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PUT"])
def test_the_usual_paths_table_agrees_with_the_classifier(method: str) -> None:
    for path, endpoint in _USUAL.items():
        assert endpoint_for(method, path) == endpoint == _classify(method, path)
    for path in ("/v1/responses/resp_1", "/v1/responses/resp_1/cancel", "/v1/responses?x=1", "/deployments/x/chat/completions", "/", ""):
        assert endpoint_for(method, path) == _classify(method, path)


def test_a_json_body_reads_the_same_through_orjson_or_json() -> None:
    body = {"id": "resp_1", "object": "response", "model": "gpt-4o", "status": "completed", "usage": USAGE,
            "tool_usage": {"web_search": {"num_requests": 2}}, "prompt_cache_diagnostics": {"type": "cache_miss", "reason": "new", "cache_missed_tokens": 4}}
    obs = observe_json_body("responses", json.dumps(body).encode())
    assert obs.usage is not None and (obs.usage.web_search_calls, obs.usage.cache_status, obs.usage.cache_missed_tokens) == (2, "miss:new", 4)
    surrogate = observe_json_body("responses", json.dumps({**body, "model": "\ud800"}).encode())  # json's escape: orjson refuses it
    assert dataclasses.replace(surrogate, model="gpt-4o") == obs
    assert observe_json_body("responses", b"{nope").unreadable.startswith("invalid JSON: ")  # type: ignore[union-attr]
    assert observe_json_body("responses", b"[1]").unreadable == "JSON body is not an object"
    error = observe_json_body("responses", b'{"error": {"type": "invalid_request_error", "code": 400}}')
    assert (error.error_type, error.error_code, error.terminal, error.usage) == ("invalid_request_error", "400", True, None)
    # A response whose empty or ill-typed members are not taken.
    odd = observe_json_body("responses", json.dumps({"id": "", "model": 5, "background": 1, "usage": {"input_tokens": True, "total_tokens": 3}}).encode())
    assert (odd.response_id, odd.model, odd.background) == (None, None, None)
    assert odd.usage is not None and (odd.usage.input_tokens, odd.usage.total_tokens) == (None, 3)


@pytest.mark.parametrize("shape", [
    b"", b"\n", b"\n\n", b"\n\n\n", b": keep-alive\n\n", b": a\n: b\n\n", b"event: response.completed\n\n", b"event: response.completed\n\n\n",
    b"event: response.in_progress\n\n", b"id: 1\n\n", b"data: \n\n", b"data:\n\n", b"data: {}\n\n\n", b"event: response.completed\ndata: {}\n\n\n",
    b"event: response.completed\r\n\r\n", b"event: response.completed\n\ndata: {}\n\n", b"event: response.completed\nid: 1\n\n",
])
def test_odd_chunks_between_events_read_as_the_line_parser_reads_them(shape: bytes) -> None:
    # Between events a chunk of one or two lines is read without the walk; these are
    # the shapes at the edge of that shortcut, before and after the stream's events.
    for chunks in ([shape, created(), delta(), completed()], [created(), shape, delta(), completed()], [created(), delta(), shape, completed()],
                   [created(), delta(), completed(), shape], [created(), shape + completed()]):
        same_every_way(chunks)
        same_every_way(chunks, "chat")


def test_coalesced_deltas_cut_at_any_byte_read_the_same() -> None:
    # Under load TCP coalesces events, and a chunk may end anywhere in one: the walk's
    # shortcut for output text deltas must leave a delta it cannot see whole to the parser.
    stream = created() + delta() + TEXT_DELTA_LINE + b"\n\n" + delta(kind="response.refusal.delta") + delta() + completed()
    reference = same_every_way([stream])
    assert reference["usage"]["total_tokens"] == 8
    for cut in range(1, len(stream)):
        assert seen([stream[:cut], stream[cut:]]) == reference, cut


def test_a_delta_head_in_a_coalesced_chunk_is_skipped_only_as_a_whole_event() -> None:
    terminal = completed(name=None)
    for middle in (TEXT_DELTA_LINE + b"\n" + terminal, TEXT_DELTA_LINE + b"data: {}\n" + b"\n\n" + terminal,
                   TEXT_DELTA_LINE + b"data: {}\n" + terminal, TEXT_DELTA_LINE + b"data: {}\r\n\r\n" + terminal):
        obs = same_every_way([created() + delta() + middle])
        assert obs == seen([created(), delta(), middle]), middle


def test_chat_chunks_after_the_first_token_are_skipped_only_without_usage_or_error() -> None:
    base = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"delta":{"content":'
    first = base + b'"hi"}}],"usage":null}\n\n'
    shapes = [
        base + b'"usage"}}],"usage":null}\n\n',  # the word in the output, then no usage
        base + b'"usage"}}]}\n\n',
        base + b'"x"}}],"usage": null}\n\n',  # null after a space: the walk's test
        base + b'"x"}}],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}\n\n',  # usage on a content chunk
        base + b'"x"}}],"usage":null,"service_tier":"flex"}\n\n',
        b'data: {"error":{"type":"server_error","code":"boom"}}\n\n',
        base + b'"x"}}],"usage":null}\n\n' + b'data: {"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\n',
    ]
    usage = b'data: {"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\n'
    for shape in shapes:
        chunks = [first, shape, shape, usage, b"data: [DONE]\n\n"]
        obs = same_every_way(chunks, "chat")
        reference = seen([b"".join(chunks)[i : i + 1] for i in range(len(b"".join(chunks)))], "chat")
        assert obs == reference, shape
    error = same_every_way([first, shapes[5], usage], "chat")
    assert (error["error_type"], error["error_code"]) == ("server_error", "boom")
    assert same_every_way([first, shapes[3]], "chat")["usage"]["total_tokens"] == 3


_PIECES = [
    created(), delta(), delta("x" * 300), delta(kind="response.reasoning_summary_text.delta"), delta(eol="\r\n"), TEXT_DELTA_LINE + b"\n",
    event("response.output_text.done", {"type": "response.output_text.done", "text": "tok"}), b": keep-alive\n\n", b"\n", b"\r\n",
    b"id: 3\n", TEXT_DELTA_LINE + b"data: {}\r\n\r\n", event("response.in_progress", {"type": "response.in_progress", "response": {"id": "resp_2"}}),
    event(None, {"type": "response.output_text.delta", "delta": "y"}), b"event: response.completed\ndata: {bad\n\n", completed(), completed(eol="\r\n"),
    completed(name=None), event("error", {"type": "error", "error": {"type": "server_error", "code": "x"}}),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=8), st.lists(st.integers(min_value=0, max_value=4000), max_size=6))
def test_any_stream_of_usual_and_odd_events_reads_as_the_line_parser_reads_it(pieces: list[bytes], cuts: list[int]) -> None:
    # The shortcuts against the line parser alone (byte by byte), over streams made of
    # the events they take and the shapes at their edges, cut anywhere.
    stream = b"".join(pieces)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    reference = seen([stream[i : i + 1] for i in range(len(stream))])
    assert seen(chunks) == reference
    assert seen(pieces) == reference


_CHAT = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"delta":{"content":"hi"}}]'
_CHAT_PIECES = [
    _CHAT + b',"usage":null}\n\n', _CHAT + b"}\n\n", _CHAT + b',"usage": null}\n\n', _CHAT + b',"usage":null}\r\n\r\n', b": keep-alive\n\n",
    b'data: {"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\n', b"\n",
    b'data: {"error":{"type":"server_error","code":"boom"}}\n\n', b"data: [DONE]\n\n", b"data: {bad\n\n", _CHAT + b',\n"usage":null}\n\n',
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_CHAT_PIECES), min_size=1, max_size=8), st.lists(st.integers(min_value=0, max_value=2000), max_size=6))
def test_any_chat_stream_reads_as_the_line_parser_reads_it(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    reference = seen([stream[i : i + 1] for i in range(len(stream))], "chat")
    assert seen([stream[a:b] for a, b in itertools.pairwise(bounds)], "chat") == reference
    assert seen(pieces, "chat") == reference


@pytest.mark.parametrize("tail", [b"\n\n", b"\n", b"", b"\n\n\n", b"\nx", b"\n\r", b"\r\n\n", b"\r\n\r\n", b"\nevent: response.completed\n\n", b"\n\n" + b"data: {}\n\n"])
@pytest.mark.parametrize("head", [TEXT_DELTA_LINE, DELTA_LINES[1], b"event: response.output_text.deltas\n", b"event: response.output_text.delta\r\n"])
def test_a_chunk_after_the_first_token_is_skipped_only_when_it_is_one_delta_whole(head: bytes, tail: bytes) -> None:
    # After the first token a chunk is skipped by splitting it at its first two line
    # ends: a delta's head, one data line, then nothing but the blank line's LF.  Each
    # near miss (a line more or less, a CR, a head one letter off, an event behind it)
    # must read as the line parser reads it, before the terminal event and as it.
    chunk = head + b'data: {"type":"response.output_text.delta","delta":"x"}' + tail
    same_every_way([created(), delta(), chunk, delta(), completed()])
    same_every_way([created(), delta(), chunk + completed()])


@given(st.dictionaries(st.sampled_from(["model", "stream", "prompt_cache_key", "input", "tools", "store", "include"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.just({"id": "c"}))))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_a_request_without_the_usually_absent_members_reads_as_the_full_reading(members: dict) -> None:
    # `generate: true` is the default of a member the shortcut tests for: with it the
    # request takes the full reading, and must come out the same.
    from meter.observe.facts import facts_from_request

    assert facts_from_request(members) == facts_from_request({**members, "generate": True})


def test_the_delta_shortcut_holds_when_the_observer_is_loaded_from_bytecode(tmp_path: Path) -> None:
    """The delta shortcut tests the blank line's LF by identity with the singleton
    `bytes.split` returns.  A module is usually loaded from its cached bytecode, and
    marshal makes each bytes constant its own object: a plain `b"\\n"` constant there
    is never that singleton, and every delta took the general reading (0.86 us, not
    0.2).  Loaded from a .pyc, the constant must still be the one split makes."""
    from meter.observe import sse

    pyc = tmp_path / "sse.pyc"
    py_compile.compile(sse.__file__, cfile=str(pyc), doraise=True)
    name = "meter.observe.sse_from_bytecode"
    loader = importlib.machinery.SourcelessFileLoader(name, str(pyc))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    cached = importlib.util.module_from_spec(spec)
    loader.exec_module(cached)
    _, _, rest = created().split(b"\n", 2)  # what a chunk of one whole event leaves
    assert rest == b"\n"
    assert cached._LF is rest
