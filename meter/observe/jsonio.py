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

from ..bounds import BIGINT_MAX

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


# What a count that is a JSON number but no integer is read as: a float (1.5, 1e30, or an
# integer past 64 bits, which orjson reads as a float).  It is an int past every count
# the ledger holds, so that the one range test of a record's counts
# (`usage.unfit_counts`) makes it NULL and an `overflow` anomaly, whatever its size or
# type: read as nothing, it left the row priced from the other counts (an input of
# 2**64 tokens was priced as 0).  Never stored.
NOT_AN_INT = BIGINT_MAX + 1


def as_int(value: Any) -> int | None:
    """A count: an int as it is, any other number `NOT_AN_INT`, anything else None."""
    if type(value) is int:  # bool is an int subclass; a token count of `true` is not a count
        return value
    return NOT_AN_INT if type(value) is float else None


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
