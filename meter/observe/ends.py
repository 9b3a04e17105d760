"""Reading a JSON object that was too large to hold from its head and its tail.

Past `max_bytes` meter keeps only the first and last `edge(limit)` bytes of an
event or body.  Identity (id, model, status) sits before a large `output` in
OpenAI's serialisation, usage and the served tier after it; the readers here
find those members without decoding, or holding a second copy of, the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

# Past `max_bytes` an event or body keeps this much of its start and of its end:
# enough for the members around a large `output` (id, model, status before it;
# usage, the served tier after it), small beside the limit.
EDGE_MAX = 1 << 20


def edge(limit: int) -> int:
    """How much of each end is kept of something past `limit`: at most half of it."""
    return max(1, min(limit // 2, EDGE_MAX))


_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]')  # a JSON string, or a bracket
_COLON = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
_VALUE_WINDOW = 64 << 10  # members read from a head or tail are small (usage, ids)
NOTHING: Any = object()  # no value found (None is a value: JSON null)
_raw_decode = json.JSONDecoder().raw_decode


def value_at(buf: bytes | bytearray, pos: int) -> Any:
    """The JSON value that starts at buf[pos] if it ends within the window, else NOTHING."""
    text = bytes(buf[pos : pos + _VALUE_WINDOW]).decode("utf-8", "replace")
    try:
        return _raw_decode(text)[0]
    except ValueError:
        return NOTHING


def members(buf: bytes | bytearray, start: int, wanted: frozenset[str]) -> dict[str, int]:
    """Where the values of the `wanted` members of the object opening at buf[start] begin.

    Strings are tokens, so a key is told from text that looks like one, and only
    members of the object itself (depth 1) count.  `buf` may end anywhere.
    """
    found: dict[str, int] = {}
    depth = 0
    for m in _TOKEN.finditer(buf, start):
        c = buf[m.start()]
        if c == 34:  # '"'
            if depth == 1:
                colon = _COLON.match(buf, m.end())
                if colon is not None:
                    key = bytes(buf[m.start() + 1 : m.end() - 1]).decode("utf-8", "replace")
                    if key in wanted and key not in found:
                        found[key] = colon.end()
                        if len(found) == len(wanted):
                            break
        elif c == 123 or c == 91:  # { [
            depth += 1
        else:
            depth -= 1
            if depth <= 0:
                break
    return found


def last_member(buf: bytes | bytearray, key: str, check: Callable[[Any], bool]) -> Any:
    """The value of the last member named `key` in `buf`, a tail of a JSON text.

    A tail starts anywhere, even inside a string, so depth cannot be known; but
    inside a string every quote is escaped, so `"key"` preceded by `{` or `,`
    and followed by `:` is a member of some object.  The last one whose value
    passes `check` is taken: in OpenAI's serialisation `usage` and
    `service_tier` come after `output`, and nested values come before them.
    """
    needle = b'"' + key.encode() + b'"'
    end = len(buf)
    for _ in range(64):
        i = buf.rfind(needle, 0, end)
        if i < 0:
            break
        end = i + len(needle) - 1
        j = i - 1
        while j >= 0 and buf[j] in b" \t\r\n":
            j -= 1
        if j < 0 or buf[j] not in b"{,":
            continue
        colon = _COLON.match(buf, i + len(needle))
        if colon is None:
            continue
        value = value_at(buf, colon.end())
        if value is not NOTHING and check(value):
            return value
    return NOTHING


def _is_usage(value: Any) -> bool:
    return isinstance(value, dict) and any(type(value.get(k)) is int for k in ("input_tokens", "prompt_tokens", "output_tokens", "total_tokens"))


def is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


# The members read of a cut answer: those in its head, and those looked for in its tail.
RESPONSE_HEAD = frozenset({"id", "model", "status", "previous_response_id", "background", "service_tier", "error", "usage", "tool_usage", "prompt_cache_diagnostics"})
CHAT_HEAD = frozenset({"id", "object", "model", "service_tier", "error", "usage"})
RESPONSE_TAIL: dict[str, Callable[[Any], bool]] = {"usage": _is_usage, "service_tier": is_str, "tool_usage": _is_dict, "prompt_cache_diagnostics": _is_dict}
CHAT_TAIL: dict[str, Callable[[Any], bool]] = {"usage": _is_usage, "service_tier": is_str}


def partial_object(head: bytes, tail: bytes | bytearray, start: int, head_keys: frozenset[str], tail_keys: dict[str, Callable[[Any], bool]]) -> dict[str, Any]:
    """What an object too large to hold still says: its members found whole in its
    head (exactly, by depth), and those after a large `output` found in its tail."""
    found: dict[str, Any] = {}
    for key, pos in members(head, start, head_keys).items():
        value = value_at(head, pos)
        if value is not NOTHING:
            found[key] = value
    for key, check in tail_keys.items():
        if key not in found or not check(found[key]):
            value = last_member(tail, key, check)
            if value is not NOTHING:
                found[key] = value
    return found


def partial_response(head: bytes, tail: bytes | bytearray, start: int, final: bool) -> dict[str, Any]:
    """The `response` of an event too large to decode, opening at head[start]: the
    members before a large `output`, and for a terminal (`final`) event those after
    it (usage, the served tier) from the tail."""
    if final:
        return partial_object(head, tail, start, RESPONSE_HEAD, RESPONSE_TAIL)
    return partial_object(head, b"", start, RESPONSE_HEAD, {})
