"""The observer of a Server-Sent Events answer: Responses API or Chat Completions.

Events may be split at any byte, use `\\n` or `\\r\\n`, and carry comments; a stream
whose lines end with a lone `\\r` (the standard allows it) is read as LF-ended, and
a byte order mark at its start is dropped (see `_as_lf`).  Only
events that carry identity or usage are JSON-decoded: a Responses event is
judged by its name against the interpreter's sets (`responses.py`), which
also says what a decoded one means; a Chat Completions chunk by whether it
holds a usage object.  The usual chunks are read by a few byte operations;
the rest by the line parser (`sselines.py`), which holds an event whole only
up to `max_bytes` (past it, its head and tail).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .bodies import MeteringBudget
from .ends import CHAT_HEAD, CHAT_TAIL, partial_object
from .jsonio import DecodeError, orjson_loads
from .objects import Observation, note_missing_usage, observe_chat_object, observe_error
from .responses import (
    DECODED,
    DELTA,
    DELTA_HEADS,
    DELTA_LINES,
    DELTA_TYPE,
    DONE,
    ERROR,
    TEXT_DELTA_HEAD,
    TEXT_DELTA_LINE,
    decode_event,
    event_from_ends,
    observe_event,
    observe_usual_event,
)
from .sselines import AT_LINE_START, SSELines

_TEXT_DATA = len(TEXT_DELTA_LINE)  # where the data line of an output text delta begins
# The one-byte LF that `bytes.split` returns, which feed's delta shortcut tests by
# identity.  Not a `b"\n"` constant: loaded from cached bytecode, marshal makes that
# an object of its own, and the shortcut would never hold.
_LF = b"\n\n".split(b"\n", 1)[1]
# The members of a Chat Completions delta that carry output: the first chunk with one
# of them non-empty is the first token.  A role chunk has none (`content` "" or null):
# text, tool and legacy function calls, refusals, audio, and the reasoning some
# OpenAI-compatible servers stream (`reasoning_content`, `reasoning`).
_CHAT_OUTPUT = ("content", "tool_calls", "function_call", "refusal", "audio", "reasoning_content", "reasoning")
# An `error` event ends its response as failed, but reading goes on: over SSE the
# terminal events are `response.completed`, `.incomplete` and `.failed` (SPEC §3), and
# a `response.failed` after an error brings the usage billed.
_ERROR_TYPE = ERROR.decode()
# How a delta ends whose keys are sorted: its last member is its `type`.
_DELTA_LAST = DELTA + b'"}'
_BOM = b"\xef\xbb\xbf"  # U+FEFF in UTF-8: dropped once at a stream's start, as the SSE standard says
# How the stream's lines end (`_eol`), as far as read: LF or CRLF, which the line
# parser reads (0, so that the usual case is one falsy test); nothing read yet (a
# byte order mark may come); no line end yet; some end with a lone CR.
_EOL_LF, _EOL_START, _EOL_UNKNOWN, _EOL_CR = 0, 1, 2, 3


def _holds_usage_object(buf: bytes | bytearray, start: int = 0, end: int | None = None) -> bool:
    """Whether a Chat Completions chunk has `"usage": {...}` rather than `"usage": null`."""
    if end is None:
        end = len(buf)
    i = buf.rfind(b'"usage"', start, end)
    if i < 0:
        return False
    j = i + 7
    while j < end and buf[j] in b" \t\r\n:":
        j += 1
    return buf[j : j + 1] == b"{"


def _is_error_chunk(buf: bytes | bytearray, start: int = 0) -> bool:
    """Whether a Chat Completions payload is `{"error": ...}` (a chunk starts `{"id":`)."""
    return buf.find(b'"error"', start, start + 24) >= 0


class SSEObserver(SSELines):
    """Incremental observer of a Server-Sent Events body.

    `feed` takes each chunk as relayed; `finish` returns the observation.  The
    usual chunks are read at once: a delta alone in its chunk by its fixed head,
    an event of one or two lines alone in its chunk, and several whole events
    walked by their line ends.  What is left, an event split across chunks or
    of an unusual shape, goes to the line parser (`SSELines`), whose reading is
    the reference the shortcuts keep to.  A data line is kept only while the
    event it belongs to may matter, decoded only when it does.
    """

    __slots__ = (
        "_between", "_chat_quiet", "_clock", "_cr_held", "_eol", "_held", "_oversized", "_quiet", "_ttft_pending", "kind", "obs", "output_done",
    )  # fmt: skip

    def __init__(self, kind: str, clock: Callable[[], float] = time.perf_counter, max_bytes: int = 64 << 20, budget: MeteringBudget | None = None) -> None:
        SSELines.__init__(self, max_bytes, budget)
        self.kind = kind  # "responses" or "chat"
        self.obs = Observation()
        self._clock = clock
        self._ttft_pending = True
        # The last named event was a `.done` one, no delta after it: the client has the
        # whole output, and a hang-up now still leaves a terminal event to meter (SPEC §2).
        self.output_done = False
        self._oversized = False
        self._between = True  # no event is begun and more is to be read: see feed
        self._quiet = False  # between events, first token noted, output not done: see feed
        self._chat_quiet = False  # the same for Chat Completions, with the model known
        self._eol = _EOL_START
        self._held = b""  # the stream's first bytes, while they may be a byte order mark or a CRLF's CR
        self._cr_held = False  # the last chunk ended with a CR (made LF): an LF first in the next is its CRLF's

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, chunk: bytes) -> None:
        if self._quiet:
            # The usual chunk is one whole delta event: a fixed head names it, and line
            # ends only where the head, its one data line and the blank line end say
            # nothing else is in the chunk.  A delta is never decoded, and with the first
            # token noted and no `.done` event since, it changes nothing.  This is the one
            # per-delta cost, so it is one C call: split at the first two line ends, the
            # chunk is that event exactly when the first line is a delta's head and all
            # that follows the second is the blank line's LF (the data line between has
            # none).  `bytes.split` takes its arguments faster than `find`/`startswith`
            # do on 3.11, and the commonest head is one bytes compare.  The LF is tested
            # by identity: CPython makes every one-byte bytes object its cached singleton
            # (split's pieces and this constant alike); where one is not, the chunk only
            # takes the general reading below, which reads it the same.  The split copies
            # a chunk that is not a delta; the large ones (`.done` events, the terminal
            # one) end the quiet, so the first of them is the only one copied.
            try:
                head, _, rest = chunk.split(b"\n", 2)
            except ValueError:  # fewer than two line ends: not one whole event
                pass
            else:
                if rest is _LF and (head == TEXT_DELTA_HEAD or head in DELTA_HEADS):
                    return
        elif (self._chat_quiet and chunk[:7] == b"data: {" and chunk.find(b"\n", 7) == len(chunk) - 2 and chunk[-1] == 10
              and chunk.find(b'"error"', 6, 30) < 0):
            # A Chat Completions chunk alone, one data line, after the first token with the
            # model known: only an error or a usage object matters, and the usual chunk
            # has `"usage":null` last or no usage at all (the walk's test, in short; any
            # other shape of usage takes the walk).
            i = chunk.rfind(b'"usage"')
            if i < 0 or chunk.startswith(b":null", i + 7):
                return
        if self._eol:  # the stream's line ends are not yet known to be LF or CRLF
            chunk = self._as_lf(chunk)
            if not chunk:
                return
        if self._between:
            n = len(chunk)
            if (chunk[:7] == b"event: " and self.kind == "responses" and chunk.find(b"\n", (nl := chunk.find(b"\n", 7)) + 1) == n - 2
                    and chunk[n - 1] == 10 and chunk[nl - 1] != 13):
                # A Responses event alone in its chunk, a name line and one more, LF-ended,
                # as upstreams write every event but deltas: judged by its name and, if it
                # is one to decode with a `data: ` line as usual, read at once.
                name = chunk[7:nl]
                if name not in DECODED:
                    self.output_done = name.endswith(DONE)
                    if name.endswith(DELTA):
                        self._first_token()
                elif chunk[nl + 1 : nl + 7] == b"data: " and chunk[n - 3] != 13 and n - nl - 9 <= self._max:
                    self.output_done = False
                    self._responses_payload(name, chunk[nl + 7 : n - 2])
                else:
                    self._whole_event(chunk, 0, n - 2, nl, False)
                if self._done:
                    self._between = False
            else:
                last = chunk.rfind(b"\n", 0, n - 2)
                if n > 2 and chunk[n - 1] == 10 and chunk[n - 2] == 10 and (last < 0 or (last < n - 3 and chunk.find(b"\n") == last)):
                    # Any other event of one or two lines alone in its chunk (a Chat
                    # Completions chunk, a comment): read at once, without the walk.
                    self._whole_event(chunk, 0, n - 2, n - 2 if last < 0 else last, False)
                    if self._done:
                        self._between = False
                else:
                    self._walk(chunk)
        elif not self._done:
            if self._line == AT_LINE_START and self._event is None and self._data is None and not self._start:
                self._walk(chunk)
            else:
                self._parse_lines(chunk, 0, len(chunk))
                self._between = self._idle()
        # (never with lone CRs: the shortcuts above read a chunk before `_as_lf` does)
        quiet = self._between and not self._ttft_pending and not self.output_done and not self._eol
        if self.kind == "chat":
            self._chat_quiet = quiet and self.obs.model is not None
        else:
            self._quiet = quiet

    def _as_lf(self, chunk: bytes) -> bytes:
        """The chunk with its line ends as the line parser reads them, until the stream's
        first line end shows they are LF or CRLF (as every upstream sends), from then
        on the chunk itself.

        The SSE standard also ends a line with a lone CR; such a stream's every line end
        is made LF here (a CRLF one LF), or none of its events would be read.  A UTF-8
        byte order mark before the stream's first line is dropped, as the standard
        says: kept, it hid that line's field (a Chat Completions answer in one chunk
        lost its usage).  Bytes that may yet be either are held, at most three.
        """
        if self._eol == _EOL_CR:
            return self._cr_to_lf(chunk)
        if self._held:
            chunk = self._held + chunk
            self._held = b""
        if self._eol == _EOL_START:
            if len(chunk) < 3 and _BOM.startswith(chunk):
                self._held = chunk
                return b""
            self._eol = _EOL_UNKNOWN
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
        cr = chunk.find(b"\r")
        lf = chunk.find(b"\n", 0, cr + 2 if cr >= 0 else len(chunk))
        if cr < 0 or 0 <= lf <= cr + 1:  # the first line end is an LF, or a CRLF
            if lf >= 0 or cr >= 0:
                self._eol = _EOL_LF
            return chunk
        if cr == len(chunk) - 1:  # a CR last: the next chunk says whether an LF is its pair
            self._held = b"\r"
            return chunk[:-1]
        self._eol = _EOL_CR
        return self._cr_to_lf(chunk)

    def _cr_to_lf(self, chunk: bytes) -> bytes:
        """A chunk of a stream with lone CRs, each line end made LF."""
        if self._cr_held and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._cr_held = chunk[-1:] == b"\r"
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def _idle(self) -> bool:
        """Between events, and not done: what `_between` says, worked out from the state."""
        return not self._done and self._line == AT_LINE_START and self._event is None and self._data is None and not self._start

    def _walk(self, chunk: bytes) -> None:
        """Between events, as usual: walk the chunk's whole events and read each at once.

        Only an event in an unusual shape goes through the line parser, on its own; the
        walk then goes on.  Under load TCP coalesces a stream's events into large chunks,
        and the deltas after `response.created` in the same chunk must not all fall to
        the line parser.
        """
        pos, n = 0, len(chunk)
        find, startswith = chunk.find, chunk.startswith
        while pos < n:
            if chunk[pos : pos + _TEXT_DATA] == TEXT_DELTA_LINE:
                # An output text delta, the commonest event by far: its head, one data
                # line and a blank line, skipped at the cost of one line-end search.
                end = find(b"\n", pos + _TEXT_DATA)
                if end > 0 and end + 1 < n and chunk[end + 1] == 10:
                    self.output_done = False
                    if self._ttft_pending:
                        self._first_token()
                    pos = end + 2
                    continue
            # The event's end, its first blank line, found by line ends: a one-byte
            # search is a fraction of a two-byte one over a large event, and the usual
            # event has one or two lines.
            nl = find(b"\n", pos)
            if nl < 0:
                break
            more = False  # more than two lines
            if startswith(b"\n", nl + 1):
                end = nl
            else:
                end = find(b"\n", nl + 1)
                if end < 0:
                    break
                if not startswith(b"\n", end + 1):
                    end = find(b"\n\n", end)
                    if end < 0:
                        break
                    more = True
            if more and find(b"\n\r\n", pos, end) >= 0:
                # A CRLF blank line inside: more than one event (CRLF framing, then LF),
                # which the line parser tells apart, whatever the first one's name.
                self._parse_lines(chunk, pos, end + 2)
                if self._done:
                    self._between = False
                    return
            elif startswith(DELTA_LINES, pos):  # the common event, by its fixed head: nothing to read
                self.output_done = False
                if self._ttft_pending:
                    self._first_token()
            else:
                self._whole_event(chunk, pos, end, nl, more)
                if self._done:
                    self._between = False
                    return
            pos = end + 2
        if pos < n:
            self._parse_lines(chunk, pos, n)
            self._between = self._idle()
        else:
            self._between = True  # whole events only: each left the state as it found it

    def _first_token(self) -> None:
        if self._ttft_pending:
            self._ttft_pending = False
            self.obs.first_token_at = self._clock()

    def _whole_event(self, chunk: bytes, start: int, end: int, nl: int, more: bool) -> None:
        """Read the event at chunk[start:end] (its blank line excluded), whole in this
        chunk: its first line ends at nl, and `more` says it has more than two lines.

        It is judged by its name (or, for Chat Completions, whether it holds a usage
        object) with a few byte operations.  One that matters in the usual shape, an
        optional `event: ` line and one `data: ` line, LF-ended, is read here at once;
        any other shape goes through the line parser.
        """
        name: bytes | None = None
        data = start  # where its data line would begin
        one_line = nl == end  # the data line, if it is one, is the last and only one
        if chunk.startswith(b"event: ", start):
            eol = nl
            if chunk[eol - 1] == 13:  # CRLF lines ended by a bare LF blank line
                eol -= 1
            name = chunk[start + 7 : eol]
            if name in DECODED:  # none ends in `.done` or `.delta`
                self.output_done = False
            else:
                self.output_done = name.endswith(DONE)
                if name.endswith(DELTA):
                    self._first_token()
                    return
                if self.kind == "responses":
                    return
            data = nl + 1 if nl == eol and nl < end else end  # no data line, or CRLF: the line parser
            one_line = not more
        elif chunk.startswith(b":", start):
            if nl == end:
                return  # a lone comment line (keep-alive)
            data = end
        elif (self.kind == "chat" and not self._ttft_pending and self.obs.model is not None and chunk.startswith(b"data: {", start)
              and chunk.find(b'"error"', start + 6, start + 30) < 0):
            # After the first token only a usage object or an error matters (inlined
            # `_holds_usage_object` and `_is_error_chunk`: this runs per chunk).
            i = chunk.rfind(b'"usage"', start, end)
            if i < 0:
                return
            i += 7
            while i < end and chunk[i] in b" \t\r\n:":
                i += 1
            if chunk[i] != 123:  # "{"
                return
        if one_line and chunk.startswith(b"data: ", data) and chunk[end - 1] != 13 and end - data - 6 <= self._max:
            # As the line parser would: one data line, held as it is, then dispatched.
            if self.kind == "chat":
                self._chat_payload(chunk[data + 6 : end])
            else:
                self._responses_payload(name, chunk[data + 6 : end])
            return
        self._parse_lines(chunk, start, end + 2)

    def _on_event_name(self, name: bytes) -> None:
        self._event = name
        self.output_done = name.endswith(DONE)
        if name.endswith(DELTA):
            self._first_token()
            self._skip = True  # deltas carry no usage
        elif self.kind == "responses" and name not in DECODED:
            self._skip = True

    def _dispatch(self) -> None:
        event, data = self._event, self._data
        self._event = None
        self._skip = False
        if data is None:
            return
        self._data = None
        if type(data) is bytes:
            payload: bytes | bytearray = data
        elif data.tail is not None:  # type: ignore[union-attr]
            self._oversized = True
            self._oversized_event(event, data.head, data.tail)  # type: ignore[union-attr]
            return
        else:
            payload = data.whole()  # type: ignore[union-attr]
            data.release()  # type: ignore[union-attr]  # read below, then let go
        if self.kind == "chat":
            self._chat_payload(payload)
        else:
            self._responses_payload(event, payload)

    def release(self) -> None:
        """Give back the budget an unfinished event holds (the stream was cut or abandoned)."""
        data = self._data
        if data is not None and type(data) is not bytes:
            data.release()  # type: ignore[union-attr]

    def _responses_payload(self, event: bytes | None, payload: bytes | bytearray) -> None:
        if event is None:
            # No `event:` line: peek at the type near the start before decoding.
            head = payload[:96]
            if DELTA in head or payload.endswith(_DELTA_LAST):
                self._first_token()
                return
            if b'"response.' not in head and b'"error"' not in head:
                if b"{" in head:
                    self._late_typed_payload(payload)
                return
        done = observe_usual_event(self.obs, payload)  # the usual event, decoded into what is read of it
        if done is not None:
            if done:
                self._done = True
            return
        try:
            obj = orjson_loads(payload)  # the usual event, without `_decode`'s calls around it
        except ValueError:
            obj = self._decode(payload)  # what orjson refuses and json reads, or the mark it is unreadable
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if isinstance(kind, str) and observe_event(self.obs, kind, obj) and kind != _ERROR_TYPE:
            self._done = True

    def _late_typed_payload(self, payload: bytes | bytearray) -> None:
        """An event without a name whose `type` is not near its start: its keys in another
        order than OpenAI writes them (sorted, as a server that decodes and re-encodes
        events may write them, `type` after a large `response`).  Decoded to know it."""
        try:
            obj = orjson_loads(payload)
        except ValueError:
            obj = self._decode(payload)
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if not isinstance(kind, str):
            return
        if kind.endswith(DELTA_TYPE):
            self._first_token()
        elif observe_event(self.obs, kind, obj) and kind != _ERROR_TYPE:
            self._done = True

    def _decode(self, payload: bytes | bytearray) -> dict[str, Any] | None:
        """The event's JSON object; None, and the observation says so, if it is not JSON."""
        try:
            return decode_event(payload)
        except DecodeError:
            self.obs.unreadable = "invalid JSON in an SSE event"
            return None

    def _chat_payload(self, payload: bytes | bytearray) -> None:
        if payload == b"[DONE]":
            self.obs.terminal = True
            self._done = True
            return
        if not self._ttft_pending and self.obs.model is not None and not _holds_usage_object(payload) and not _is_error_chunk(payload):
            return  # after the first token only the usage chunk (and the tier on it), or an error, matters
        obj = self._decode(payload)
        if obj is None:
            return
        if "error" in obj and isinstance(obj["error"], dict):
            observe_error(self.obs, obj["error"])
            return
        observe_chat_object(self.obs, obj)
        if self._ttft_pending:
            for choice in obj.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and any(delta.get(key) for key in _CHAT_OUTPUT):
                    self._first_token()
                    break

    def _oversized_event(self, event: bytes | None, head: bytes, tail: bytearray) -> None:
        """An event past max_bytes, of which only the head and tail were kept."""
        obs = self.obs
        if self.kind == "chat":
            found = partial_object(head, tail, 0, CHAT_HEAD, CHAT_TAIL)
            if isinstance(found.get("error"), dict):
                observe_error(obs, found["error"])
                return
            observe_chat_object(obs, found)
            if b'"choices"' in head:  # a chunk this large carries output
                self._first_token()
            return
        found = event_from_ends(head, tail, event.decode("utf-8", "replace") if event is not None else None)
        kind = found.get("type")
        if not isinstance(kind, str):
            return
        if kind.endswith(DELTA_TYPE):
            self._first_token()
        elif observe_event(obs, kind, found) and kind != _ERROR_TYPE:
            self._done = True

    def cut(self) -> None:
        """The stream will not be read further: an event begun is not one to decode."""
        self.release()
        self._data = None
        self._line = AT_LINE_START
        self._start = b""
        self._done = True
        self._between = self._quiet = self._chat_quiet = False

    def finish(self) -> Observation:
        self._between = self._quiet = self._chat_quiet = False  # the line parser may run below: feed must not skip it
        if not self._done:
            # A stream may end without the final blank line; the spec says such an
            # event is dropped, but its data is all we have of the terminal event.
            if self._line != AT_LINE_START or self._start:
                self._parse_lines(b"\n", 0, 1)
            if self._data is not None and not self._done:
                self._dispatch()
        self.release()
        obs = self.obs
        if obs.usage is None and obs.unmetered is None and obs.error_type is None and obs.error_code is None:
            if self._oversized:
                obs.unmetered = "oversized_event"
            elif not obs.terminal:
                obs.unmetered = "no_terminal_event"
            elif self.kind == "chat":
                obs.unmetered = "no_include_usage"  # the SDK's default: no usage chunk was asked for
            else:
                note_missing_usage(obs, self.kind)  # a terminal event without usage
        return obs
