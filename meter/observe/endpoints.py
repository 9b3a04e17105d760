"""What a request is, and which observer reads its answer.

`endpoint_for` classifies a request by its path's tail (so prefixed layouts,
Azure's or a gateway's, match); `METERED_KIND` says which endpoints are
metered and in which shape; `observer_for` picks the observer for an answer's
content type and coding.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .bodies import BodyCollector, MeteringBudget
from .codings import DECODERS, Decompressing, content_codings
from .objects import Observation
from .sse import SSEObserver

METERED_KIND = {
    "responses": "responses",
    "responses.retrieve": "responses",
    "responses.compact": "responses",
    "responses.cancel": "responses",
    "responses.delete": "responses",
    "chat.completions": "chat",
    "embeddings": "chat",
}


def _classify(method: str, path: str) -> str:
    """Classify a request by its path's tail, so prefixed layouts (Azure, gateways) match."""
    segments = [s for s in path.split("?", 1)[0].split("/") if s]
    if not segments:
        return "other"
    if segments[-1] == "embeddings":
        return "embeddings"
    if segments[-2:] == ["chat", "completions"]:
        return "chat.completions"
    n = len(segments)
    for i in range(n - 1, max(n - 4, -1), -1):
        if segments[i] == "responses":
            rest = segments[i + 1 :]
            if not rest:
                return "responses"
            if rest == ["compact"]:
                return "responses.compact"
            if rest == ["input_tokens"]:
                return "responses.input_tokens"
            if len(rest) == 1:
                return {"GET": "responses.retrieve", "DELETE": "responses.delete"}.get(method, "other")
            if len(rest) == 2 and rest[1] == "cancel":
                return "responses.cancel"
            return "other"
    return "other"


# The paths nearly every request has, classified once by `_classify` itself (so
# they cannot disagree with it): a lookup instead of splitting the path, on every
# request.  None of them depends on the method; any other path is classified.
_USUAL = {
    path: _classify("POST", path)
    for prefix in ("", "/v1", "/openai", "/openai/v1")
    for path in (f"{prefix}/responses", f"{prefix}/chat/completions", f"{prefix}/embeddings", f"{prefix}/responses/compact", f"{prefix}/responses/input_tokens")
}


def endpoint_for(method: str, path: str) -> str:
    """Classify a request by its path's tail, so prefixed layouts (Azure, gateways) match."""
    endpoint = _USUAL.get(path)
    return endpoint if endpoint is not None else _classify(method, path)


class Unmetered:
    """An answer meter cannot read (a content coding or type it does not know): relayed, not metered."""

    __slots__ = ("reason",)
    done = True
    output_done = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def feed(self, chunk: bytes) -> None:
        pass

    def release(self) -> None:
        pass

    def finish(self) -> Observation:
        return Observation(unmetered=self.reason)


def observer_for(
    kind: str,
    content_type: str,
    content_encoding: str,
    clock: Callable[[], float] = time.perf_counter,
    max_bytes: int = 64 << 20,
    budget: MeteringBudget | None = None,
) -> SSEObserver | BodyCollector | Decompressing | Unmetered:
    """The observer for an answer.

    `kind` is `responses` or `chat` (Chat Completions and Embeddings share a shape).
    `max_bytes` bounds what is held of one body or event (`--max-metered-bytes`),
    `budget` what all answers hold at once (`--max-metered-bytes-total`).  Whoever
    drops an observer without `finish()` calls its `release()`.
    """
    if "text/event-stream" in content_type:
        inner: SSEObserver | BodyCollector = SSEObserver(kind, clock, max_bytes, budget)
    elif "json" in content_type or not content_type:
        inner = BodyCollector(kind, max_bytes, budget)
    else:
        # Media types are case-insensitive: lowered only here, past the usual spellings.
        lowered = content_type.lower()
        if "text/event-stream" in lowered:
            inner = SSEObserver(kind, clock, max_bytes, budget)
        elif "json" in lowered:
            inner = BodyCollector(kind, max_bytes, budget)
        else:
            # A model call answered in a type meter does not read: relayed as it is, and
            # its row says why it has no usage rather than passing for a call without.
            return Unmetered("unknown_content_type")
    if not content_encoding:
        return inner
    if content_encoding in DECODERS:  # the usual case: one coding, as registered
        return Decompressing(inner, [content_encoding], max_bytes)
    codings = content_codings(content_encoding)
    if not codings:
        return inner
    if any(c not in DECODERS for c in codings):
        return Unmetered("unknown_encoding")
    return Decompressing(inner, codings, max_bytes)
