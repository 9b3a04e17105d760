"""Copies of what is metered, bounded: `Capped` bytes and the `BodyCollector` of a JSON answer.

Each answer may hold up to `max_bytes` whole; past that, or past what the
shared `MeteringBudget` has left, only a head and a tail, from which identity
and usage are still read (`ends.py`).  So memory is bounded by settings, not by
what clients ask for or upstreams send.
"""

from __future__ import annotations

from .ends import CHAT_HEAD, CHAT_TAIL, RESPONSE_HEAD, RESPONSE_TAIL, partial_object
from .ends import edge as cut_edge
from .objects import Observation, observe_answer, observe_error, observe_json_body


class MeteringBudget:
    """The bytes every answer being metered may hold whole at once (`--max-metered-bytes-total`).

    Each answer may hold up to max_bytes whole; past what is left here it is read
    from its head and tail instead, as an answer past max_bytes is, so memory is
    bounded by settings however many large answers clients ask for at once.  The
    event loop's alone: no lock.
    """

    __slots__ = ("free",)

    def __init__(self, total: int) -> None:
        self.free = total


class Capped:
    """Bytes held whole up to `limit`; past it only a head and a tail of them.

    Whole, the first piece is held by reference (a body that comes in one chunk
    costs no copy) and later pieces go into one bytearray, so the bytes held are
    the bytes counted however small the pieces.  Past the limit the first `edge`
    bytes stay, and the last `edge` (up to twice that between trims) roll on.
    """

    __slots__ = ("_buf", "_first", "_held", "budget", "edge", "head", "limit", "size", "tail")

    def __init__(self, limit: int, budget: MeteringBudget | None = None) -> None:
        self.limit = limit
        self.budget = budget
        self._held = 0  # bytes of `budget` this copy holds
        self.size = 0
        self._first: bytes | None = None
        self._buf: bytearray | None = None
        self.tail: bytearray | None = None  # set, with `head` and `edge`, once past the limit

    def add(self, piece: bytes | memoryview) -> None:
        n = len(piece)
        size = self.size + n
        self.size = size
        tail = self.tail
        if tail is not None:
            edge = self.edge
            if n >= edge:
                tail[:] = piece[n - edge :]
            else:
                tail += piece
                if len(tail) > 2 * edge:
                    del tail[: len(tail) - edge]
        elif size <= self.limit and (self.budget is None or self._reserve(n)):
            buf = self._buf
            if buf is not None:
                buf += piece
            elif self._first is None:
                self._first = piece if type(piece) is bytes else bytes(piece)  # not a view of a larger chunk
            else:
                self._buf = bytearray(self._first)
                self._buf += piece
                self._first = None
        else:
            self._spill(piece)

    def _spill(self, piece: bytes | memoryview) -> None:
        """The limit is crossed: keep the head and the tail of what is held and `piece`."""
        held: bytes | bytearray = self._buf if self._buf is not None else (self._first or b"")
        edge = self.edge = cut_edge(self.limit)
        n, h = len(piece), len(held)
        self.head = bytes(held[:edge]) if h >= edge else bytes(held) + piece[: edge - h]
        if n >= edge:
            self.tail = bytearray(piece[n - edge :])
        else:
            self.tail = bytearray(held[h - (edge - n) :]) if h > edge - n else bytearray(held)
            self.tail += piece
        self._first = self._buf = None
        self.release()

    def _reserve(self, n: int) -> bool:
        budget = self.budget
        if budget.free < n:  # type: ignore[union-attr]
            return False
        budget.free -= n  # type: ignore[union-attr]
        self._held += n
        return True

    def release(self) -> None:
        """Give back what this copy holds of the budget: it is read, cut, or abandoned."""
        if self._held:
            self.budget.free += self._held  # type: ignore[union-attr]
            self._held = 0

    def whole(self) -> bytes | bytearray:
        if self._buf is not None:
            return self._buf
        return self._first or b""


def _observe_cut_body(kind: str, head: bytes, tail: bytes | bytearray) -> Observation:
    """Observe a JSON answer larger than max_bytes from its head and tail."""
    obs = Observation(terminal=True)
    if kind == "responses":
        found = partial_object(head, tail, 0, RESPONSE_HEAD, RESPONSE_TAIL)
    else:
        found = partial_object(head, tail, 0, CHAT_HEAD, CHAT_TAIL)
    if "id" not in found and isinstance(found.get("error"), dict):
        observe_error(obs, found["error"])
    else:
        observe_answer(obs, kind, found)
    if obs.usage is None and obs.error_type is None and obs.error_code is None:
        obs.unmetered = "metered_bytes_limit"
    return obs


class BodyCollector(Capped):
    """Keeps a copy of a non-stream body, to be decoded once it ends: whole up to
    max_bytes, past that its head and tail."""

    __slots__ = ("kind",)
    done = False  # a body is read to its end
    output_done = False  # a body's output is done only when the body is

    def __init__(self, kind: str, limit: int = 64 << 20, budget: MeteringBudget | None = None) -> None:
        # `Capped.__init__`, written out: one is made for every JSON answer.
        self.limit = limit
        self.budget = budget
        self._held = 0
        self.size = 0
        self._first = None
        self._buf = None
        self.tail = None
        self.kind = kind

    feed = Capped.add

    def cut(self) -> None:
        """The body will not be read to its end: read it as one cut in the middle."""
        if self.tail is None:
            self._spill(b"")

    def finish(self) -> Observation:
        if self.tail is not None:
            return _observe_cut_body(self.kind, self.head, self.tail)
        buf = self._buf  # `whole()`, inline: this runs for every JSON answer
        try:
            return observe_json_body(self.kind, buf if buf is not None else self._first or b"")
        finally:
            if self._held:  # `release()`, inline
                self.budget.free += self._held  # type: ignore[union-attr]
                self._held = 0
