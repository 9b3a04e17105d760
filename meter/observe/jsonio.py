"""JSON in and out for metering: orjson, with the one case it refuses read by json.

Everything the observe package decodes or writes goes through here, so that a
value a client can send (a lone surrogate, a nesting too deep) is handled the
same way wherever it turns up.  The small readers take a decoded value as
what meter expects, or nothing: an upstream's JSON is not trusted to have the
types the API documents.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# orjson alone, for the few callers on every answer's path that save `loads`'s call
# around it: on its ValueError they call `loads`, which reads what orjson refuses.
orjson_loads = _orjson_loads = orjson.loads

# What a failed decode raises: orjson's JSONDecodeError is a ValueError, and bytes
# that are not UTF-8 fail json's own decoding.
DecodeError: tuple[type[Exception], ...] = (ValueError, UnicodeDecodeError)

dumps = orjson.dumps


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode JSON text; raises one of `DecodeError`."""
    try:
        return _orjson_loads(data)
    except orjson.JSONDecodeError:
        # orjson refuses lone surrogates ("\ud800" is valid JSON): a client must
        # not dodge metering with one.  The ledger makes them U+FFFD.
        try:
            return json.loads(data if not isinstance(data, memoryview) else bytes(data))
        except RecursionError:  # nested past what orjson reads, too deep for json too
            raise ValueError("JSON nested too deep") from None


def as_int(value: Any) -> int | None:
    # bool is an int subclass; a token count of `true` is not a count.
    return value if type(value) is int else None


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
