"""Content codings undone on meter's own copy of an answer: gzip, deflate, br, zstd.

The client receives the upstream's bytes as sent; `Decompressing` decodes a
copy in small pieces and hands them to the observer as they come, so no
decoded copy is held here, and stops where an answer grows more than any real
one does (a decompression bomb).  A request body, read whole before it is
forwarded as sent, is decoded whole (`decoded_copy`), up to a limit.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import IO, cast

import brotli
import zstandard

from .bodies import BodyCollector
from .objects import Observation
from .sse import SSEObserver

# Past max_bytes, decoding stops once the answer has grown more than this many
# times the bytes received: no real answer does (JSON compresses some ten times,
# base64 images hardly at all), a decompression bomb does (gzip's limit is about
# 1,000 times, brotli's and zstd's far more).  Below it, decoding work stays in
# proportion to the bytes the upstream sent, and memory is bounded either way.
_MAX_RATIO = 256
_STEP = 256 << 10  # the largest piece a decoder hands on at once


class _Stop(Exception):
    """Decoding went past what metering may spend on one answer (or hold of one body)."""


class _Zlib:
    """gzip (members one after another, as RFC 1952 allows) or zlib-wrapped deflate."""

    __slots__ = ("_d", "_step", "_wbits")

    def __init__(self, wbits: int, step: int) -> None:
        self._wbits = wbits
        self._d = zlib.decompressobj(wbits)
        self._step = step

    def decode(self, data: bytes, emit: Callable[[bytes], None]) -> None:
        d, step = self._d, self._step
        while True:
            out = d.decompress(data, step)
            if out:
                emit(out)
            data = d.unconsumed_tail
            if not data and len(out) < step:
                if not d.eof or self._wbits != _GZIP or not d.unused_data.startswith(b"\x1f"):
                    return  # all input taken; or the end, and what follows is not another member
                data = d.unused_data
                d = self._d = zlib.decompressobj(self._wbits)


_GZIP = 16 + zlib.MAX_WBITS


class _Gzip(_Zlib):
    __slots__ = ()

    def __init__(self, step: int) -> None:
        super().__init__(_GZIP, step)


class _Deflate(_Zlib):
    """`deflate`: RFC 9110 says zlib-wrapped; some servers send it raw.  The first
    two bytes tell which (the test browsers and curl use)."""

    __slots__ = ("_pending",)

    def __init__(self, step: int) -> None:
        self._pending = b""
        self._wbits = zlib.MAX_WBITS
        self._step = step
        self._d = None  # type: ignore[assignment]

    def decode(self, data: bytes, emit: Callable[[bytes], None]) -> None:
        if self._d is None:
            data = self._pending + data
            if len(data) < 2:
                self._pending = data
                return
            cmf, flg = data[0], data[1]
            wrapped = cmf & 0x0F == 8 and cmf >> 4 <= 7 and ((cmf << 8) | flg) % 31 == 0
            self._d = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            self._pending = b""
        super().decode(data, emit)


class _Brotli:
    __slots__ = ("_d", "_step")

    def __init__(self, step: int) -> None:
        self._d = brotli.Decompressor()
        self._step = step

    def decode(self, data: bytes, emit: Callable[[bytes], None]) -> None:
        d, step = self._d, self._step
        out = d.process(data, output_buffer_limit=step)
        # Output held back by the limit comes out of calls without input; the
        # decoder may say it can take input while some is still held.
        while out or not d.can_accept_more_data():
            emit(out)
            out = d.process(b"", output_buffer_limit=step)


class _ZstdSink:
    __slots__ = ("emit",)

    def __init__(self) -> None:
        self.emit: Callable[[bytes], None] = lambda piece: None

    def write(self, piece: bytes) -> int:
        self.emit(piece)
        return len(piece)


class _Zstd:
    """zstd frames, one after another; the window is capped at 8 MiB as RFC 9659 says a
    decoder should, so a frame cannot make meter hold a larger one."""

    __slots__ = ("_sink", "_w")

    def __init__(self, step: int) -> None:
        self._sink = _ZstdSink()
        sink = cast("IO[bytes]", self._sink)  # the writer only calls its write()
        self._w = zstandard.ZstdDecompressor(max_window_size=8 << 20).stream_writer(sink, write_size=step, write_return_read=True, closefd=False)

    def decode(self, data: bytes, emit: Callable[[bytes], None]) -> None:
        self._sink.emit = emit
        self._w.write(data)


_Decoder = _Zlib | _Brotli | _Zstd

DECODERS: dict[str, Callable[[int], _Decoder]] = {
    "gzip": _Gzip,
    "x-gzip": _Gzip,
    "deflate": _Deflate,
    "br": _Brotli,
    "zstd": _Zstd,
}
_DECODE_ERRORS = (zlib.error, brotli.error, zstandard.ZstdError)


def content_codings(content_encoding: str) -> list[str]:
    """The codings a `Content-Encoding` value names, in the order applied, lowered, with
    `identity` (no coding) left out."""
    return [c for c in (part.strip().lower() for part in content_encoding.split(",")) if c and c != "identity"]


def decoded_copy(body: bytes, content_encoding: str, limit: int) -> bytes:
    """A whole body sent with `content_encoding`, decoded (a request body, whose facts
    meter reads while the upstream gets it as sent): the codings undone last first, or
    b"" (facts unknown) for a coding meter cannot undo, a body that is not what its
    coding says, or one that decodes to more than `limit` bytes (a bomb)."""
    codings = content_codings(content_encoding)
    if any(coding not in DECODERS for coding in codings):
        return b""
    data = body
    try:
        for coding in reversed(codings):
            data = _decode_whole(DECODERS[coding](_STEP), data, limit)
    except Exception:  # noqa: BLE001 - too large, or whatever a decoder makes of a broken body: the facts stay unknown
        return b""
    return data


def _decode_whole(decoder: _Decoder, data: bytes, limit: int) -> bytes:
    pieces: list[bytes] = []
    size = 0

    def keep(piece: bytes) -> None:
        nonlocal size
        size += len(piece)
        if size > limit:
            raise _Stop
        pieces.append(piece)

    decoder.decode(data, keep)
    return b"".join(pieces)


def _chain(decoder: _Decoder, emit: Callable[[bytes], None]) -> Callable[[bytes], None]:
    return lambda data: decoder.decode(data, emit)


class Decompressing:
    """Wraps an observer so it sees the decoded form of a compressed body.

    Only meter's copy is decoded, in pieces of at most 256 KiB handed on as they
    come, so no decoded copy is held here; the observer bounds what it keeps.
    Codings are undone last first (`Content-Encoding: gzip, br` is gzip, then br).
    The client still receives the upstream's bytes.
    """

    __slots__ = ("_decoded", "_encoded", "_failed", "_feed", "_first", "_limit", "_stopped", "_then", "inner")

    def __init__(self, inner: SSEObserver | BodyCollector, codings: list[str], max_bytes: int = 64 << 20) -> None:
        self.inner = inner
        self._feed = inner.feed
        step = min(_STEP, max_bytes)
        emit: Callable[[bytes], None] = self._emit
        for coding in codings[:-1]:  # the first applied is undone last, just before the observer
            emit = _chain(DECODERS[coding](step), emit)
        self._first = DECODERS[codings[-1]](step)
        self._then = emit
        self._limit = max_bytes
        self._encoded = 0
        self._decoded = 0
        self._failed = False
        self._stopped = False

    def _emit(self, piece: bytes) -> None:
        decoded = self._decoded + len(piece)
        self._decoded = decoded
        if decoded > self._limit and decoded > _MAX_RATIO * self._encoded:
            raise _Stop
        self._feed(piece)

    def feed(self, chunk: bytes) -> None:
        if self._failed or self._stopped or self.inner.done:
            return
        self._encoded += len(chunk)
        try:
            self._first.decode(chunk, self._then)
        except _Stop:
            self._stopped = True
            self.inner.cut()
        except _DECODE_ERRORS:
            self._failed = True

    def release(self) -> None:
        self.inner.release()

    @property
    def done(self) -> bool:
        return self.inner.done

    @property
    def output_done(self) -> bool:
        return self.inner.output_done

    def finish(self) -> Observation:
        obs = self.inner.finish()
        if self._failed:
            obs.unreadable = "compressed body could not be decoded"
        if self._stopped and obs.usage is None:
            obs.unmetered = "metered_bytes_limit"
        return obs
