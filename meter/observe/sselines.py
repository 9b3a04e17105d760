"""The line parser of a Server-Sent Events body: events split across chunks at any byte.

`SSELines` reads lines that begin in one chunk and end in another, with `\\n`
or `\\r\\n` ends, comments and fields meter does not read, and hands each
event's name (`_on_event_name`) and end (`_dispatch`) to the observer built on
it (`sse.SSEObserver`), which reads the usual chunks by shortcuts and sends
everything else here.  Each byte is scanned for line ends once, whatever the
chunking: a line that spans chunks is carried as state (which field it is),
not as bytes to rescan; an event's data is held whole only up to `max_bytes`,
past that its head and tail.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from .bodies import Capped, MeteringBudget
from .ends import EDGE_MAX

# Where the parser is within a line that began in an earlier chunk.
AT_LINE_START, _IN_DATA, _IN_NAME, _IN_OTHER = 0, 1, 2, 3
_NAME_MAX = 256  # an event name longer than this is no name meter knows


class SSELines(ABC):
    """The line state of an SSE body and the parser that keeps it; the observer
    built on it says what an event name and an event's end mean."""

    __slots__ = ("_budget", "_cr", "_data", "_done", "_event", "_line", "_max", "_name", "_skip", "_start")

    def __init__(self, max_bytes: int, budget: MeteringBudget | None) -> None:
        self._max = max_bytes
        self._budget = budget
        self._event: bytes | None = None
        self._data: bytes | Capped | None = None  # the current event's data: one line, or lines joined by LF
        self._skip = False  # the current event is one meter does not read
        self._line = AT_LINE_START
        self._start = b""  # the first bytes of a line too short yet to say its field
        self._name = b""  # an event name split across chunks, up to _NAME_MAX bytes
        self._cr = False  # a CR ended the data kept so far: dropped if LF follows
        self._done = False  # after the terminal event nothing more is needed

    @abstractmethod
    def _on_event_name(self, name: bytes) -> None:
        """An `event:` line was read: what the name says is the observer's to decide."""

    @abstractmethod
    def _dispatch(self) -> None:
        """A blank line ended the event: the observer reads it."""

    def _parse_lines(self, chunk: bytes, pos: int, n: int) -> None:
        """Read the lines of chunk[pos:n] (bounds, not a slice: an event may be large)."""
        if self._start:
            chunk = self._start + chunk[pos:n]  # at most 6 bytes before it: one copy per split field name
            self._start = b""
            pos, n = 0, len(chunk)
        find = chunk.find
        line = self._line
        if line != AT_LINE_START:  # a line begun in an earlier chunk goes on
            nl = find(b"\n", pos, n)
            if line == _IN_OTHER:  # nothing of it is kept
                if nl < 0:
                    return
                self._line = AT_LINE_START
            elif nl < 0:
                self._line_goes_on(chunk, pos, n)
                return
            else:
                self._line_goes_on(chunk, pos, nl)
                self._line_ends()
            pos = nl + 1
        while True:
            nl = find(b"\n", pos, n)
            if nl < 0:
                break
            end = nl - 1 if nl > pos and chunk[nl - 1] == 13 else nl
            if end == pos:
                self._dispatch()
                if self._done:
                    return
            elif not self._skip:
                if chunk.startswith(b"data:", pos):
                    start = pos + 6 if chunk.startswith(b"data: ", pos) else pos + 5
                    # A line past the limit is read through a view: only its head and tail are copied.
                    self._data_line(chunk[start:end] if end - start <= self._max else memoryview(chunk)[start:end])
                elif chunk.startswith(b"event:", pos):
                    start = pos + 7 if chunk.startswith(b"event: ", pos) else pos + 6
                    self._on_event_name(chunk[start:end] if end - start <= _NAME_MAX else chunk[start : start + _NAME_MAX])
            pos = nl + 1
        if pos < n:
            if self._skip and (n - pos > 1 or chunk[pos] != 13):
                self._line = _IN_OTHER  # a line of an event meter skips: nothing of it is kept
            else:  # (a lone CR may open a CRLF blank line, which ends even a skipped event)
                self._line_begins(chunk, pos, n)

    def _data_line(self, line: bytes | memoryview) -> None:
        data = self._data
        if data is None and type(line) is bytes and len(line) <= self._max:
            self._data = line  # the usual event: one data line, held as it is
            return
        self._more_data().add(line)

    def _more_data(self) -> Capped:
        """The current event's data, ready for one more line."""
        data = self._data
        if data is None:
            data = self._data = Capped(self._max, self._budget)
            return data
        if type(data) is bytes:
            first = data
            data = self._data = Capped(self._max, self._budget)
            data.add(first)
        data.add(b"\n")  # type: ignore[union-attr]
        return data  # type: ignore[return-value]

    def _line_begins(self, chunk: bytes, pos: int, n: int) -> None:
        """A line of an event meter reads starts at chunk[pos] and does not end before chunk[n]."""
        rest = n - pos
        if chunk.startswith(b"data:", pos) and rest > 5:
            self._line = _IN_DATA
            self._more_data()
            self._line_goes_on(chunk, pos + 6 if chunk[pos + 5] == 32 else pos + 5, n)
        elif chunk.startswith(b"event:", pos) and rest > 6:
            self._line = _IN_NAME
            start = pos + 7 if chunk[pos + 6] == 32 else pos + 6
            self._name = chunk[start : min(n, start + _NAME_MAX)]
        elif rest < 7 and (b"data: ".startswith(chunk[pos:n]) or b"event: ".startswith(chunk[pos:n])):
            self._start = chunk[pos:n]
        elif rest == 1 and chunk[pos] == 13:  # the CR of a CRLF blank line, its LF in the next chunk
            self._start = b"\r"
        else:
            self._line = _IN_OTHER  # a comment, `id:`, `retry:`: nothing meter reads

    def _line_goes_on(self, chunk: bytes, start: int, end: int) -> None:
        line = self._line
        if line == _IN_DATA:
            data = self._data
            assert isinstance(data, Capped)
            if self._cr and end > start:  # the CR held back was no CRLF's: data after all
                data.add(b"\r")
                self._cr = False
            # (none before the line's end: it was its CRLF's, dropped by `_line_ends`)
            if end > start and chunk[end - 1] == 13:  # perhaps the CR of a CRLF: hold it back
                self._cr = True
                end -= 1
            if end - start > EDGE_MAX:  # a view: past the limit only its end is copied
                data.add(memoryview(chunk)[start:end])
            elif end > start:
                data.add(chunk[start:end] if start or end < len(chunk) else chunk)
        elif line == _IN_NAME:
            room = _NAME_MAX - len(self._name)
            if room > 0:
                self._name += chunk[start : min(end, start + room)]  # a few bytes: bounded by _NAME_MAX

    def _line_ends(self) -> None:
        line, self._line = self._line, AT_LINE_START
        self._cr = False
        if line == _IN_NAME:
            name = self._name
            self._name = b""
            self._on_event_name(name[:-1] if name.endswith(b"\r") else name)
