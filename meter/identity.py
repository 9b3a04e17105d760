"""Who made a request: a key's stable id and a hint, never the key itself.

`key_id` is the first 16 hex digits of SHA-256 of the key, so names can be given
to keys in the config without storing them; `key_hint` is `sk-...` plus the last
four characters.  The raw key lives only in the request being forwarded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization")
    if auth:
        key = bearer_key(auth)
        if key is not None:
            return key
    return headers.get("x-api-key") or headers.get("api-key") or None


def bearer_key(authorization: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` value, else None."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def key_hint(key: str) -> str:
    return "sk-..." + key[-4:] if len(key) > 8 else "sk-..."


# Keys come from outside, up to a header's size: the cache keeps real ones (under
# 200 characters), so that it is bounded in bytes as well as in entries.
_LONGEST_CACHED_KEY = 256


class KeyIdentities:
    """Memoises key -> (key_id, key_hint, name); bounded so keys cannot grow it forever.

    The cache is in memory only, like the request that carried the key.
    """

    __slots__ = ("_by_authorization", "_cache", "_max", "_names")

    def __init__(self, names: Mapping[str, str] | None = None, max_entries: int = 10_000) -> None:
        self._names = dict(names or {})
        self._cache: dict[str, tuple[str, str, str | None]] = {}
        # `Authorization` header values -> the identity of their bearer key: the usual
        # request's identity in one lookup, without taking the header apart again.
        self._by_authorization: dict[str, tuple[str, str, str | None]] = {}
        self._max = max_entries

    def of_headers(self, headers: Mapping[str, str]) -> tuple[str, str, str | None] | None:
        """`lookup` of the key `key_from_headers` finds, or None when there is none."""
        auth = headers.get("Authorization")
        if auth:
            hit = self._by_authorization.get(auth)
            if hit is not None:
                return hit
        key = key_from_headers(headers)
        if key is None:
            return None
        found = self.lookup(key)
        # Kept by the header's value only when the key is its bearer token (else the
        # key came from another header, which the value does not decide).
        if auth and len(auth) <= _LONGEST_CACHED_KEY and bearer_key(auth) is not None:  # bounded as `lookup` bounds its own
            if len(self._by_authorization) >= self._max:
                self._by_authorization.clear()
            self._by_authorization[auth] = found
        return found

    def lookup(self, key: str) -> tuple[str, str, str | None]:
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        kid = key_id(key)
        found = (kid, key_hint(key), self._names.get(kid))
        if len(key) > _LONGEST_CACHED_KEY:
            return found  # no real key is this long: hashing it again costs less than keeping it
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[key] = found
        return found
